"""Staged fine-tuning with early stopping, per-epoch checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset, WeightedRandomSampler

from tlbuild.data.cache import ImageCache, eval_preparer, fill_cache, train_preparer
from tlbuild.data.dataset import CachedEval, EvalTransform, ImageDataset, train_transform
from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample, Splits
from tlbuild.errors import UsageError
from tlbuild.fileio import atomic_path
from tlbuild.models.factory import cpu_state_dict
from tlbuild.recipe import DataConfig, EarlyStoppingConfig, StageConfig, TrainConfig
from tlbuild.train import distributed
from tlbuild.train.distributed import Dist, GlobalBatchShards
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


def select_device(spec: str, d: Dist | None = None) -> torch.device:
    """'auto' picks CUDA when present; an explicit 'cuda' without a GPU is a usage error.

    Under torchrun (`d`), each process takes its own GPU, cuda:LOCAL_RANK.
    """
    if d is not None:
        return distributed.device_for(spec, d)
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
    # Under torchrun the node's cores are shared by its processes (LOCAL_WORLD_SIZE of them).
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
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
    d: Dist | None = None,
) -> tuple[DataLoader, DataLoader, DataLoader, torch.Generator, DataLoader]:
    """Augmented training, plain training (probe), validation, and this rank's validation part.

    Under torchrun the training loader yields this rank's part of each global batch.
    """
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
    # BatchNorm cannot train on a batch of one; drop a ragged last batch when there is more.
    drop_last = len(train_ds) > cfg.batch_size
    if d is None:
        train = DataLoader(
            train_ds,
            shuffle=sampler is None,
            sampler=sampler,
            generator=gen,
            drop_last=drop_last,
            **common,
        )
    else:
        # The order a single process would draw (the same generator, seeded alike on every
        # rank), cut into the same global batches; this rank trains on its slice of each.
        order = sampler if sampler is not None else RandomSampler(train_ds, generator=gen)
        shards = GlobalBatchShards(order, cfg.batch_size, drop_last, d.rank, d.world)
        per_rank = {k: v for k, v in common.items() if k != "batch_size"}
        reseed = partial(distributed.reseed_worker, d.rank) if workers else None
        train = DataLoader(
            train_ds, batch_sampler=shards, generator=gen, worker_init_fn=reseed, **per_rank
        )
    # The training images as inference sees them (the probe's features), from the same cache.
    plain = ImageDataset(splits.train, EvalTransform(spec), train_cache)
    val_tf = CachedEval(spec) if val_cache is not None else EvalTransform(spec)
    val_ds = ImageDataset(splits.val, val_tf, val_cache)
    val = DataLoader(val_ds, shuffle=False, **common)
    part = val
    if d is not None:
        # Every validation image once over all ranks: no padding, which would count some twice.
        mine = Subset(val_ds, range(d.rank, len(val_ds), d.world))
        part = DataLoader(mine, shuffle=False, **common)
    return train, DataLoader(plain, shuffle=False, **common), val, gen, part


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
class Best:
    """The best candidate so far: its val loss, its epoch (-1: the linear probe), its weights."""

    val_loss: float = math.inf
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None


@dataclass
class TrainState:
    """Where training stands: everything `--resume` needs besides the model's own weights.

    Every field is plain data or tensors, so `to_checkpoint` gives a dict that
    `torch.load(..., weights_only=True)` reads back; `from_checkpoint` rebuilds the state.
    """

    stage: int = 0
    epoch_in_stage: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    stage_best: float = math.inf
    bad_epochs: int = 0
    stage_done: bool = False
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None  # linear-probe result (ProbeResult.to_dict)
    stage_lr: dict[str, float] = field(default_factory=dict)  # stage name -> its head lr
    lr_find: list[dict[str, Any]] = field(default_factory=list)  # curves of lr = "auto" stages

    def to_checkpoint(self) -> dict[str, Any]:
        """The state as a dict of plain data and tensors (the checkpoint's keys)."""
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        payload["best"] = {
            "val_loss": self.best.val_loss,
            "epoch": self.best.epoch,
            "state": self.best.state,
        }
        return payload

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """Rebuild from `to_checkpoint`'s dict; KeyError or TypeError when it is not one."""
        best = saved["best"]
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name != "best"})
        state.best = Best(float(best["val_loss"]), int(best["epoch"]), best["state"])
        return state

    def enter_stage(self, si: int) -> None:
        """Start stage `si` afresh: its epochs, early stopping and optimizer, not the history."""
        self.stage, self.epoch_in_stage = si, 0
        self.stage_best, self.bad_epochs, self.stage_done = math.inf, 0, False
        self.optimizer = self.scheduler = None

    def record_epoch(
        self, row: dict[str, Any], model: nn.Module, stopping: EarlyStoppingConfig
    ) -> bool:
        """Add an epoch's history row and update best and early stopping; True when best."""
        self.history.append(row)
        val_loss = row["val_loss"]
        is_best = val_loss < self.best.val_loss
        if is_best:
            self.best = Best(val_loss, row["epoch"], cpu_state_dict(model))
        if val_loss < self.stage_best - stopping.min_delta:
            self.stage_best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        self.stage_done = self.bad_epochs >= stopping.patience
        return is_best


