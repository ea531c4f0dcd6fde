"""The device training runs on: the recipe's `train.device`, under torchrun one GPU per process."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tlbuild.errors import UsageError

if TYPE_CHECKING:
    from tlbuild.train.distributed import Dist


def select_device(spec: str, d: Dist | None = None) -> torch.device:
    """'auto' picks CUDA when present; an explicit 'cuda' without a GPU is a usage error.

    Under torchrun (`d`), each process takes its own GPU, cuda:LOCAL_RANK.
    """
    if d is not None:
        return _process_device(spec, d)
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


def _process_device(spec: str, d: Dist) -> torch.device:
    """One torchrun process's device: cuda:LOCAL_RANK when the recipe's is CUDA, else the CPU."""
    cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f'train.device = "{spec}" but no CUDA GPU is visible; use "auto" or "cpu"')
    if ":" in spec:
        raise UsageError(
            f'train.device = "{spec}" names one GPU, but each of the {d.world} processes uses '
            'its own (cuda:LOCAL_RANK); use "cuda" or "auto"'
        )
    if d.local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"process {d.rank} has LOCAL_RANK {d.local_rank} but only "
            f"{torch.cuda.device_count()} GPU(s) are visible; lower --nproc-per-node"
        )
    return torch.device("cuda", d.local_rank)
