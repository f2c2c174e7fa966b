"""Brain module (docs/behaviour.md §3): fMRI window (B, V, T) -> conditioning tokens (B, 257, 768).

Parameter names and shapes of the published configuration are those of the
released checkpoints (under ``brain_modules.clip_image.``):
``subject_layers.weights`` (S, V, H), ``lin0.weight`` (T*H, 1, H) and ``lin0.bias``
(T*H) -- the original's grouped ``Conv1d(T, T*H, kernel_size=H, groups=T)``, computed
here as one batched matrix product --, ``post_lin0.0.{weight,bias}`` (LayerNorm),
``out_time_agg.{weight,bias}`` (1, T) / (1), ``lin1.{weight,bias}`` (257*768, H).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynadiff.models.config import FmriMLPConfig


class SubjectLayers(nn.Module):
    """One linear map per subject over the voxel axis: (B, V, T) -> (B, T, H).

    ``weights`` (S, V, H), initialised ``randn / sqrt(V)``; per sample
    ``einsum("vt,vh->th", x[b], weights[subject_idx[b]])``. ``deep`` adds GELU and a
    second per-subject (H, H) map (``weights_2``).
    """

    def __init__(self, n_subjects: int, in_dim: int, out_dim: int, bias: bool = False, deep: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(n_subjects, in_dim, out_dim) / math.sqrt(in_dim))
        self.bias = nn.Parameter(torch.zeros(n_subjects, out_dim)) if bias else None
        if deep:
            self.weights_2 = nn.Parameter(torch.randn(n_subjects, out_dim, out_dim) / math.sqrt(out_dim))
            self.bias_2 = nn.Parameter(torch.zeros(n_subjects, out_dim)) if bias else None
        else:
            self.weights_2 = None
            self.bias_2 = None

    def _one_subject(self, x: torch.Tensor, s: int) -> torch.Tensor:
        out = torch.einsum("bvt,vh->bth", x, self.weights[s])  # (b, T, H)
        if self.bias is not None:
            out = out + self.bias[s]
        if self.weights_2 is not None:
            out = torch.einsum("bti,ih->bth", nn.functional.gelu(out), self.weights_2[s])
            if self.bias_2 is not None:
                out = out + self.bias_2[s]
        return out

    def forward(self, x: torch.Tensor, subject_idx: torch.Tensor) -> torch.Tensor:
        subjects = subject_idx.unique()
        if len(subjects) == 1:  # the usual case: one subject per batch, no gather
            return self._one_subject(x, int(subjects[0]))
        out = x.new_zeros(x.shape[0], x.shape[2], self.weights.shape[2])
        for s in subjects.tolist():
            mask = subject_idx == s
            out = out.index_put((mask,), self._one_subject(x[mask], s))
        return out


class PerTimeLinear(nn.Module):
    """A different Linear(in_dim -> out_dim) for each of T time points: (B, T, in) -> (B, T, out).

    Stored as the original's grouped convolution ``Conv1d(T, T*out, kernel_size=in,
    groups=T)`` applied to (B, T, in): ``weight`` (T*out, 1, in), ``bias`` (T*out);
    time point t uses rows ``t*out:(t+1)*out``.
    """

    def __init__(self, n_timepoints: int, in_dim: int, out_dim: int):
        super().__init__()
        self.n_timepoints, self.in_dim, self.out_dim = n_timepoints, in_dim, out_dim
        bound = 1.0 / math.sqrt(in_dim)  # nn.Conv1d / nn.Linear default range
        self.weight = nn.Parameter(torch.empty(n_timepoints * out_dim, 1, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_timepoints * out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.n_timepoints, self.out_dim, self.in_dim)
        b = self.bias.view(self.n_timepoints, self.out_dim)
        return torch.einsum("bti,toi->bto", x, w) + b  # (B, T, out)


class _ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the hidden channels of a (B, T, H) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _norm_act(config: FmriMLPConfig, dropout: float) -> list[nn.Module]:
    norm = nn.LayerNorm(config.hidden) if config.norm == "layer" else _ChannelBatchNorm(config.hidden)
    layers = [nn.GELU(), norm] if config.act_first else [norm, nn.GELU()]
    return layers + [nn.Dropout(dropout)]


class FmriMLP(nn.Module):
    """The Dynadiff brain module; see ``FmriMLPConfig`` for the options.

    forward(brain (B, V, T) float, subject_idx (B,) long) -> (B, n_tokens, token_dim).
    """

    def __init__(self, config: FmriMLPConfig, n_voxels: int, n_subjects: int = 1, n_timepoints: int = 6):
        super().__init__()
        if n_voxels < 1 or n_subjects < 1 or n_timepoints < 1:
            raise ValueError(
                f"n_voxels, n_subjects and n_timepoints must be positive, got {n_voxels}, {n_subjects}, {n_timepoints}"
            )
        self.config = config
        self.n_voxels, self.n_subjects, self.n_timepoints = n_voxels, n_subjects, n_timepoints
        hidden = config.hidden
        agg_in = config.time_agg.startswith("in_")
        t_inner = 1 if agg_in else n_timepoints  # time points seen after the input aggregation

        if config.time_agg == "in_linear":
            self.in_time_agg = nn.Linear(n_timepoints, 1)
        if config.subject_layers == "none":
            self.lin_in = nn.Linear(n_voxels, hidden)
        else:
            self.subject_layers = SubjectLayers(
                n_subjects, n_voxels, hidden, bias=config.subject_layers_bias, deep=config.subject_layers == "deep"
            )
        if config.tr_embedding:
            self.tr_embedding = nn.Embedding(t_inner, hidden)
        self.lin0 = PerTimeLinear(t_inner, hidden, hidden) if config.per_tr_layer else nn.Linear(hidden, hidden)
        self.post_lin0 = nn.Sequential(*_norm_act(config, config.dropout))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), *_norm_act(config, config.block_dropout)) for _ in range(config.n_blocks)
        )
        if config.time_agg == "out_linear":
            self.out_time_agg = nn.Linear(t_inner, 1)
        self.lin1 = nn.Linear(hidden, config.out_dim)

    def _check_inputs(self, brain: torch.Tensor, subject_idx: torch.Tensor) -> None:
        if brain.ndim != 3 or brain.shape[1] != self.n_voxels or brain.shape[2] != self.n_timepoints:
            raise ValueError(
                f"brain must have shape (batch, {self.n_voxels} voxels, {self.n_timepoints} TRs), got {tuple(brain.shape)}"
            )
        if not brain.is_floating_point():
            raise TypeError(f"brain must be a floating-point tensor, got {brain.dtype}")
        if subject_idx.shape != (brain.shape[0],) or subject_idx.dtype != torch.long:
            raise ValueError(
                f"subject_idx must be a long tensor of shape ({brain.shape[0]},), "
                f"got {subject_idx.dtype} of shape {tuple(subject_idx.shape)}"
            )
        if len(subject_idx) and (int(subject_idx.min()) < 0 or int(subject_idx.max()) >= self.n_subjects):
            raise ValueError(
                f"subject_idx must be within [0, {self.n_subjects}) for this module's {self.n_subjects} "
                f"subject(s), got values {sorted(set(subject_idx.tolist()))}"
            )

    def forward(self, brain: torch.Tensor, subject_idx: torch.Tensor) -> torch.Tensor:
        self._check_inputs(brain, subject_idx)
        x = brain.to(self.lin1.weight.dtype)  # (B, V, T)
        if self.config.time_agg == "in_linear":
            x = self.in_time_agg(x)  # (B, V, 1)
        elif self.config.time_agg == "in_mean":
            x = x.mean(dim=2, keepdim=True)
        if self.config.subject_layers == "none":
            x = self.lin_in(x.transpose(1, 2))  # (B, T, H)
        else:
            x = self.subject_layers(x, subject_idx)  # (B, T, H)
        if self.config.tr_embedding:
            x = x + self.tr_embedding.weight  # (T, H) broadcast over the batch
        x = self.post_lin0(self.lin0(x))  # (B, T, H)
        for block in self.mlp:
            x = x + block(x)
        if self.config.time_agg == "out_linear":
            x = self.out_time_agg(x.transpose(1, 2)).squeeze(2)  # (B, H, T) -> (B, H)
        elif self.config.time_agg == "out_mean":
            x = x.mean(dim=1)
        else:
            x = x.squeeze(1)  # the single time point left by the input aggregation
        return self.lin1(x).view(x.shape[0], self.config.n_tokens, self.config.token_dim)