@dataclass
class _Run:
    """What every step of one `fit` call shares: device, precision, loaders, loss, output."""

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
    console: Console
    ckpt_path: Path
    fingerprint: str
    dist: Dist | None = None  # torchrun's processes; None in a single process
    val_part: DataLoader | None = None  # this rank's share of the validation images
    net: nn.Module | None = None  # what a training step runs: `model`, or a DDP around it

    def __post_init__(self) -> None:
        if self.net is None:
            self.net = self.model

    @property
    def main(self) -> bool:
        """Whether this process writes: a single process, or rank 0."""
        return self.dist is None or self.dist.main

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Any:
        """One optimizer step; returns (loss, logits). A non-finite loss updates nothing.

        Under torchrun the loss returned is the mean over all ranks, so every rank skips the
        same steps (one skipping its backward alone would leave the others waiting in DDP's
        all-reduce) and the lr range test sees the same curve everywhere.
        """
        x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        assert self.net is not None
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            out = self.net(x)
            loss = self.criterion(out.float(), y)
        shown = loss if self.dist is None else distributed.mean_over_ranks(loss, self.dist.world)
        if not torch.isfinite(shown):
            return shown, out
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return shown, out

    def enter_stage(self, stage: StageConfig) -> None:
        """Under torchrun: freeze as `stage` does, then a new DDP over what trains now."""
        if self.dist is not None:
            apply_stage(self.model, stage, 1.0)
            self.net = distributed.wrap(self.model, self.device, self.net)

    def unwrap(self) -> None:
        """Drop the DDP wrapper and its hooks: the model leaves `fit` as a plain module."""
        distributed.unwrap(self.net)
        self.net = self.model

    def all_sum(self, *values: float) -> list[float]:
        """Sums over all ranks (the values themselves in a single process)."""
        if self.dist is None:
            return list(values)
        return distributed.all_sum(list(values), self.device)


