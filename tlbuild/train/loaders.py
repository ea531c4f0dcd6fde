"""Training's data: the decode-once image cache, the data loaders, and under torchrun each
process's part of every batch."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, Subset, WeightedRandomSampler

from tlbuild.data.cache import ImageCache, eval_preparer, fill_cache, train_preparer
from tlbuild.data.dataset import CachedEval, EvalTransform, ImageDataset, train_transform
from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample, Splits
from tlbuild.recipe import DataConfig, TrainConfig
from tlbuild.train import distributed
from tlbuild.train.distributed import Dist, GlobalBatchShards
from tlbuild.train.events import TrainEvents

Caches = tuple[ImageCache, ImageCache]  # training images, validation images


@dataclass
class Loaders:
    """Augmented training, plain training (the probe's features), validation, the generator
    that orders the training batches, and this process's part of the validation images."""

    train: DataLoader
    plain: DataLoader
    val: DataLoader
    gen: torch.Generator
    val_part: DataLoader  # `val` itself in a single process


def worker_count(cfg: DataConfig, device: torch.device) -> int:
    """Data-loading processes: `data.workers`, or for "auto" what the cores allow."""
    if cfg.workers != "auto":
        return int(cfg.workers)
    # Under torchrun the node's cores are shared by its processes (LOCAL_WORLD_SIZE of them).
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    # On a 2-core CPU box the training math already uses both cores; a decoding worker would
    # only compete with it. With a GPU the CPU does nothing but decode, so use the cores.
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 2)
    return min(8, max(1, cores - 1))


def make_loaders(
    splits: Splits,
    spec: Preprocessing,
    cfg: TrainConfig,
    data: DataConfig,
    device: torch.device,
    caches: Caches | None,
    d: Dist | None = None,
) -> Loaders:
    """The loaders of one training run; under torchrun the training loader yields this rank's
    part of each global batch."""
    gen = torch.Generator()
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": worker_count(data, device),
        "pin_memory": device.type == "cuda",
        # Not persistent: workers are re-created (and re-seeded from `gen`) every epoch, which
        # is what makes a resumed run draw the same augmentations as an uninterrupted one.
        "persistent_workers": False,
    }
    train_cache, val_cache = caches if caches is not None else (None, None)
    train_ds = ImageDataset(splits.train, train_transform(spec, cfg.augment), train_cache)
    sampler = _balanced(splits, gen) if data.balance == "sampler" else None
    train = _train_loader(train_ds, sampler, gen, common, d)
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
    return Loaders(train, DataLoader(plain, shuffle=False, **common), val, gen, part)


def _balanced(splits: Splits, gen: torch.Generator) -> WeightedRandomSampler:
    """Draws every class equally often (data.balance = "sampler")."""
    counts = np.bincount([s.label for s in splits.train], minlength=len(splits.classes))
    weights = [1.0 / counts[s.label] for s in splits.train]
    return WeightedRandomSampler(weights, len(weights), replacement=True, generator=gen)


def _train_loader(
    train_ds: ImageDataset,
    sampler: Sampler[int] | None,
    gen: torch.Generator,
    common: dict[str, Any],
    d: Dist | None,
) -> DataLoader:
    """Shuffled (or `sampler`-drawn) augmented batches; under torchrun this rank's parts."""
    batch_size = common["batch_size"]
    # BatchNorm cannot train on a batch of one; drop a ragged last batch when there is more.
    drop_last = len(train_ds) > batch_size
    if d is None:
        return DataLoader(
            train_ds,
            shuffle=sampler is None,
            sampler=sampler,
            generator=gen,
            drop_last=drop_last,
            **common,
        )
    # The order a single process would draw (the same generator, seeded alike on every
    # rank), cut into the same global batches; this rank trains on its slice of each.
    order = sampler if sampler is not None else RandomSampler(train_ds, generator=gen)
    shards = GlobalBatchShards(order, batch_size, drop_last, d.rank, d.world)
    per_rank = {k: v for k, v in common.items() if k != "batch_size"}
    workers = common["num_workers"]
    reseed = partial(distributed.reseed_worker, d.rank) if workers else None
    return DataLoader(
        train_ds, batch_sampler=shards, generator=gen, worker_init_fn=reseed, **per_rank
    )


def class_weights(samples: list[Sample], k: int) -> torch.Tensor:
    """Per-class loss weights inverse to the class counts (data.balance = "loss")."""
    counts = np.bincount([s.label for s in samples], minlength=k).astype(float)
    return torch.tensor(counts.sum() / (k * np.maximum(counts, 1)), dtype=torch.float32)


def build_caches(
    splits: Splits,
    spec: Preprocessing,
    cfg: TrainConfig,
    data: DataConfig,
    events: TrainEvents,
    spill_dir: Path,
) -> Caches | None:
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
        _fill_caches(splits, spec, (train_cache, val_cache), prep, events)
    except BaseException:
        train_cache.close()
        val_cache.close()
        raise
    events.on_decoded(
        len(splits.train) + len(splits.val),
        train_cache.ram_used + val_cache.ram_used,
        train_cache.spilled_bytes + val_cache.spilled_bytes,
        time.perf_counter() - t0,
    )
    return train_cache, val_cache


def _fill_caches(
    splits: Splits, spec: Preprocessing, caches: Caches, prep: Any, events: TrainEvents
) -> None:
    train_cache, val_cache = caches
    with events.live():
        events.on_task_start("decoding images once", len(splits.train) + len(splits.val))
        fill_cache(train_cache, [s.path for s in splits.train], prep, events.on_task_step)
        train_cache.seal()
        val_cache.ram_bytes = max(0, train_cache.ram_bytes - train_cache.ram_used)
        val_prep = eval_preparer(spec)
        fill_cache(val_cache, [s.path for s in splits.val], val_prep, events.on_task_step)
        val_cache.seal()
        events.on_task_end()
