"""Which parameters a fine-tuning phase trains, at which learning rates, and BatchNorm modes."""

from __future__ import annotations

from typing import Any

from torch import nn

from tlbuild.models.factory import body_groups, head_parameters
from tlbuild.recipe import PhaseConfig


def apply_phase(model: nn.Module, phase: PhaseConfig, lr: float) -> list[dict[str, Any]]:
    """Freeze all but the head and the top `phase.unfreeze` body groups; return optimizer groups.

    The head trains at `lr` (the phase's, or the one its range test found), unfrozen body groups
    at `lr * phase.body_lr_mult` (discriminative rates, as fastai's fine_tune does).
    """
    groups = body_groups(model)
    n = len(groups) if phase.unfreeze == "all" else min(int(phase.unfreeze), len(groups))
    for p in model.parameters():
        p.requires_grad_(False)
    head = head_parameters(model)
    body = [p for g in groups[len(groups) - n :] for p in g] if n else []
    for p in head + body:
        p.requires_grad_(True)
    param_groups: list[dict[str, Any]] = [{"params": head, "lr": lr, "name": "head"}]
    if body:
        param_groups.append({"params": body, "lr": lr * phase.body_lr_mult, "name": "body"})
    return param_groups


def set_train_mode(model: nn.Module, phase: PhaseConfig) -> None:
    """model.train(), but BatchNorm layers of frozen groups (or all, with freeze_bn) stay in eval.

    A frozen body must also keep its running statistics: updating them on a small new dataset
    shifts the features the head was trained on (the Keras transfer-learning guide's advice).
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            frozen = not params or not any(p.requires_grad for p in params)
            if frozen or phase.freeze_bn:
                m.eval()
