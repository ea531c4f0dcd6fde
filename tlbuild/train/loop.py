"""Staged fine-tuning with early stopping, per-epoch checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from tlbuild.data.cache import ImageCache, eval_preparer, fill_cache, train_preparer
from tlbuild.data.dataset import CachedEval, EvalTransform, ImageDataset, train_transform
from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample, Splits
from tlbuild.errors import UsageError
from tlbuild.fileio import atomic_path
from tlbuild.models.factory import unwrap_state
from tlbuild.recipe import DataConfig, StageConfig, TrainConfig
from tlbuild.train.lr_find import lr_range_test
from tlbuild.train.optim import make_optimizer, make_scheduler
from tlbuild.train.probe import fit_probe, probe_supported
from tlbuild.train.stages import apply_stage, set_train_mode


@dataclass
class TrainResult:
    """The best model (loaded) and how training went."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    device: str
    probe: dict[str, Any] | None = None
    lr_find: list[dict[str, Any]] = field(default_factory=list)


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
    splits: Splits,
    spec: Preprocessing,
    cfg: TrainConfig,
    data: DataConfig,
    device: torch.device,
    caches: tuple[ImageCache, ImageCache] | None,
) -> tuple[DataLoader, DataLoader, DataLoader, torch.Generator]:
    """Augmented training, plain training (for the probe) and validation loaders."""
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
    train_cache, val_cache = caches if caches is not None else (None, None)
    train_ds = ImageDataset(splits.train, train_transform(spec, cfg.augment), train_cache)
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
    # The training images as inference sees them (the probe's features), from the same cache.
    plain = ImageDataset(splits.train, EvalTransform(spec), train_cache)
    val_tf = CachedEval(spec) if val_cache is not None else EvalTransform(spec)
    val = DataLoader(ImageDataset(splits.val, val_tf, val_cache), shuffle=False, **common)
    return train, DataLoader(plain, shuffle=False, **common), val, gen


def build_caches(
    splits: Splits,
    spec: Preprocessing,
    cfg: TrainConfig,
    data: DataConfig,
    console: Console,
    spill_dir: Path,
) -> tuple[ImageCache, ImageCache] | None:
    """Decode the training and validation images once (data.cache); None when turned off.

    Arrays past `data.cache_ram_mib` go to a file in `spill_dir` (the export folder's
    checkpoints/, on disk: /tmp is often memory itself).
    """
    if not data.cache:
        return None
    ram = data.cache_ram_mib * 2**20
    spill_dir.mkdir(parents=True, exist_ok=True)
    train_cache = ImageCache(ram, spill_dir)
    val_cache = ImageCache(0, spill_dir)
    prep = train_preparer(spec, cfg.augment.crop_scale[0])
    t0 = time.perf_counter()
    try:
        _fill_caches(splits, spec, train_cache, val_cache, prep, console)
    except BaseException:
        train_cache.close()
        val_cache.close()
        raise
    spilled = train_cache.spilled_bytes + val_cache.spilled_bytes
    console.print(
        f"Decoded {len(splits.train) + len(splits.val)} images once "
        f"({(train_cache.ram_used + val_cache.ram_used) / 2**20:.0f} MiB in memory"
        + (f", {spilled / 2**20:.0f} MiB in a mapped file" if spilled else "")
        + f", {time.perf_counter() - t0:.1f}s)"
    )
    return train_cache, val_cache


def _fill_caches(
    splits: Splits,
    spec: Preprocessing,
    train_cache: ImageCache,
    val_cache: ImageCache,
    prep: Any,
    console: Console,
) -> None:
    with _progress(console) as progress:
        task = progress.add_task(
            "decoding images once", total=len(splits.train) + len(splits.val), info=""
        )

        def done() -> None:
            progress.advance(task)

        fill_cache(train_cache, [s.path for s in splits.train], prep, done)
        train_cache.seal()
        val_cache.ram_bytes = max(0, train_cache.ram_bytes - train_cache.ram_used)
        fill_cache(val_cache, [s.path for s in splits.val], eval_preparer(spec), done)
        val_cache.seal()


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


