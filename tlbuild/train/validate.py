"""Validation: a model's loss and logits over a loader, and each epoch's validation scores."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from tlbuild.data.preprocess import Preprocessing
    from tlbuild.data.scan import Sample
    from tlbuild.train.run import TrainRun


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy (no smoothing), logits and labels over a loader, in eval mode."""
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x)
            logits.append(out.float().cpu())
            labels.append(y)
    lg, lb = torch.cat(logits), torch.cat(labels)
    loss = float(nn.functional.cross_entropy(lg, lb))
    return loss, lg.numpy(), lb.numpy()


def evaluate_samples(
    model: nn.Module,
    samples: list[Sample],
    spec: Preprocessing,
    device: torch.device,
    batch: int = 32,
) -> tuple[float, np.ndarray, np.ndarray]:
    """`evaluate` over image samples with the inference preprocessing (a trained model scored
    on a split: the train stage's evaluation and each cv fold's held-out images)."""
    from tlbuild.data.dataset import EvalTransform, ImageDataset

    loader = DataLoader(ImageDataset(samples, EvalTransform(spec)), batch_size=batch)
    return evaluate(model, loader, device, None)


def validate_epoch(
    run: TrainRun, row: dict[str, Any], lr: float, optimizer: torch.optim.Optimizer, t0: float
) -> None:
    """Complete an epoch's history row: validation loss and accuracy, lrs, seconds since t0."""
    if run.dist is None:
        val_loss, val_logits, val_labels = evaluate(
            run.model, run.loaders.val, run.device, run.amp_dtype, run.memory_format
        )
        val_acc = float((val_logits.argmax(1) == val_labels).mean())
    else:
        val_loss, val_acc = _validate_parts(run)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    row.update(
        val_loss=val_loss,
        val_acc=val_acc,
        stage_lr=lr,  # history.csv's column names stay as they were before phases
        lr_head=lrs.get("head", 0.0),
        lr_body=lrs.get("body", 0.0),
        seconds=time.perf_counter() - t0,
    )


def _validate_parts(run: TrainRun) -> tuple[float, float]:
    """Validation loss and accuracy: each rank its share of the images, summed over ranks."""
    sums = [0.0, 0.0, 0.0]
    part = run.loaders.val_part
    if len(part.dataset):  # type: ignore[arg-type]
        loss, logits, labels = evaluate(
            run.model, part, run.device, run.amp_dtype, run.memory_format
        )
        sums = [loss * len(labels), float((logits.argmax(1) == labels).sum()), len(labels)]
    loss_sum, correct, n = run.all_sum(*sums)
    return loss_sum / n, correct / n