def _memory_format(cfg: TrainConfig) -> torch.memory_format:
    # Channels-last pays on CPUs too: oneDNN's depthwise and 1x1 convolutions ran 1.2x faster
    # for a Lite0 training step at 128 px on a 2-core AVX2 machine without AVX-512.
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


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
    refuses a checkpoint written for other ones. Under torchrun every process calls it alike;
    rank 0 alone writes the checkpoint (distributed.py says how the processes agree).
    """
    d = distributed.join(cfg.device)
    device = select_device(cfg.device, d)
    if d is not None:
        distributed.check_world(cfg.batch_size, d.world, device)
    model.to(device, memory_format=_memory_format(cfg))
    # torch.use_deterministic_algorithms is not set: on CPU it made training 1.25x slower and
    # was not needed for same seed, same machine, same weights (tests/test_train.py checks it).
    fingerprint = _fingerprint(splits, cfg, data, spec, model_key)
    if d is not None:
        # The split is computed on every rank from the same files and seed; this checks it.
        distributed.check_same(fingerprint, "data, splits, recipe or backbone")
    state = _resume(model, cfg, ckpt_path, fingerprint, console, d) if resume else TrainState()
    synced = distributed.sync_batchnorm(model, device) if d is not None else {}
    # Other ranks keep their scratch copy of the decoded images out of the export folder.
    spill_dir = ckpt_path.parent if d is None or d.main else Path(tempfile.gettempdir())
    caches: tuple[ImageCache, ImageCache] | None = None
    run: _Run | None = None
    try:
        caches = build_caches(splits, spec, cfg, data, console, spill_dir)
        run = _make_run(
            model,
            splits,
            spec,
            cfg,
            data,
            device,
            caches,
            console=console,
            ckpt_path=ckpt_path,
            fingerprint=fingerprint,
            dist=d,
        )
        _probe(run, state)
        with _progress(console) as progress:
            for si in range(state.stage, len(cfg.stages)):
                _run_stage(run, si, state, progress)
    finally:
        if run is not None:
            run.unwrap()
        if caches is not None:
            for c in caches:
                c.close()
    distributed.undo_sync_batchnorm(model, synced)
    return _finish(model, state, device)


def _unresumable(path: Path) -> UsageError:
    return UsageError(
        f"--resume: {path} cannot be read as a training checkpoint (damaged, or written by "
        "another tlbuild version); run without --resume to start over"
    )


def _read_checkpoint(path: Path, fingerprint: str) -> tuple[TrainState, dict[str, Any]]:
    """The saved training state and model weights; a UsageError when they cannot be resumed."""
    # A damaged file fails in many ways (EOFError, RuntimeError, UnpicklingError, KeyError...).
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unresumable(path) from e
    if not isinstance(saved, dict):
        raise _unresumable(path)
    if saved.get("fingerprint") != fingerprint:
        raise UsageError(
            f"--resume: {path} was written for another recipe, dataset or backbone; "
            "run without --resume to start over"
        )
    try:
        return TrainState.from_checkpoint(saved), saved["model"]
    except (KeyError, TypeError, ValueError) as e:
        raise _unresumable(path) from e


def _load_resumable(path: Path, fingerprint: str) -> tuple[TrainState, dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; run without --resume")
    return _read_checkpoint(path, fingerprint)


def _resume(
    model: nn.Module,
    cfg: TrainConfig,
    ckpt_path: Path,
    fingerprint: str,
    console: Console,
    d: Dist | None = None,
) -> TrainState:
    """Load the checkpoint's weights into `model` and return its training state.

    Under torchrun rank 0 reads the file and sends it to the others, so the export folder
    need not be on a filesystem every node sees.
    """
    load = partial(_load_resumable, ckpt_path, fingerprint)
    state, weights = load() if d is None else distributed.on_main(load)
    model.load_state_dict(weights)
    console.print(
        f"Resuming after epoch {len(state.history)} "
        f"(stage '{cfg.stages[state.stage].name}', epoch {state.epoch_in_stage})"
    )
    return state


def _make_run(
    model: nn.Module,
    splits: Splits,
    spec: Preprocessing,
    cfg: TrainConfig,
    data: DataConfig,
    device: torch.device,
    caches: tuple[ImageCache, ImageCache] | None,
    *,
    console: Console,
    ckpt_path: Path,
    fingerprint: str,
    dist: Dist | None = None,
) -> _Run:
    """Loaders, loss and mixed precision for training `model` on `device`."""
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = (
        (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    )
    train_loader, plain_loader, val_loader, gen, val_part = _loaders(
        splits, spec, cfg, data, device, caches, dist
    )
    weight = _class_weights(splits.train, len(splits.classes)) if data.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(
        weight=weight.to(device) if weight is not None else None,
        label_smoothing=cfg.label_smoothing,
    )
    return _Run(
        model,
        cfg,
        device,
        amp_dtype,
        torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        _memory_format(cfg),
        criterion,
        train_loader,
        plain_loader,
        val_loader,
        gen,
        console,
        ckpt_path,
        fingerprint,
        dist,
        val_part,
    )


def _probe(run: _Run, state: TrainState) -> None:
    """Fit the linear probe on a fresh run when wanted; it becomes the first best candidate."""
    model, cfg = run.model, run.cfg
    # The probe also measures what a head alone reaches, for recipes without a head-only
    # stage (a few seconds: one forward pass, no backward).
    has_frozen_stage = any(s.unfreeze == 0 for s in cfg.stages)
    wanted = cfg.head_init == "probe" or not has_frozen_stage
    if wanted and not probe_supported(model):
        run.console.print(
            f"[yellow]No linear probe: {type(model.get_classifier()).__name__} is not a "
            "single linear head; the head starts from random weights.[/]"
        )
        wanted = False
    if not wanted or state.history:
        return
    head = model.get_classifier()  # type: ignore[operator]
    random_head = copy.deepcopy(head.state_dict())

    def fit_head() -> tuple[Any, dict[str, torch.Tensor]]:
        found = fit_probe(model, run.plain_loader, run.val_loader, run.device, run.memory_format)
        return found, cpu_state_dict(head)

    if run.dist is None:
        probe = fit_head()[0]
    else:
        # Rank 0 fits it on all the images (seconds) and sends the head to the others.
        probe, fitted = distributed.on_main(fit_head)
        head.load_state_dict(fitted)
    state.probe = probe.to_dict()
    # The probed model is a candidate like any epoch: if fine-tuning never beats its
    # validation loss, the frozen body with the fitted head is what ships.
    state.best = Best(probe.val_loss, -1, cpu_state_dict(model))
    if cfg.head_init != "probe":
        head.load_state_dict(random_head)
    run.console.print(
        f"Head alone on frozen pretrained features (linear probe): val accuracy "
        f"{probe.val_accuracy:.1%} ({probe.seconds:.1f}s)"
        + ("; fine-tuning starts from it" if cfg.head_init == "probe" else "")
    )


def _finish(model: nn.Module, state: TrainState, device: torch.device) -> TrainResult:
    """Load the best weights into `model`, move it to the CPU for export, and report."""
    if state.best.state is not None:
        model.load_state_dict(state.best.state)
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainResult(
        model,
        state.history,
        state.best.epoch,
        state.best.val_loss,
        str(device),
        probe=state.probe,
        lr_find=state.lr_find,
    )


def _stage_lr(run: _Run, stage: StageConfig, state: TrainState, progress: Progress) -> float:
    """The stage's head lr: as given, or found by the range test (once; kept for resume)."""
    if stage.name in state.stage_lr:
        return float(state.stage_lr[stage.name])
    lr = float(stage.lr) if stage.lr != "auto" else _range_test(run, stage, state, progress)
    state.stage_lr[stage.name] = lr
    return lr


