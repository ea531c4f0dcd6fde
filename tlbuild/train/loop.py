"""Staged fine-tuning with early stopping, per-epoch checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from tlbuild.data.dataset import EvalTransform, ImageDataset, train_transform
from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample, Splits
from tlbuild.errors import UsageError
from tlbuild.fileio import atomic_path
from tlbuild.models.factory import unwrap_state
from tlbuild.recipe import DataConfig, TrainConfig
from tlbuild.train.optim import make_optimizer, make_scheduler
from tlbuild.train.stages import apply_stage, set_train_mode


@dataclass
class TrainResult:
    """The best model (loaded) and how training went."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    device: str


def select_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present; an explicit 'cuda' without a GPU is a usage error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f'train.device = "{spec}" but no CUDA GPU is visible; use "auto" or "cpu"')
    device = torch.device(spec)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f'train.device = "{spec}" but only {torch.cuda.device_count()} GPU(s) are visible'
        )
    return device


def _workers(cfg: DataConfig, device: torch.device) -> int:
    if cfg.workers != "auto":
        return int(cfg.workers)
    cores = os.cpu_count() or 1
    # On a 2-core CPU box the training math already uses both cores; a decoding worker would
    # only compete with it. With a GPU the CPU does nothing but decode, so use the cores.
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 2)
    return min(8, max(1, cores - 1))


def _loaders(
    splits: Splits, spec: Preprocessing, cfg: TrainConfig, data: DataConfig, device: torch.device
) -> tuple[DataLoader, DataLoader, torch.Generator]:
    gen = torch.Generator()
    workers = _workers(data, device)
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        # Not persistent: workers are re-created (and re-seeded from `gen`) every epoch, which
        # is what makes a resumed run draw the same augmentations as an uninterrupted one.
        "persistent_workers": False,
    }
    train_ds = ImageDataset(splits.train, train_transform(spec, cfg.augment))
    sampler = None
    if data.balance == "sampler":
        counts = np.bincount([s.label for s in splits.train], minlength=len(splits.classes))
        weights = [1.0 / counts[s.label] for s in splits.train]
        sampler = WeightedRandomSampler(weights, len(weights), replacement=True, generator=gen)
    train = DataLoader(
        train_ds,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        # BatchNorm cannot train on a batch of one; drop a ragged last batch when there is more.
        drop_last=len(train_ds) > cfg.batch_size,
        **common,
    )
    val = DataLoader(ImageDataset(splits.val, EvalTransform(spec)), shuffle=False, **common)
    return train, val, gen


