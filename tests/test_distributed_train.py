"""Training in several processes (torchrun; gloo on CPU): one process's steps, rank 0 writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch.utils.data import BatchSampler, RandomSampler, WeightedRandomSampler
from typer.testing import CliRunner

from tests.conftest import run_stage, small_recipe, tiny_recipe
from tlbuild.cli import app
from tlbuild.errors import UsageError
from tlbuild.recipe import load_recipe
from tlbuild.train import distributed
from tlbuild.train.device import select_device
from tlbuild.train.distributed import Dist, GlobalBatchShards

AUDIT_SITE = Path(__file__).parent / "rank_audit"

# No augmentation and no dropout: in the head-only phase (body frozen, BatchNorm in eval) two
# processes then compute the single process's steps exactly, up to float rounding. Early
# stopping with min_delta 10 stops each 3-epoch phase after its second epoch.
RECIPE = """dropout = 0.0
[train]
seed = 0
batch_size = 8
augment = { crop_scale = [1.0, 1.0], crop_ratio = [1.0, 1.0], hflip = 0.0 }
early_stopping = { patience = 1, min_delta = 10.0 }
[[train.phases]]
name = "head"
epochs = 3
lr = 3e-3
[[train.phases]]
name = "finetune"
epochs = 3
lr = 1e-3
unfreeze = 2
"""


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_each_step_splits_the_single_process_batch(world: int, weighted: bool) -> None:
    def order() -> Any:
        gen = torch.Generator().manual_seed(7)  # what every rank does each epoch
        if weighted:
            return WeightedRandomSampler([1.0, 3.0] * 10, 20, replacement=True, generator=gen)
        return RandomSampler(range(20), generator=gen)

    single = list(BatchSampler(order(), 8, drop_last=True))
    parts = [list(GlobalBatchShards(order(), 8, True, r, world)) for r in range(world)]
    assert all(
        len(p) == len(single) == len(GlobalBatchShards(order(), 8, True, 0, world)) for p in parts
    )
    for step, batch in enumerate(single):
        assert [i for p in parts for i in p[step]] == batch
        assert {len(p[step]) for p in parts} == {8 // world}


def test_a_kept_ragged_batch_is_spread_over_the_ranks() -> None:
    parts = [list(GlobalBatchShards(range(5), 8, False, r, 2)) for r in range(2)]
    assert parts == [[[0, 1, 2]], [[3, 4]]]


def test_launch_and_device_errors_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="give 1 or more"):
        distributed.check_launch(8, "cpu", 0)
    with pytest.raises(UsageError, match="multiple of 3"):
        distributed.check_launch(8, "cpu", 3)
    with pytest.raises(UsageError, match="one image per process"):
        distributed.check_launch(2, "cpu", 2)
    distributed.check_launch(8, "cpu", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        distributed.check_launch(8, "cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="1 GPU"):
        distributed.check_launch(8, "auto", 2)
    with pytest.raises(UsageError, match="names one GPU"):
        select_device("cuda:1", Dist(1, 2, 1))
    with pytest.raises(UsageError, match="LOCAL_RANK 1"):
        select_device("cuda", Dist(1, 2, 1))
    assert select_device("cpu", Dist(1, 2, 1)) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="already runs under it"):
        distributed.check_launch(8, "cpu", 2)


def test_nproc_option_is_checked_before_launching(tiny_data: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_data)
    for command in ("train", "run"):
        res = CliRunner().invoke(app, [command, str(recipe), "--nproc-per-node", "0"])
        assert res.exit_code == 2 and "give 1 or more processes" in res.output
    assert not (tmp_path / "out").exists()


def test_sync_batchnorm_is_undone_with_the_trained_state() -> None:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    kinds = [type(m) for m in model.modules()]
    originals = distributed.sync_batchnorm(model, torch.device("cuda"))  # converting needs no GPU
    assert originals and not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(synced) == len(originals)
    synced[0].running_mean.add_(1.0)  # as training would move it
    distributed.undo_sync_batchnorm(model, originals)
    assert [type(m) for m in model.modules()] == kinds
    assert not torch.equal(model(x), before)  # the moved statistics came back with the layer
    assert distributed.sync_batchnorm(model, torch.device("cpu")) == {}


def test_ranks_agree_and_rank0_errors_reach_every_rank(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from tests.rank_audit.collectives import collectives

    # A small module for the children to import: spawn re-imports the function's module.
    mp.spawn(collectives, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = eval((tmp_path / f"{rank}.txt").read_text())  # noqa: S307 - our own repr
        assert got["sum"] == [2.0, 1.0] and got["mean"] == 0.5
        assert got["from0"] == "rank 0" and got["main"] == 0
        assert got["error"] == "bad on rank 0"
        assert "process(es) 1 see other data" in got["differ"]


def _launch(
    args: list[str], cwd: Path, audit: Path, torchrun: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """`tlbuild ARGS` in a subprocess (or under torchrun with 2 processes), auditing the ranks."""
    audit.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(AUDIT_SITE), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, "TLBUILD_TEST_AUDIT": str(audit), **env}
    cmd = [sys.executable, "-m", "tlbuild", *args]
    if torchrun:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        full_env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, check=False)


def _log(audit: Path, kind: str, rank: int) -> list[str]:
    path = audit / f"{kind}.{rank}.log"
    return path.read_text().split() if path.exists() else []


def _history(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "history.csv").open()))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def two_process_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tlbuild train RECIPE --nproc-per-node 2`; its folder (recipe, out/, audit/)."""
    folder = tmp_path_factory.mktemp("two")
    recipe = small_recipe(folder, tiny_data, "two", RECIPE, size=64)
    done = _launch(["train", str(recipe), "--nproc-per-node", "2"], folder, folder / "audit")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_two_processes_train_like_one_and_only_rank0_writes(
    two_process_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = two_process_run / "out" / "two"
    one = run_stage("train", load_recipe(small_recipe(tmp_path, tiny_data, "one", RECIPE, size=64)))
    h1, h2 = _history(tmp_path / "out" / "one"), _history(out)
    # Early stopping ended each phase after 2 of its 3 epochs, on both ranks alike.
    assert [r["stage"] for r in h2] == ["head", "head", "finetune", "finetune"]
    assert _log(two_process_run / "audit", "epochs", 0) == ["0", "1", "2", "3"]
    assert _log(two_process_run / "audit", "epochs", 1) == ["0", "1", "2", "3"]
    # Head-only epochs: the same images per step, gradients averaged -> the same numbers.
    for a, b in zip(h1[:2], h2[:2], strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key
    # Fine-tuning trains BatchNorm, on CPU over each process's 4 images instead of 8, so the
    # runs part a little: within 2 of the 8 validation images, and 25% in loss.
    assert abs(float(h1[-1]["val_acc"]) - float(h2[-1]["val_acc"])) <= 0.25
    assert float(h2[-1]["val_loss"]) == pytest.approx(float(h1[-1]["val_loss"]), rel=0.25)
    assert one.metrics["val"]["images"] == 8
    # Rank 0 wrote each file; rank 1 wrote nothing at all.
    written = {
        Path(p).relative_to(out).as_posix() for p in _log(two_process_run / "audit", "writes", 0)
    }
    assert {
        "model.pt",
        "checkpoints/last.pt",
        "history.csv",
        "metrics.json",
        "splits.json",
        "build_state.json",
        "training_curves.png",
        "confusion_val.png",
    } <= written
    assert not (two_process_run / "audit" / "writes.1.log").exists()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # Besides the files, only the folder's lock (rank 0's command holds it: folder_lock.py).
    assert files == sorted({*written, ".tlbuild.lock"})


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_weights(
    two_process_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    recipe = small_recipe(tmp_path, tiny_data, "two", RECIPE, size=64)
    out = tmp_path / "out" / "two"
    # `run` under torchrun itself; rank 0 dies after its first checkpoint (epoch 1 of phase 1).
    killed = _launch(
        ["run", str(recipe)],
        tmp_path,
        tmp_path / "killed",
        torchrun=True,
        TLBUILD_TEST_DIE_AFTER_SAVES="1",
    )
    assert killed.returncode != 0 and not (out / "model.pt").exists()
    assert _log(tmp_path / "killed", "writes", 1) == []
    resumed = _launch(
        ["train", str(recipe), "--resume", "--nproc-per-node", "2"], tmp_path, tmp_path / "resumed"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _log(tmp_path / "resumed", "epochs", 1) == ["1", "2", "3"]
    assert _log(tmp_path / "resumed", "writes", 1) == []
    w, ref = _weights(out), _weights(two_process_run / "out" / "two")
    assert all(torch.equal(w[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_run_hands_a_stale_train_stage_to_the_launcher(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlbuild import runner

    monkeypatch.setattr(runner, "STAGES", runner.STAGES[:1])  # train alone
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_data))
    launched: list[str] = []

    def launch(stage: Any) -> float:
        # What the torchrun children do: `tlbuild train`, recorded by their rank 0.
        launched.append(stage.name)
        runner.run_one(recipe, Console(quiet=True), stage.name)
        return 1.0

    first = runner.run(recipe, Console(quiet=True), launch=launch)
    assert launched == ["train"] and [(s.stage, s.action) for s in first.stages] == [
        ("train", "ran")
    ]
    again = runner.run(recipe, Console(quiet=True), launch=launch)
    assert launched == ["train"] and again.stages[0].action == "reused"
