"""Training in several processes (torchrun): the process group, batch sharding, DDP wrapping.

One rule runs through it: every decision that changes what the processes do next (the resumed
state, the probe, the range test's rate, each epoch's history row and so early stopping) is made
on rank 0 and broadcast, so the processes cannot drift apart and wait on different collectives.
Rank 0 alone writes files.

`train.batch_size` is the global batch: each of the W processes takes batch_size / W images of
every single-process batch (GlobalBatchShards), and DDP averages the gradients, so one optimizer
step sees the same images as in a single process and a recipe trains the same on 1 GPU or 8.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import Sampler

from tlbuild.errors import TlbuildError, UsageError
from tlbuild.train.device import select_device

T = TypeVar("T")

# Rank 0 works alone for a while between collectives (the linear probe, reading a checkpoint,
# hashing the data for the stage keys); the others wait that long without failing.
TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Dist:
    """This process's place among torchrun's: global rank, world size, rank on its node."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Rank 0: the process that decides, prints and writes."""
        return self.rank == 0


def from_env() -> Dist | None:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK when there are several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True in a single process and on rank 0: the process that writes."""
    d = from_env()
    return d is None or d.main


def join(spec: str) -> Dist | None:
    """Join torchrun's process group once (nccl on CUDA, gloo on CPU); None in one process."""
    d = from_env()
    if d is None:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        device = select_device(spec, d)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return d


