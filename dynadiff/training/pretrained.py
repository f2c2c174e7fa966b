"""A run started from a pretrained model (``train.py --init-from``; docs/training.md, "A new subject").

The model has a subject layer for each of the checkpoint's subjects, in its order, then one for each subject of
this run it lacks (:attr:`dynadiff.config.TrainConfig.model_subjects`), and the larger of the two input widths
(windows are zero-padded to it, as in any multi-subject model). Every other tensor (the shared MLP, the LoRA)
is the checkpoint's, value for value; the checkpoint's subject layers are copied into their slots (a wider
input adds zero rows, which only ever meet the padding's zeros); the new subjects' layers start as a fresh
model's do (:func:`dynadiff.training.checkpoints.load_pretrained`).

While it trains (:class:`Holds`): the layers of the checkpoint's subjects this run has no data for stay exactly
as they were (restored after each step: AdamW's weight decay would otherwise shrink them), so those subjects
decode through the saved model as through the checkpoint; and for the first ``init_subject_steps`` steps only
the subject layers move (the others' gradients are dropped before the step), so that the new subject's layer
learns to feed the pretrained MLP before the MLP adapts to it.
"""

from __future__ import annotations

import torch

from dynadiff.config import TrainConfig
from dynadiff.training.checkpoints import SUBJECT_LAYERS


class Holds:
    """What a run from a pretrained model keeps still: see the module's docstring."""

    def __init__(self, model, cfg: TrainConfig) -> None:
        trained = set(cfg.subjects)
        self.held = [i for i, s in enumerate(cfg.model_subjects) if s in cfg.init_subjects and s not in trained]
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.layers = {n: p for n, p in params.items() if n.startswith(SUBJECT_LAYERS)}
        self.others = [p for n, p in params.items() if not n.startswith(SUBJECT_LAYERS)]
        self.saved = {n: p.detach()[self.held].clone() for n, p in self.layers.items()} if self.held else {}
        self.layers_only_until = cfg.init_subject_steps

    def before_step(self, step: int) -> None:
        """After the backward pass: during the first steps, only the subject layers keep their gradients."""
        if step < self.layers_only_until:
            for p in self.others:
                p.grad = None  # AdamW skips a parameter without a gradient: no update, no decay

    @torch.no_grad()
    def after_step(self) -> None:
        """The held subjects' layers back to the checkpoint's values."""
        for name, values in self.saved.items():
            self.layers[name][self.held] = values
