"""The optimiser and its schedule: AdamW (decay on matrices only, optionally sharded over the processes), linear
warm-up + cosine decay."""

from __future__ import annotations

import functools
import math

import torch

from dynadiff.config import OptimizerConfig, TrainConfig


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear
    warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, shard: bool = False
                    ) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW over the trainable parameters (weight decay on matrices only); also their names, in order.

    ``shard`` (data-parallel runs): a ``ZeroRedundancyOptimizer`` whose AdamW moments are split over the
    processes (each keeps and updates those of its share of the parameters, then broadcasts them), as
    ZeRO stage 1; the same update as AdamW's.
    """
    decay, no_decay, names = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = []
    for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": [p for _, p in params], "weight_decay": wd})
            names += [n for n, _ in params]
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr, betas=tuple(cfg.betas),
                                      eps=cfg.eps)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return opt, names


def _is_sharded(opt: torch.optim.Optimizer) -> bool:
    return hasattr(opt, "consolidate_state_dict")  # torch.distributed.optim.ZeroRedundancyOptimizer


def indexed_param_groups(opt: torch.optim.Optimizer) -> list[dict]:
    """``opt.state_dict()["param_groups"]`` (parameters as indices), also for a sharded optimizer whose state
    dict needs a collective."""
    if not _is_sharded(opt):
        return opt.state_dict()["param_groups"]
    out, i = [], 0
    for g in opt.param_groups:
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(i, i + len(g["params"])))})
        i += len(g["params"])
    return out


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, total=cfg.steps, warmup=o.warmup_steps, min_ratio=o.min_lr_ratio))
