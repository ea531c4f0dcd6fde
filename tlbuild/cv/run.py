"""`tlbuild cv`: K-fold cross-validation with the recipe's training, out-of-fold probabilities
for every image, and the label errors they point at.

Every labelled image (train, val and test splits alike) is scored by the one fold model that
never saw it. Inside each fold a stratified slice of the training folds decides early stopping,
so the scored fold chooses nothing. Each finished fold is kept in `<export>/cv/` under a key
of the settings and its exact images: an unchanged fold is reused, a fold that was interrupted
resumes from its last epoch checkpoint, and a changed recipe or dataset retrains what changed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from tlbuild.cv.folds import assign_folds, fold_key, inner_val
from tlbuild.cv.label_issues import find_label_issues
from tlbuild.data.scan import Sample, Splits
from tlbuild.errors import DataError, UsageError
from tlbuild.fileio import atomic_path, write_json
from tlbuild.recipe import Recipe

CV_DIR = "cv"
FORMAT = "tlbuild.cv/1"


@dataclass
class FoldResult:
    """One fold: its scores on the images it held out, and whether it was reused."""

    index: int
    key: str
    metrics: dict[str, Any]
    seconds: float
    reused: bool


@dataclass
class CVResult:
    """Every image with its fold and out-of-fold probabilities; the folds; the label issues."""

    out: Path
    classes: list[str]
    samples: list[Sample]
    split_of: list[str]
    folds: np.ndarray
    probs: np.ndarray
    fold_results: list[FoldResult]
    issues: np.ndarray
    ok_class: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def _settings(recipe: Recipe, k: int) -> dict[str, Any]:
    # What decides a fold's model besides its images; paths are left out (the images are
    # keyed one by one), so moving the dataset folder does not retrain.
    data = recipe.data.model_dump(mode="json", exclude={"root", "train", "val", "test", "workers"})
    return {
        "format": FORMAT,
        "folds": k,
        "model": recipe.model.model_dump(mode="json"),
        # Under the keys folds were recorded with before phases were named so: still reused.
        "train": recipe.train.stable_json(),
        "data": data,
    }


def _check(samples: list[Sample], classes: list[str], k: int) -> None:
    if k < 2:
        raise UsageError(f"--folds {k}: cross-validation needs at least 2 folds")
    counts = np.bincount([s.label for s in samples], minlength=len(classes))
    # Stratified folds deal each class round-robin: a class smaller than k leaves a fold
    # without it, and that fold's scores say nothing about the class.
    for c, n in zip(classes, counts, strict=True):
        if n < k:
            raise DataError(
                f"class '{c}' has {n} image(s); --folds {k} needs at least {k} per class "
                "(one in every fold): add images or use fewer folds"
            )


def _fold_paths(cv: Path, f: int) -> tuple[Path, Path, Path]:
    return cv / f"fold_{f}.json", cv / f"fold_{f}.npz", cv / f"fold_{f}"


def _reusable(cv: Path, f: int, key: str) -> FoldResult | None:
    meta_path, probs_path, _ = _fold_paths(cv, f)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        with np.load(probs_path) as z:
            z["probs"]  # a damaged archive fails here, not later
    except (OSError, ValueError, KeyError):
        return None
    return FoldResult(f, key, meta["metrics"], meta["seconds"], reused=True)


@dataclass
class _Fold:
    """One fold: the images it trains on, stops early on, and scores (at `held_idx`)."""

    index: int
    train: list[Sample]
    val: list[Sample]
    held: list[Sample]
    held_idx: np.ndarray
    key: str


def _fold(
    recipe: Recipe, samples: list[Sample], folds: np.ndarray, f: int, settings: dict[str, Any]
) -> _Fold:
    """Fold `f`'s images and key; a stratified slice of the training folds stops early."""
    held_idx = np.flatnonzero(folds == f)
    pool_idx = np.flatnonzero(folds != f)
    pool = [samples[i] for i in pool_idx]
    stop = inner_val(pool, recipe.data.split.val, recipe.data.split.seed + f)
    train = [s for s, m in zip(pool, stop, strict=True) if not m]
    val = [s for s, m in zip(pool, stop, strict=True) if m]
    held = [samples[i] for i in held_idx]
    return _Fold(f, train, val, held, held_idx, fold_key(settings, train + val, held))