def _class_weights(samples: list[Sample], k: int) -> torch.Tensor:
    counts = np.bincount([s.label for s in samples], minlength=k).astype(float)
    return torch.tensor(counts.sum() / (k * np.maximum(counts, 1)), dtype=torch.float32)


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as p:
        yield p


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy (no smoothing), logits and labels over a loader, in eval mode."""
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x)
            logits.append(out.float().cpu())
            labels.append(y)
    lg, lb = torch.cat(logits), torch.cat(labels)
    loss = float(nn.functional.cross_entropy(lg, lb))
    return loss, lg.numpy(), lb.numpy()


def _fingerprint(
    splits: Splits, cfg: TrainConfig, data: DataConfig, spec: Preprocessing, model_key: str
) -> str:
    import hashlib
    import json

    payload = {
        "train": json.loads(cfg.model_dump_json()),
        "data": json.loads(data.model_dump_json(exclude={"workers"})),
        "classes": splits.classes,
        "train_files": [str(s.path) for s in splits.train],
        "val_files": [str(s.path) for s in splits.val],
        "pre": spec.to_dict(),
        "model": model_key,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def fit(
    model: nn.Module,
    splits: Splits,
    spec: Preprocessing,
    cfg: TrainConfig,
    data: DataConfig,
    ckpt_path: Path,
    console: Console,
    resume: bool = False,
    model_key: str = "",
) -> TrainResult:
    """Run every stage of `cfg.stages`; checkpoint each epoch; return the best model by val loss.

    `model_key` identifies the model settings (backbone, weights, dropout) so that --resume
    refuses a checkpoint written for other ones.
    """
    device = select_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = (
        (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    memory_format = (
        torch.channels_last
        if cfg.channels_last and device.type == "cuda"
        else torch.contiguous_format
    )
    model.to(device, memory_format=memory_format)
    if device.type == "cpu":
        # Same seed, same CPU -> same weights (the recipe's reproducibility promise).
        torch.use_deterministic_algorithms(True, warn_only=True)

    train_loader, val_loader, gen = _loaders(splits, spec, cfg, data, device)
    weight = _class_weights(splits.train, len(splits.classes)) if data.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(
        weight=weight.to(device) if weight is not None else None,
        label_smoothing=cfg.label_smoothing,
    )
    fingerprint = _fingerprint(splits, cfg, data, spec, model_key)

    state: dict[str, Any] = {
        "stage": 0,
        "epoch_in_stage": 0,
        "history": [],
        "best": {"val_loss": math.inf, "epoch": -1, "state": None},
        "stage_best": math.inf,
        "bad_epochs": 0,
        "stage_done": False,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
    }
    if resume:
        if not ckpt_path.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}; run without --resume")
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            raise UsageError(
                f"--resume: {ckpt_path} was written for another recipe, dataset or backbone; "
                "run without --resume to start over"
            )
        model.load_state_dict(saved["model"])
        state.update({k: saved[k] for k in state})
        console.print(
            f"Resuming after epoch {len(state['history'])} "
            f"(stage '{cfg.stages[state['stage']].name}', epoch {state['epoch_in_stage']})"
        )

    with _progress(console) as progress:
        for si in range(state["stage"], len(cfg.stages)):
            stage = cfg.stages[si]
            if si > state["stage"]:
                state.update(
                    stage=si,
                    epoch_in_stage=0,
                    stage_best=math.inf,
                    bad_epochs=0,
                    stage_done=False,
                    optimizer=None,
                    scheduler=None,
                )
            param_groups = apply_stage(model, stage)
            optimizer = make_optimizer(param_groups, cfg)
            scheduler = make_scheduler(optimizer, cfg, stage.epochs, len(train_loader))
            if state["optimizer"] is not None:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if state["scaler"] is not None:
                    scaler.load_state_dict(state["scaler"])
            trainable = sum(p.numel() for g in param_groups for p in g["params"])
            console.print(
                f"[bold]Stage {si + 1}/{len(cfg.stages)} '{stage.name}'[/]: "
                f"{trainable:,} trainable parameters, head lr {stage.lr:g}"
                + (f", body lr {stage.lr * stage.body_lr_mult:g}" if len(param_groups) > 1 else "")
            )
            for e in range(state["epoch_in_stage"], stage.epochs):
                if state["stage_done"]:
                    break
                epoch = len(state["history"])
                # Seeding per epoch (not once) makes a resumed run draw the same augmentations
                # and batches as an uninterrupted one.
                torch.manual_seed(cfg.seed * 100_003 + epoch)
                gen.manual_seed(cfg.seed * 100_003 + epoch)
                set_train_mode(model, stage)
                t0 = time.perf_counter()
                task = progress.add_task(
                    f"{stage.name} {e + 1}/{stage.epochs}", total=len(train_loader), info=""
                )
                tot_loss, tot_correct, seen = 0.0, 0, 0
                for x, y in train_loader:
                    x = x.to(device, non_blocking=True, memory_format=memory_format)
                    y = y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        out = model(x)
                        loss = criterion(out.float(), y)
                    if not torch.isfinite(loss):
                        raise UsageError(
                            f"training diverged (loss {loss.item()}) in stage '{stage.name}'; "
                            "lower the stage's lr"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    n = y.shape[0]
                    tot_loss += loss.item() * n
                    tot_correct += int((out.argmax(1) == y).sum())
                    seen += n
                    rate = seen / (time.perf_counter() - t0)
                    progress.update(
                        task, advance=1, info=f"loss {tot_loss / seen:.3f} {rate:.1f} img/s"
                    )
                progress.remove_task(task)
                val_loss, val_logits, val_labels = evaluate(model, val_loader, device, amp_dtype)
                val_acc = float((val_logits.argmax(1) == val_labels).mean())
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                row = {
                    "epoch": epoch,
                    "stage": stage.name,
                    "train_loss": tot_loss / max(1, seen),
                    "train_acc": tot_correct / max(1, seen),
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr_head": lrs.get("head", 0.0),
                    "lr_body": lrs.get("body", 0.0),
                    "seconds": time.perf_counter() - t0,
                }
                state["history"].append(row)
                mark = ""
                if val_loss < state["best"]["val_loss"]:
                    state["best"] = {
                        "val_loss": val_loss,
                        "epoch": epoch,
                        "state": unwrap_state(model),
                    }
                    mark = " [green]best[/]"
                if val_loss < state["stage_best"] - cfg.early_stopping.min_delta:
                    state["stage_best"], state["bad_epochs"] = val_loss, 0
                else:
                    state["bad_epochs"] += 1
                stop = state["bad_epochs"] >= cfg.early_stopping.patience
                state["stage_done"] = stop
                state["epoch_in_stage"] = e + 1
                console.print(
                    f"  epoch {epoch + 1:>2} [{stage.name}] train loss {row['train_loss']:.4f} "
                    f"acc {row['train_acc']:.3f} | val loss {val_loss:.4f} acc {val_acc:.3f} | "
                    f"{row['seconds']:.1f}s{mark}"
                )
                state.update(
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler.is_enabled() else None,
                )
                save_checkpoint(ckpt_path, model, state, fingerprint)
                if stop:
                    console.print(
                        f"  early stop: no val-loss improvement for {cfg.early_stopping.patience} "
                        "epoch(s)"
                    )
            # Continue the next stage from the best weights so far, not from an overfit tail.
            if state["best"]["state"] is not None:
                model.load_state_dict(state["best"]["state"])

    best = state["best"]
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainResult(model, state["history"], best["epoch"], best["val_loss"], str(device))


def save_checkpoint(path: Path, model: nn.Module, state: dict[str, Any], fingerprint: str) -> None:
    """Write everything needed to resume after this epoch, atomically."""
    payload = copy.copy(state)
    payload["model"] = unwrap_state(model)
    payload["fingerprint"] = fingerprint
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