def _range_test(run: _Run, stage: StageConfig, state: TrainState, progress: Progress) -> float:
    """Run the lr range test for `stage`; record its curve in `state` and return its choice."""
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
    if run.dist is not None:
        # Every rank saw the same all-reduced losses; rank 0's curve is the one kept all the same.
        found = distributed.broadcast(found)
    if found.steps < 3:
        raise UsageError(
            f"stage '{stage.name}': the learning-rate range test diverged within "
            f"{found.steps} step(s) even at lr 1e-6; check the data and labels, or give "
            "the stage a number for lr"
        )
    state.lr_find.append(found.to_dict())
    run.console.print(
        f"  lr range test ({found.steps} steps, valley rule): stage '{stage.name}' "
        f"lr = {found.chosen:.3g}"
    )
    return found.chosen


def _stage_optimizer(
    run: _Run, stage: StageConfig, lr: float, state: TrainState
) -> tuple[list[dict[str, Any]], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The stage's parameter groups, optimizer and schedule, restored from `state` if saved."""
    param_groups = apply_stage(run.model, stage, lr)
    optimizer = make_optimizer(param_groups, run.cfg)
    scheduler = make_scheduler(optimizer, run.cfg, stage.epochs, len(run.train_loader))
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None:
            run.scaler.load_state_dict(state.scaler)
    return param_groups, optimizer, scheduler


def _run_stage(run: _Run, si: int, state: TrainState, progress: Progress) -> None:
    """Train stage `si` from wherever `state` says it is, checkpointing every epoch."""
    cfg, model, console = run.cfg, run.model, run.console
    stage = cfg.stages[si]
    if si > state.stage:
        state.enter_stage(si)
    run.enter_stage(stage)
    lr = _stage_lr(run, stage, state, progress)
    param_groups, optimizer, scheduler = _stage_optimizer(run, stage, lr, state)
    trainable = sum(p.numel() for g in param_groups for p in g["params"])
    console.print(
        f"[bold]Stage {si + 1}/{len(cfg.stages)} '{stage.name}'[/]: "
        f"{trainable:,} trainable parameters, head lr {lr:g}"
        + (f", body lr {lr * stage.body_lr_mult:g}" if len(param_groups) > 1 else "")
    )
    for e in range(state.epoch_in_stage, stage.epochs):
        if state.stage_done:
            break
        t0 = time.perf_counter()
        row = _train_epoch(run, stage, e, len(state.history), optimizer, scheduler, progress)
        _validate(run, row, lr, optimizer, t0)
        if run.dist is not None:
            # The row decides best and early stopping: rank 0's, so every rank stops together.
            row = distributed.broadcast(row)
        mark = " [green]best[/]" if state.record_epoch(row, model, cfg.early_stopping) else ""
        state.epoch_in_stage = e + 1
        console.print(
            f"  epoch {row['epoch'] + 1:>2} [{stage.name}] train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} "
            f"acc {row['val_acc']:.3f} | {row['seconds']:.1f}s{mark}"
        )
        state.optimizer, state.scheduler = optimizer.state_dict(), scheduler.state_dict()
        state.scaler = run.scaler.state_dict() if run.scaler.is_enabled() else None
        # No barrier after it: a resumed run gets the file from rank 0 (see _resume).
        if run.main:
            save_checkpoint(run.ckpt_path, model, state, run.fingerprint)
        if state.stage_done:
            console.print(
                f"  early stop: no val-loss improvement for {cfg.early_stopping.patience} epoch(s)"
            )
    # Continue the next stage from the best weights so far, not from an overfit tail.
    if state.best.state is not None:
        model.load_state_dict(state.best.state)


def _train_epoch(
    run: _Run,
    stage: StageConfig,
    e: int,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    progress: Progress,
) -> dict[str, Any]:
    """One pass over the training data: epoch `e` of `stage`, `epoch` of the whole run."""
    # Seeding per epoch (not once) makes a resumed run draw the same augmentations
    # and batches as an uninterrupted one. The batches' generator is seeded alike on every
    # rank (the ranks share one order); the augmentations differ per rank (rank 0's are a
    # single process's).
    rank = run.dist.rank if run.dist is not None else 0
    torch.manual_seed(run.cfg.seed * 100_003 + epoch + 1_000_003 * rank)
    run.gen.manual_seed(run.cfg.seed * 100_003 + epoch)
    set_train_mode(run.model, stage)
    t0 = time.perf_counter()
    task = progress.add_task(
        f"{stage.name} {e + 1}/{stage.epochs}", total=len(run.train_loader), info=""
    )
    tot_loss, tot_correct, seen = 0.0, 0, 0
    world = run.dist.world if run.dist is not None else 1
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
        rate = seen * world / (time.perf_counter() - t0)
        progress.update(task, advance=1, info=f"loss {tot_loss / seen:.3f} {rate:.1f} img/s")
    progress.remove_task(task)
    if run.dist is not None:
        tot_loss, tot_correct, seen = run.all_sum(tot_loss, tot_correct, seen)
    return {
        "epoch": epoch,
        "stage": stage.name,
        "train_loss": tot_loss / max(1, seen),
        "train_acc": tot_correct / max(1, seen),
    }


def _validate(
    run: _Run, row: dict[str, Any], lr: float, optimizer: torch.optim.Optimizer, t0: float
) -> None:
    """Complete an epoch's history row: validation loss and accuracy, lrs, seconds since t0."""
    if run.dist is None:
        val_loss, val_logits, val_labels = evaluate(
            run.model, run.val_loader, run.device, run.amp_dtype, run.memory_format
        )
        val_acc = float((val_logits.argmax(1) == val_labels).mean())
    else:
        val_loss, val_acc = _validate_parts(run)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    row.update(
        val_loss=val_loss,
        val_acc=val_acc,
        stage_lr=lr,
        lr_head=lrs.get("head", 0.0),
        lr_body=lrs.get("body", 0.0),
        seconds=time.perf_counter() - t0,
    )


def _validate_parts(run: _Run) -> tuple[float, float]:
    """Validation loss and accuracy: each rank its share of the images, summed over ranks."""
    assert run.val_part is not None
    sums = [0.0, 0.0, 0.0]
    if len(run.val_part.dataset):  # type: ignore[arg-type]
        loss, logits, labels = evaluate(
            run.model, run.val_part, run.device, run.amp_dtype, run.memory_format
        )
        sums = [loss * len(labels), float((logits.argmax(1) == labels).sum()), len(labels)]
    loss_sum, correct, n = run.all_sum(*sums)
    return loss_sum / n, correct / n


def save_checkpoint(path: Path, model: nn.Module, state: TrainState, fingerprint: str) -> None:
    """Write everything needed to resume after this epoch, atomically.

    Only tensors and plain Python data, so resuming loads it with `weights_only=True`.
    """
    payload = state.to_checkpoint()
    payload["model"] = cpu_state_dict(model)
    payload["fingerprint"] = fingerprint
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