def _train_fold(
    recipe: Recipe, classes: list[str], fold: _Fold, work: Path, console: Console
) -> np.ndarray:
    """Fine-tune on the fold's `train` (early stopping on `val`); probabilities for `held`."""
    from tlbuild.train.events import RichEvents
    from tlbuild.train.from_recipe import train_from_recipe
    from tlbuild.train.validate import evaluate_samples

    ckpt = work / "last.pt"
    key_file = work / "key"
    resume = ckpt.is_file() and key_file.is_file() and key_file.read_text() == fold.key
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        key_file.write_text(fold.key)
    else:
        console.print(f"  resuming from {ckpt}")
    try:
        splits = Splits(classes, fold.train, fold.val)
        built, result = train_from_recipe(recipe, splits, ckpt, RichEvents(console), resume)
    except UsageError:
        if not resume:
            raise
        # A checkpoint cut short by the interruption itself: this fold starts over.
        console.print(f"[yellow]  {ckpt} cannot be resumed; this fold starts over[/]")
        ckpt.unlink(missing_ok=True)
        return _train_fold(recipe, classes, fold, work, console)
    device = torch.device(result.device)
    _, logits, _ = evaluate_samples(result.model, fold.held, built.preprocessing, device, 64)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def _run_fold(
    recipe: Recipe, classes: list[str], fold: _Fold, cv: Path, console: Console
) -> tuple[FoldResult, np.ndarray]:
    """Train and score one fold and record it in `cv`; its result and probabilities."""
    from tlbuild.train.metrics import classification_metrics

    meta_path, probs_path, work = _fold_paths(cv, fold.index)
    t0 = time.perf_counter()
    fold_probs = _train_fold(recipe, classes, fold, work, console)
    seconds = time.perf_counter() - t0
    labels = np.array([s.label for s in fold.held])
    metrics = classification_metrics(labels, fold_probs.argmax(1), classes, recipe.data.ok_class)
    # The probabilities first, then the record that names them: a fold is done only
    # when its record exists, and the record is what a later run checks.
    with atomic_path(probs_path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, probs=fold_probs, index=fold.held_idx)
    write_json(meta_path, {"key": fold.key, "metrics": metrics, "seconds": seconds})
    shutil.rmtree(work, ignore_errors=True)  # checkpoints are large; the fold is recorded
    return FoldResult(fold.index, fold.key, metrics, seconds, reused=False), fold_probs


def run_cv(recipe: Recipe, k: int, console: Console, fresh: bool = False) -> CVResult:
    """Cross-validate `recipe` with `k` folds into <export>/cv/; finished folds are reused."""
    from tlbuild.data.load import load_data

    splits = load_data(recipe, console)
    classes = splits.classes
    samples = splits.train + splits.val + splits.test
    split_of = ["train"] * len(splits.train) + ["val"] * len(splits.val)
    split_of += ["test"] * len(splits.test)
    _check(samples, classes, k)
    folds = assign_folds(samples, k, recipe.data.split.seed)
    cv = recipe.out_dir / CV_DIR
    cv.mkdir(parents=True, exist_ok=True)
    settings = _settings(recipe, k)
    probs = np.zeros((len(samples), len(classes)), dtype=np.float32)
    results: list[FoldResult] = []
    for f in range(k):
        fold = _fold(recipe, samples, folds, f, settings)
        found = None if fresh else _reusable(cv, f, fold.key)
        if found is not None:
            console.print(f"Fold {f + 1}/{k}: reused (same settings and images)")
            with np.load(_fold_paths(cv, f)[1]) as z:
                probs[fold.held_idx] = z["probs"]
        else:
            console.print(
                f"Fold {f + 1}/{k}: training on {len(fold.train)} images ({len(fold.val)} for "
                f"early stopping), scoring {len(fold.held)}"
            )
            found, fold_probs = _run_fold(recipe, classes, fold, cv, console)
            probs[fold.held_idx] = fold_probs
        results.append(found)
    labels = np.array([s.label for s in samples])
    out = CVResult(
        cv,
        classes,
        samples,
        split_of,
        folds,
        probs,
        results,
        find_label_issues(labels, probs),
        recipe.data.ok_class,
    )
    out.summary = summarise(out)
    return out


def summarise(r: CVResult) -> dict[str, Any]:
    """Mean and spread (sample standard deviation) across folds of the headline metrics."""
    keys = ["accuracy", "macro_f1"]
    if r.ok_class is not None:
        keys += ["escape_rate", "false_reject_rate"]
    out: dict[str, Any] = {"folds": len(r.fold_results), "images": len(r.samples)}
    for key in keys:
        values = [fr.metrics.get(key) for fr in r.fold_results]
        values = [v for v in values if v is not None]
        if values:
            out[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)),
                "max": float(np.max(values)),
            }
    out["label_issues"] = len(r.issues)
    return out
