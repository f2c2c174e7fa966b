"""Training (``train.py``): the brain module and the UNet's LoRA, docs/behaviour.md §4 training step.

- data (:mod:`.data`): the non-test windows of the chosen subjects (``TrainDataConfig``), a
  validation split held out by image, windows zero-padded to the largest voxel
  count when there are several subjects (each sample keeps its ``subject_idx``);
- order (:mod:`.seeding`): an endless stream of samples, one seeded permutation per epoch; the
  samples of optimizer step ``k`` are a pure function of ``(seed, k)``, and so are
  its random draws (:func:`step_seed`): resuming needs no data-loader or RNG state;
- optimisation (:mod:`.optim`, :mod:`.precision`, :mod:`.loop`): AdamW (decay on matrices only), linear
  warm-up + cosine decay, gradient accumulation and clipping, autocast mixed precision (fp16 with loss
  scaling);
- outputs (``TrainConfig`` docstring): ``config.yaml``, ``log.csv`` (:mod:`.csvlog`), sample grids,
  ``checkpoints/last`` (model + optimizer/scheduler state) and ``checkpoints/best`` (:mod:`.checkpoints`);
- resuming (:func:`check_output`, :mod:`.checks`) with other ``steps`` than the checkpoint's trains the
  run to the new length: from the checkpoint's step on, the learning rate is that of the
  new schedule (the steps before it keep the old one's).

The loop (:func:`train`) lives in :mod:`.loop`; tests that wrap :func:`training_step_loss` patch it there.
"""

from dynadiff.training.checkpoints import (MODEL_FILE, ResumeState, complete_checkpoint_dir, load_training_state,
                                           read_resume_state, save_training_checkpoint)
from dynadiff.training.checks import check_inputs, check_output, config_differences
from dynadiff.training.data import TrainingData, TrainingSamples, build_training_data, collate
from dynadiff.training.errors import TrainingError
from dynadiff.training.evalcmd import eval_command
from dynadiff.training.loop import (DataParallel, init_model, optimizer_step, train, training_step_loss,
                                    validation_loss)
from dynadiff.training.optim import build_optimizer, build_scheduler, lr_factor
from dynadiff.training.precision import resolve_mixed_precision
from dynadiff.training.seeding import SampleStream, StepBatches, epoch_permutation, step_seed

__all__ = [
    "MODEL_FILE", "DataParallel", "ResumeState", "SampleStream", "StepBatches", "TrainingData", "TrainingError",
    "TrainingSamples", "build_optimizer", "build_scheduler", "build_training_data", "check_inputs", "check_output",
    "collate", "complete_checkpoint_dir", "config_differences", "epoch_permutation", "eval_command", "init_model",
    "load_training_state", "lr_factor", "optimizer_step", "read_resume_state", "resolve_mixed_precision",
    "save_training_checkpoint", "step_seed", "train", "training_step_loss", "validation_loss",
]
