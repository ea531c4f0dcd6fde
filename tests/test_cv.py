"""`tlbuild cv`: stratified seeded folds, out-of-fold scores, label errors, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import small_recipe
from tlbuild.cli import app
from tlbuild.cv.folds import assign_folds, inner_val
from tlbuild.cv.label_issues import find_label_issues
from tlbuild.data.scan import Sample

runner = CliRunner()
COLOURS = {"ok": (200, 200, 200), "red": (200, 30, 30), "blue": (30, 30, 200)}


def _samples(counts: list[int]) -> list[Sample]:
    return [Sample(Path(f"c{c}/{i}.png"), c) for c, n in enumerate(counts) for i in range(n)]


def test_folds_are_stratified_seeded_and_cover_every_image() -> None:
    samples = _samples([10, 7, 3])
    folds = assign_folds(samples, 3, seed=4)
    labels = np.array([s.label for s in samples])
    for c, n in enumerate([10, 7, 3]):
        per_fold = np.bincount(folds[labels == c], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == n
    assert np.array_equal(folds, assign_folds(samples, 3, seed=4))
    assert not np.array_equal(folds, assign_folds(samples, 3, seed=5))
    # Early stopping takes a stratified slice of the training folds, never a whole class.
    mask = inner_val(samples, 0.25, seed=0)
    assert all(0 < mask[labels == c].sum() < n for c, n in enumerate([10, 7, 3]))


def _noisy_probs(n: int, k: int, flipped: list[int], seed: int = 0) -> tuple[np.ndarray, ...]:
    """Labels and model probabilities where the model is right but some labels were flipped."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), truth] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = truth.copy()
    labels[flipped] = (truth[flipped] + 1) % k
    return labels, probs


def test_planted_label_errors_come_first_and_match_cleanlab() -> None:
    flipped = [3, 40, 77, 150]
    labels, probs = _noisy_probs(200, 4, flipped)
    found = find_label_issues(labels, probs)
    assert set(flipped) <= set(found[:8].tolist())
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    theirs = cleanlab_filter.find_label_issues(
        labels, probs, filter_by="confident_learning", return_indices_ranked_by="self_confidence"
    )
    assert found.tolist() == list(theirs)


def _colour_data(root: Path, per_class: int) -> list[str]:
    """Noisy flat colours (a pretrained body tells them apart at once) and two planted errors."""
    rng = np.random.default_rng(0)

    def img(rgb: tuple[int, int, int]) -> Image.Image:
        noise = rng.normal(0, 25, (32, 32, 3))
        return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8))

    for c, rgb in COLOURS.items():
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img(rgb).save(root / c / f"{c}_{i:02d}.png")
    img(COLOURS["red"]).save(root / "ok" / "planted_red.png")
    img(COLOURS["blue"]).save(root / "red" / "planted_blue.png")
    return ["ok/planted_red.png", "red/planted_blue.png"]


def _recipe(folder: Path, data: Path) -> Path:
    # The linear probe fits the head on frozen features (what finds colours); a short
    # low-lr phase after it gives each fold epochs to checkpoint and resume.
    train = """
[train]
batch_size = 8
head_init = "probe"
[[train.phases]]
name = "head"
epochs = 3
lr = 1e-4
"""
    return small_recipe(folder, data, "colours", train, size=48, data_extra='ok_class = "ok"')


@pytest.mark.slow
def test_cv_finds_planted_label_errors_and_resumes_where_it_was_killed(tmp_path: Path) -> None:
    planted = _colour_data(tmp_path / "data", per_class=9)
    recipe = _recipe(tmp_path, tmp_path / "data")
    cv_dir = tmp_path / "out" / "colours" / "cv"
    cmd = [sys.executable, "-m", "tlbuild", "cv", str(recipe), "--folds", "3"]
    # Killed once the second fold has checkpointed an epoch: the first fold is finished.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (cv_dir / "fold_1" / "last.pt").is_file():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (cv_dir / "fold_0.json").is_file() and not (cv_dir / "fold_2.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Fold 1/3: reused" in done.stdout
    assert "resuming from" in done.stdout  # fold 2 goes on from its last epoch
    # Every image scored once, by the fold that held it out.
    oof = pd.read_parquet(cv_dir / "cv_oof.parquet")
    assert len(oof) == 3 * 9 + 2 and oof.path.is_unique
    assert set(oof.fold) == {0, 1, 2}
    np.testing.assert_allclose(oof.filter(like="p_").sum(axis=1), 1.0, atol=1e-4)
    # The planted errors top the list, with their thumbnails in the report.
    top = oof.sort_values("issue_rank").dropna(subset=["issue_rank"]).path.head(2)
    assert sorted(Path(p).relative_to(tmp_path / "data").as_posix() for p in top) == sorted(planted)
    report = (cv_dir / "cv_report.md").read_text()
    assert "![1](label_issues/001.jpg)" in report and (cv_dir / "label_issues/001.jpg").is_file()
    summary = json.loads((cv_dir / "cv.json").read_text())["summary"]
    assert summary["accuracy"]["mean"] > 0.8 and "escape_rate" in summary
    # Nothing changed: every fold is reused, nothing trains.
    again = runner.invoke(app, ["cv", str(recipe), "--folds", "3"])
    assert again.exit_code == 0, again.output
    assert again.output.count("reused") >= 3 and "training on" not in again.output


def test_cv_mistakes_get_one_message(tmp_path: Path) -> None:
    _colour_data(tmp_path / "data", per_class=3)
    recipe = _recipe(tmp_path, tmp_path / "data")
    done = runner.invoke(app, ["cv", str(recipe), "--folds", "1"])
    assert done.exit_code == 2 and "at least 2 folds" in done.output
    done = runner.invoke(app, ["cv", str(recipe), "--folds", "5"])
    assert done.exit_code == 1 and "needs at least 5 per class" in done.output
    assert "Traceback" not in done.output


def test_cv_folds_and_the_train_stage_share_one_training_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from tests.conftest import run_stage
    from tlbuild.cv.run import run_cv
    from tlbuild.recipe import load_recipe
    from tlbuild.train.trainer import Trainer

    _colour_data(tmp_path / "data", 8)
    recipe = load_recipe(_recipe(tmp_path, tmp_path / "data"))
    reached: list[int] = []

    class Reached(Exception):
        pass

    def changed_once(self: Trainer):  # noqa: ANN202
        # One change to how a model is trained: both commands must see it.
        reached.append(len(self.settings.splits.train))
        raise Reached

    monkeypatch.setattr(Trainer, "fit", changed_once)
    with pytest.raises(Reached):
        run_stage("train", recipe, Console(quiet=True))
    with pytest.raises(Reached):
        run_cv(recipe, 2, Console(quiet=True), fresh=True)
    assert len(reached) == 2
