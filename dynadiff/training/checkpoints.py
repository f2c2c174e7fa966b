"""Training checkpoints: ``model.safetensors`` (what eval.py reads) and ``state.safetensors`` (what ``--resume``
needs: AdamW moments, scheduler, loss scaler, step, ...).

A checkpoint folder is written under a temporary name and swapped in, so an
interruption never leaves a half-written checkpoint: ``checkpoints/last`` (or,
after a crash during the swap, ``checkpoints/last.old``) is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from dynadiff.config import TrainConfig
from dynadiff.files import write_dir_atomically
from dynadiff.training.errors import TrainingError
from dynadiff.training.optim import indexed_param_groups

logger = logging.getLogger(__package__)

SUBJECT_LAYERS = "brain_modules.clip_image.subject_layers."  # weights (S, V, H), weights_2 (S, H, H), bias (S, H)
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
STATE_FORMAT = "1"


def complete_checkpoint_dir(target: Path) -> Path | None:
    """``target`` if it exists, else ``target.old`` (a crash in the middle of a swap), else None."""
    target = Path(target)
    if target.is_dir():
        return target
    old = target.with_name(target.name + ".old")
    return old if old.is_dir() else None


def _checkpoint_metadata(cfg: TrainConfig, step: int, extra: dict) -> dict:
    # subjects: the model's subject layers (a pretrained model's, then this run's), what eval.py picks a layer from
    return {"step": step, "subjects": cfg.model_subjects, "train_config": json.loads(cfg.model_dump_json()), **extra}


def save_training_checkpoint(folder: Path, model, opt: torch.optim.Optimizer, param_names: list[str], sched,
                             scaler, cfg: TrainConfig, step: int, best_val: float | None, with_state: bool = True,
                             extra: dict | None = None, log_window: tuple[float, int] = (0.0, 0),
                             world_size: int = 1) -> Path:
    """Write ``folder/model.safetensors`` (what eval.py reads) and, with ``with_state``,
    ``folder/state.safetensors`` (AdamW moments per parameter name, scheduler, loss
    scaler, step, best validation loss, ``log_window``: the summed loss and count of the
    steps since the last logged train row, ``world_size``: the processes that trained it;
    everything ``--resume`` needs). Atomic. A sharded optimizer's state must have been
    consolidated on this process first (``consolidate_state_dict``)."""
    from safetensors.torch import save_file

    from dynadiff.checkpoint import save_checkpoint

    meta = _checkpoint_metadata(cfg, step, dict(extra or {}, best_val_loss=best_val))

    def write(tmp: Path) -> None:
        save_checkpoint(model, tmp / MODEL_FILE, extra_metadata=meta)
        if not with_state:
            return
        opt_state = opt.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for idx, name in enumerate(param_names):
            for key, value in opt_state["state"].get(idx, {}).items():
                tensors[f"{key}/{name}"] = value.detach().to("cpu").contiguous()
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in opt_state["param_groups"]]
        state_meta = {
            "format": "pt", "dynadiff_train_state": STATE_FORMAT, "step": str(step),
            "param_names": json.dumps(param_names), "param_groups": json.dumps(groups),
            "scheduler": json.dumps(sched.state_dict()), "scaler": json.dumps(scaler.state_dict() if scaler else None),
            "best_val_loss": json.dumps(best_val), "train_config": cfg.model_dump_json(),
            "log_window": json.dumps(list(log_window)), "world_size": str(world_size),
        }
        save_file(tensors, str(tmp / STATE_FILE), metadata=state_meta)

    write_dir_atomically(Path(folder), write)
    return Path(folder) / MODEL_FILE


@dataclasses.dataclass
class ResumeState:
    folder: Path
    step: int
    best_val: float | None
    config: dict
    log_window: tuple[float, int] = (0.0, 0)  # (summed loss, count) of the steps not logged yet
    world_size: int = 1  # processes of the run that wrote it


def read_resume_state(folder: Path) -> ResumeState:
    from dynadiff.checkpoint import read_metadata

    meta = read_metadata(Path(folder) / STATE_FILE)
    if meta.get("dynadiff_train_state") != STATE_FORMAT:
        raise TrainingError(f"{folder / STATE_FILE} is not a dynadiff training state (format {STATE_FORMAT})")
    loss_sum, n = json.loads(meta.get("log_window", "[0.0, 0]"))  # absent from older states: an empty window
    return ResumeState(Path(folder), int(meta["step"]), json.loads(meta["best_val_loss"]), json.loads(meta["train_config"]),
                       (float(loss_sum), int(n)), int(meta.get("world_size", "1")))  # absent before issue 14: 1


def load_training_state(state: ResumeState, model, opt: torch.optim.Optimizer, param_names: list[str], sched,
                        scaler) -> None:
    """Model weights, AdamW moments, scheduler and loss-scaler state from a ``checkpoints/last`` folder."""
    from safetensors.torch import load_file

    from dynadiff.checkpoint import load_checkpoint, read_metadata

    load_checkpoint(model, state.folder / MODEL_FILE)
    meta = read_metadata(state.folder / STATE_FILE)
    saved_names = json.loads(meta["param_names"])
    if saved_names != param_names:
        missing = sorted(set(param_names) - set(saved_names))
        extra = sorted(set(saved_names) - set(param_names))
        raise TrainingError(
            f"{state.folder}: the optimizer state does not match this model's trainable parameters "
            f"(missing {missing[:5]}, unexpected {extra[:5]}, or another order)")
    tensors = load_file(str(state.folder / STATE_FILE))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        field, name = key.split("/", 1)
        per_param.setdefault(param_names.index(name), {})[field] = value
    current = indexed_param_groups(opt)
    groups = json.loads(meta["param_groups"])
    if [g["n_params"] for g in groups] != [len(g["params"]) for g in current]:
        raise TrainingError(f"{state.folder}: the optimizer's parameter groups do not match this model's")
    for saved, group in zip(groups, current):
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "n_params"})
    opt.load_state_dict({"state": per_param, "param_groups": current})
    sched.load_state_dict(json.loads(meta["scheduler"]))
    # The saved param_groups carry the lr of the schedule the state was saved with; the lr of this step is
    # that of sched's schedule (cfg.steps): the same value unless steps changed (an extended run).
    for group, base_lr, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base_lr * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    scaler_state = json.loads(meta["scaler"])
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)


def load_pretrained(model, cfg: TrainConfig) -> None:
    """The checkpoint ``cfg.init_from``'s tensors into ``model`` (built for ``cfg.model_subjects``)."""
    from dynadiff.checkpoint import CheckpointError, load_checkpoint, read_state_dict

    try:
        saved = read_state_dict(cfg.init_from)
    except (CheckpointError, OSError, ValueError) as e:
        raise TrainingError(f"--init-from {cfg.init_from}: cannot read it ({e})") from None
    current = dict(model.named_parameters())
    n_old = len(cfg.init_subjects)
    merged = {}
    for name, tensor in saved.items():
        if name.startswith(SUBJECT_LAYERS) and name in current:
            slot = current[name].detach().clone()  # the new subjects' layers: as initialised
            slot[:n_old] = 0  # the old subjects' rows beyond their width: zeros
            slot[(slice(0, n_old),) + tuple(slice(0, n) for n in tensor.shape[1:])] = tensor.to(slot.dtype)
            merged[name] = slot
        else:
            merged[name] = tensor
    report = load_checkpoint(model, merged)
    if not report.ok:
        raise TrainingError(f"--init-from {cfg.init_from}: its tensors do not fit this run's model ({report}); "
                            "was it trained with another configuration?")
    new = [s for s in cfg.model_subjects if s not in cfg.init_subjects]
    logger.info("initialised from %s: the layers of subject(s) %s kept%s, every other tensor loaded", cfg.init_from,
                cfg.init_subjects, f", a new layer for subject(s) {new}" if new else "")
