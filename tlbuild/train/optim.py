"""Optimizers and warm-up schedules built from the recipe."""

from __future__ import annotations

import math
from typing import Any

import torch

from tlbuild.recipe import TrainConfig


def make_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, SGD (momentum, Nesterov) or RMSprop over the phase's parameter groups."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    # TF-style RMSprop settings (eps, momentum) as used to train EfficientNet and MobileNet.
    return torch.optim.RMSprop(
        param_groups, alpha=0.9, eps=1e-3, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of each group's base lr at optimizer step `step` (0-based)."""
    if kind == "constant":
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    if kind == "onecycle":
        # One-cycle: cosine rise over the first 30% (at least the warm-up), cosine fall to ~0.
        rise = max(warmup, int(0.3 * total), 1)
        if step < rise:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * (step + 1) / rise)) / 2
        t = (step - rise) / max(1, total - rise)
        return 1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * t)) / 2
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * (1 + math.cos(math.pi * t)) / 2


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over one phase; the factor scales every group, keeping their ratio."""
    total = epochs * steps_per_epoch
    warmup = min(total // 2, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule)
    )