def leave() -> None:
    """Destroy the process group if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_world(batch_size: int, world: int, device: torch.device) -> None:
    """The global batch must split evenly; on CPU each part needs 2 images for BatchNorm."""
    if batch_size % world:
        raise UsageError(
            f"train.batch_size = {batch_size} is the global batch and does not split evenly "
            f"over {world} processes; make it a multiple of {world}"
        )
    # On CUDA, SyncBatchNorm normalises over the global batch; on CPU each process's part alone.
    if device.type == "cpu" and batch_size // world < 2:
        raise UsageError(
            f"train.batch_size = {batch_size} over {world} processes leaves one image per "
            "process, too few for BatchNorm on CPU; raise batch_size or use fewer processes"
        )


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (others pass anything, typically None)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and give its result to every rank; its user error fails every rank.

    The other ranks would otherwise wait for a result that never comes (or until torchrun kills
    them), and report nothing.
    """
    import torch.distributed as dist

    if dist.get_rank() != 0:
        result = broadcast(None)
    else:
        try:
            result = broadcast(("ok", fn()))
        except TlbuildError as e:
            broadcast(("error", e))
            raise
    if result[0] == "error":
        raise result[1]
    return result[1]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over all ranks: the same number on every rank."""
    import torch.distributed as dist

    t = t.detach().float().clone()
    dist.all_reduce(t)
    return t / world


def check_same(value: str, what: str) -> None:
    """Fail on every rank when the ranks disagree on `value` (e.g. the data fingerprint)."""
    import torch.distributed as dist

    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, value)
    odd = [r for r, v in enumerate(seen) if v != seen[0]]
    if odd:
        raise UsageError(
            f"process(es) {', '.join(map(str, odd))} see other {what} than process 0; every "
            "node needs the same recipe, data (at the same path) and tlbuild version"
        )


class GlobalBatchShards(Sampler[list[int]]):
    """Rank `rank`'s part of each single-process batch.

    Every rank draws the same order from `sampler` (its generator is seeded identically on all
    ranks each epoch: that reseeding is what DistributedSampler.set_epoch does), groups it into
    batches of the global `batch_size` exactly as a single process would, and takes its contiguous
    slice of each. So the union of one step's parts is the single-process batch, and the class
    balance a WeightedRandomSampler draws is kept whatever the number of processes.
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, drop_last: bool, rank: int, world: int
    ) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.world = rank, world

    def _part(self, batch: list[int]) -> list[int]:
        # np.array_split's cut: a ragged last batch spreads its images as evenly as it can.
        k, m = divmod(len(batch), self.world)
        start = self.rank * k + min(self.rank, m)
        return batch[start : start + k + (self.rank < m)]

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield self._part(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._part(batch)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def reseed_worker(rank: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: workers of different ranks draw different augmentations.

    Workers are seeded from the loader's generator, which is the same on every rank (it also
    orders the batches); without this, rank r's k-th image would get rank 0's crop and flip.
    """
    torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)


def sync_batchnorm(model: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """On CUDA, swap BatchNorm layers for SyncBatchNorm in place; the originals, for undo.

    So BatchNorm that trains normalises over the global batch. Not on CPU: PyTorch's
    SyncBatchNorm runs on GPUs only; there each process normalises its own part, and DDP copies
    rank 0's running statistics to the others at every step. Layers a phase keeps in eval mode
    (frozen body, freeze_bn) use running statistics and never sync. timm's converter keeps the
    activation of its fused BatchNormAct layers (torch's own would drop it).
    """
    if device.type != "cuda":
        return {}
    from timm.layers import convert_sync_batchnorm

    originals = {
        name: m
        for name, m in model.named_modules()
        if name and isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    if convert_sync_batchnorm(model) is not model:  # only a bare BatchNorm is replaced whole
        raise TypeError("sync_batchnorm: the model itself is a BatchNorm layer")
    return originals


def undo_sync_batchnorm(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the original BatchNorm layers back, with the trained statistics and weights."""
    for name, orig in originals.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        synced = getattr(parent, attr)
        orig.load_state_dict(synced.state_dict())
        orig.train(synced.training)
        setattr(parent, attr, orig)


def unwrap(net: nn.Module | None) -> None:
    """Remove a DDP wrapper's autograd hooks from the parameters it shares with its module.

    Done before a wrapper is dropped: until it is garbage-collected, its reducer's hooks on the
    parameters would still fire in a later backward and start all-reduces of their own.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, DistributedDataParallel):
        net._remove_autograd_hooks()


def wrap(model: nn.Module, device: torch.device, old: nn.Module | None) -> nn.Module:
    """A new DDP over the parameters that train now (`old`, a DDP or None, is unhooked first).

    DDP fixes its parameter set when built, and the phases freeze and unfreeze layer groups:
    a new wrapper per phase all-reduces exactly what trains, where find_unused_parameters
    would search the graph every step and still reduce the frozen body's empty gradients.
    Every rank builds it at the same point (building broadcasts rank 0's weights and buffers).
    """
    from torch.nn.parallel import DistributedDataParallel

    unwrap(old)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


class WorkersFailed(TlbuildError):
    """The processes `--nproc-per-node` started failed; their own message is printed above."""

    def __init__(self, code: int, nproc: int) -> None:
        super().__init__(f"training in {nproc} processes failed (exit code {code}); see above")
        self.exit_code = code


def check_launch(batch_size: int, device_spec: str, nproc: int) -> None:
    """`--nproc-per-node N` before anything starts: N >= 1, a GPU each, the batch splits."""
    if nproc < 1:
        raise UsageError(f"--nproc-per-node {nproc}: give 1 or more processes")
    if from_env() is not None:
        raise UsageError(
            "--nproc-per-node starts torchrun, but this process already runs under it "
            f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')}); drop the option"
        )
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise UsageError(
                f'train.device = "{device_spec}" but no CUDA GPU is visible; use "auto" or "cpu"'
            )
        if nproc > 1 and ":" in device_spec:
            raise UsageError(
                f'train.device = "{device_spec}" names one GPU, but each process uses its own; '
                'use "cuda" or "auto"'
            )
        if nproc > gpus:
            raise UsageError(
                f"--nproc-per-node {nproc} but {gpus} GPU(s) are visible: one process per GPU"
            )
    check_world(batch_size, nproc, torch.device("cuda" if cuda else "cpu"))


def launch(args: list[str], nproc: int) -> float:
    """Run `python -m tlbuild ARGS` in `nproc` processes under torchrun here; seconds taken.

    WorkersFailed, with their exit code, when one fails.
    """
    import subprocess
    import sys
    import time

    env = dict(os.environ)
    # torchrun gives each process 1 thread (and says so); on CPU share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "tlbuild.train.torchrun", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "tlbuild", *args]
    t0 = time.perf_counter()
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code:
        raise WorkersFailed(code, nproc)
    return time.perf_counter() - t0