def _fingerprint(
    splits: Splits, cfg: TrainConfig, data: DataConfig, spec: Preprocessing, model_key: str
) -> str:
    import hashlib
    import json

    payload = {
        "train": json.loads(cfg.model_dump_json()),
        # Neither changes the weights: worker count, or where decoded images are kept.
        "data": json.loads(data.model_dump_json(exclude={"workers", "cache_ram_mib"})),
        "classes": splits.classes,
        "train_files": [str(s.path) for s in splits.train],
        "val_files": [str(s.path) for s in splits.val],
        "pre": spec.to_dict(),
        "model": model_key,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class _Run:
    """What every step of one `fit` call shares (device, precision, loaders, loss)."""

    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    memory_format: torch.memory_format
    criterion: nn.Module
    train_loader: DataLoader
    plain_loader: DataLoader
    val_loader: DataLoader
    gen: torch.Generator

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Any:
        """One optimizer step; returns (loss, logits). A non-finite loss updates nothing."""
        x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            out = self.model(x)
            loss = self.criterion(out.float(), y)
        if not torch.isfinite(loss):
            return loss, out
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return loss, out


def _new_state() -> dict[str, Any]:
    return {
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
        "probe": None,  # linear-probe result (head_init = "probe")
        "stage_lr": {},  # stage name -> the head lr it ran with (given or found)
        "lr_find": [],  # range-test curves of lr = "auto" stages
    }


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
    # Channels-last pays on CPUs too: oneDNN's depthwise and 1x1 convolutions ran 1.2x faster
    # for a Lite0 training step at 128 px on the 2-core dev machine (DESIGN.md section 4).
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    # torch.use_deterministic_algorithms is not set: on CPU it made training 1.25x slower and
    # was not needed for same seed, same machine, same weights (tests/test_train.py checks it).

    fingerprint = _fingerprint(splits, cfg, data, spec, model_key)
    state = _new_state()
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
        state.update({k: saved[k] for k in state if k in saved})
        console.print(
            f"Resuming after epoch {len(state['history'])} "
            f"(stage '{cfg.stages[state['stage']].name}', epoch {state['epoch_in_stage']})"
        )

    caches: tuple[ImageCache, ImageCache] | None = None
    try:
        caches = build_caches(splits, spec, cfg, data, console, ckpt_path.parent)
        train_loader, plain_loader, val_loader, gen = _loaders(
            splits, spec, cfg, data, device, caches
        )
        weight = (
            _class_weights(splits.train, len(splits.classes)) if data.balance == "loss" else None
        )
        criterion = nn.CrossEntropyLoss(
            weight=weight.to(device) if weight is not None else None,
            label_smoothing=cfg.label_smoothing,
        )
        run = _Run(
            model,
            cfg,
            device,
            amp_dtype,
            torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
            memory_format,
            criterion,
            train_loader,
            plain_loader,
            val_loader,
            gen,
        )
        # The probe also measures what a head alone reaches, for recipes without a head-only
        # stage (a few seconds: one forward pass, no backward).
        has_frozen_stage = any(s.unfreeze == 0 for s in cfg.stages)
        wanted = cfg.head_init == "probe" or not has_frozen_stage
        if wanted and not probe_supported(model):
            console.print(
                f"[yellow]No linear probe: {type(model.get_classifier()).__name__} is not a "
                "single linear head; the head starts from random weights.[/]"
            )
            wanted = False
        if wanted and not state["history"]:
            head = model.get_classifier()  # type: ignore[operator]
            random_head = copy.deepcopy(head.state_dict())
            probe = fit_probe(model, plain_loader, val_loader, device, memory_format)
            state["probe"] = probe.to_dict()
            # The probed model is a candidate like any epoch: if fine-tuning never beats its
            # validation loss, the frozen body with the fitted head is what ships.
            state["best"] = {"val_loss": probe.val_loss, "epoch": -1, "state": unwrap_state(model)}
            if cfg.head_init != "probe":
                head.load_state_dict(random_head)
            console.print(
                f"Head alone on frozen pretrained features (linear probe): val accuracy "
                f"{probe.val_accuracy:.1%} ({probe.seconds:.1f}s)"
                + ("; fine-tuning starts from it" if cfg.head_init == "probe" else "")
            )
        with _progress(console) as progress:
            for si in range(state["stage"], len(cfg.stages)):
                _run_stage(run, si, state, progress, console, ckpt_path, fingerprint)
    finally:
        if caches is not None:
            for c in caches:
                c.close()

    best = state["best"]
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainResult(
        model,
        state["history"],
        best["epoch"],
        best["val_loss"],
        str(device),
        probe=state["probe"],
        lr_find=state["lr_find"],
    )


def _stage_lr(
    run: _Run, stage: StageConfig, state: dict[str, Any], progress: Progress, console: Console
) -> float:
    """The stage's head lr: as given, or found by the range test (once; kept for resume)."""
    if stage.name in state["stage_lr"]:
        return float(state["stage_lr"][stage.name])
    if stage.lr != "auto":
        lr = float(stage.lr)
    else:
        probe_groups = apply_stage(run.model, stage, 1.0)
        set_train_mode(run.model, stage)
        steps = run.cfg.lr_find_steps
        task = progress.add_task(f"{stage.name}: lr range test", total=steps, info="")

        def step(optimizer: torch.optim.Optimizer, batch: Any) -> float:
            return float(run.step(optimizer, *batch)[0].detach())

        # The test's overflowing steps must not leave the training's loss scale shrunk.
        scaler_state = run.scaler.state_dict() if run.scaler.is_enabled() else None
        try:
            found = lr_range_test(
                run.model,
                probe_groups,
                lambda groups: make_optimizer(groups, run.cfg),
                run.train_loader,
                step,
                steps,
                run.cfg.seed,
                stage.name,
                on_step=lambda: progress.advance(task),
            )
        finally:
            if scaler_state is not None:
                run.scaler.load_state_dict(scaler_state)
        progress.remove_task(task)
        if found.steps < 3:
            raise UsageError(
                f"stage '{stage.name}': the learning-rate range test diverged within "
                f"{found.steps} step(s) even at lr 1e-6; check the data and labels, or give "
                "the stage a number for lr"
            )
        lr = found.chosen
        state["lr_find"].append(found.to_dict())
        console.print(
            f"  lr range test ({found.steps} steps, valley rule): stage '{stage.name}' "
            f"lr = {lr:.3g}"
        )
    state["stage_lr"][stage.name] = lr
    return lr


def _run_stage(
    run: _Run,
    si: int,
    state: dict[str, Any],
    progress: Progress,
    console: Console,
    ckpt_path: Path,
    fingerprint: str,
) -> None:
    """Train stage `si` from wherever `state` says it is, checkpointing every epoch."""
    cfg, model = run.cfg, run.model
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
    lr = _stage_lr(run, stage, state, progress, console)
    param_groups = apply_stage(model, stage, lr)
    optimizer = make_optimizer(param_groups, cfg)
    scheduler = make_scheduler(optimizer, cfg, stage.epochs, len(run.train_loader))
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None:
            run.scaler.load_state_dict(state["scaler"])
    trainable = sum(p.numel() for g in param_groups for p in g["params"])
    console.print(
        f"[bold]Stage {si + 1}/{len(cfg.stages)} '{stage.name}'[/]: "
        f"{trainable:,} trainable parameters, head lr {lr:g}"
        + (f", body lr {lr * stage.body_lr_mult:g}" if len(param_groups) > 1 else "")
    )
    for e in range(state["epoch_in_stage"], stage.epochs):
        if state["stage_done"]:
            break
        epoch = len(state["history"])
        # Seeding per epoch (not once) makes a resumed run draw the same augmentations
        # and batches as an uninterrupted one.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        run.gen.manual_seed(cfg.seed * 100_003 + epoch)
        set_train_mode(model, stage)
        t0 = time.perf_counter()
        task = progress.add_task(
            f"{stage.name} {e + 1}/{stage.epochs}", total=len(run.train_loader), info=""
        )
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for x, y in run.train_loader:
            loss, out = run.step(optimizer, x, y)
            if not torch.isfinite(loss):
                raise UsageError(
                    f"training diverged (loss {loss.item()}) in stage '{stage.name}'; "
                    "lower the stage's lr"
                )
            scheduler.step()
            n = y.shape[0]
            tot_loss += loss.item() * n
            tot_correct += int((out.argmax(1).cpu() == y).sum())
            seen += n
            rate = seen / (time.perf_counter() - t0)
            progress.update(task, advance=1, info=f"loss {tot_loss / seen:.3f} {rate:.1f} img/s")
        progress.remove_task(task)
        val_loss, val_logits, val_labels = evaluate(
            model, run.val_loader, run.device, run.amp_dtype, run.memory_format
        )
        val_acc = float((val_logits.argmax(1) == val_labels).mean())
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        row = {
            "epoch": epoch,
            "stage": stage.name,
            "train_loss": tot_loss / max(1, seen),
            "train_acc": tot_correct / max(1, seen),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "stage_lr": lr,
            "lr_head": lrs.get("head", 0.0),
            "lr_body": lrs.get("body", 0.0),
            "seconds": time.perf_counter() - t0,
        }
        state["history"].append(row)
        mark = ""
        if val_loss < state["best"]["val_loss"]:
            state["best"] = {"val_loss": val_loss, "epoch": epoch, "state": unwrap_state(model)}
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
            scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        )
        save_checkpoint(ckpt_path, model, state, fingerprint)
        if stop:
            console.print(
                f"  early stop: no val-loss improvement for {cfg.early_stopping.patience} epoch(s)"
            )
    # Continue the next stage from the best weights so far, not from an overfit tail.
    if state["best"]["state"] is not None:
        model.load_state_dict(state["best"]["state"])


def save_checkpoint(path: Path, model: nn.Module, state: dict[str, Any], fingerprint: str) -> None:
    """Write everything needed to resume after this epoch, atomically."""
    payload = copy.copy(state)
    payload["model"] = unwrap_state(model)
    payload["fingerprint"] = fingerprint
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
