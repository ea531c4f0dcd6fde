"""The body of test_ranks_agree_and_rank0_errors_reach_every_rank's two spawned processes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tlbuild.errors import UsageError
from tlbuild.train import distributed


def collectives(rank: int, world: int, port: int, out: str) -> None:
    """One of two processes: the helpers that keep the ranks agreeing."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    distributed.join("cpu")
    results = {
        "sum": distributed.all_sum([1.0, float(rank)], torch.device("cpu")),
        "mean": float(distributed.mean_over_ranks(torch.tensor(float(rank)), world)),
        "from0": distributed.broadcast(f"rank {rank}"),
        "main": distributed.on_main(lambda: rank),
    }
    try:
        distributed.on_main(lambda: (_ for _ in ()).throw(UsageError("bad on rank 0")))
    except UsageError as e:
        results["error"] = str(e)
    try:
        distributed.check_same("same" if rank == 0 else "other", "data")
    except UsageError as e:
        results["differ"] = str(e)
    distributed.leave()
    Path(out, f"{rank}.txt").write_text(repr(results))
