"""Heat maps of validation images for the report: per class, misclassified first, then correct.

Which images are misclassified comes from eval_logits.json, the logits training recorded for
metrics.json, so "N of M misclassified" agrees with the confusion matrix and only the images
shown go through the network again: the cost is bounded by `explain.max_images`, not by the
size of the validation split. One grid PNG per class (`heatmaps_<i>_<class>.png`) and
heatmaps.json, which report.md reads without loading PyTorch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from tlbuild.artifacts import MODEL_PT
from tlbuild.explain.gradcam import NoFeatureMap
from tlbuild.explain.maps import FileMap, explain_files, overlay_of, pick_device
from tlbuild.explain.overlay import Tile, save_grid, tile_title
from tlbuild.explain.summary import HEATMAP_PNGS, HEATMAPS_JSON, shown_line
from tlbuild.fileio import write_json
from tlbuild.models.checkpoint import TrainedModel, load_trained
from tlbuild.recipe import ExplainConfig
from tlbuild.train.eval_logits import read_eval_logits

FORMAT = "tlbuild.heatmaps/1"
SEED = 0  # which correct images are drawn: the same ones every build of the same model


@dataclass(frozen=True)
class Chosen:
    """The validation images one class's grid shows, and how many mistakes it had."""

    misclassified: list[int]  # indices, most confident mistake first
    correct: list[int]
    total_misclassified: int
    images: int


def choose(
    true: np.ndarray, probs: np.ndarray, cls: int, cfg: ExplainConfig, seed: int = SEED
) -> Chosen:
    """Up to `correct_per_class` correct images (a seeded sample) and misclassified ones
    (most confident first) filling the rest of `max_images`, for class `cls`."""
    pred = probs.argmax(1)
    mine = np.flatnonzero(true == cls)
    wrong = mine[pred[mine] != cls]
    right = mine[pred[mine] == cls]
    n_right = min(cfg.correct_per_class, len(right), cfg.max_images)
    rng = np.random.default_rng(seed + cls)
    correct = sorted(rng.choice(right, n_right, replace=False).tolist()) if n_right else []
    # Reserving the correct ones keeps a reference in view even when mistakes abound.
    order = wrong[np.argsort(-probs[wrong].max(1), kind="stable")]
    mis = order[: cfg.max_images - n_right].tolist()
    return Chosen(mis, correct, len(wrong), len(mine))


def _png_name(i: int, cls: str) -> str:
    return f"heatmaps_{i}_{re.sub(r'[^A-Za-z0-9._-]+', '-', cls)}.png"


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _class_entry(cls: str, c: Chosen) -> dict[str, Any]:
    return {
        "class": cls,
        "images": c.images,
        "misclassified": c.total_misclassified,
        "misclassified_shown": len(c.misclassified),
        "correct_shown": len(c.correct),
        "png": None,
        "tiles": [],
    }


def _render(
    tm: TrainedModel, maps: dict[int, FileMap], true: np.ndarray, probs: np.ndarray, idx: list[int]
) -> tuple[list[Tile], list[int]]:
    """Tiles for the readable ones among `idx`, and which indices they are."""
    tiles, kept = [], []
    for i in idx:
        if maps[i].error is not None:
            continue
        p, t = int(probs[i].argmax()), int(true[i])
        title = tile_title(tm.classes[p], float(probs[i, p]), tm.classes[t], maps[i].flat)
        tiles.append(Tile(overlay_of(maps[i], tm.preprocessing), title, wrong=p != t))
        kept.append(i)
    return tiles, kept


def explain_validation(out: Path, cfg: ExplainConfig, console: Console) -> dict[str, Any]:
    """Write one grid PNG per class with images and heatmaps.json; returns what the JSON says."""
    for old in out.glob(HEATMAP_PNGS):  # a class renamed or emptied must not leave its grid
        old.unlink()
    tm = load_trained(out / MODEL_PT)
    val = read_eval_logits(out, tm.classes).get("val")
    true = val.labels if val else np.zeros(0, np.int64)
    probs = _softmax(val.logits) if val else np.zeros((0, len(tm.classes)), np.float32)
    chosen = [choose(true, probs, ci, cfg) for ci in range(len(tm.classes))]
    wanted = sorted({i for c in chosen for i in c.misclassified + c.correct})
    result: dict[str, Any] = {
        "format": FORMAT,
        "method": "Grad-CAM of the predicted class on the last feature map (forward_features)",
        "settings": cfg.model_dump(),
        "classes": [],
        "unreadable": [],
    }
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("Heat maps of validation images", total=len(wanted))
            found = explain_files(
                tm.model,
                tm.preprocessing,
                [val.paths[i] for i in wanted] if val else [],
                pick_device(),
                lambda n: progress.advance(task, n),
                targets=[int(probs[i].argmax()) for i in wanted],
            )
    except NoFeatureMap as e:
        result["skipped"] = str(e)
        write_json(out / HEATMAPS_JSON, result)
        return result
    maps = dict(zip(wanted, found, strict=True))
    # A file moved or deleted since training: left out of its grid and listed.
    result["unreadable"] = [[m.path, m.error] for m in found if m.error is not None]
    for ci, (cls, c) in enumerate(zip(tm.classes, chosen, strict=True)):
        entry = _class_entry(cls, c)
        tiles, kept = _render(tm, maps, true, probs, c.misclassified + c.correct)
        entry["misclassified_shown"] = len(set(kept) & set(c.misclassified))
        entry["correct_shown"] = len(set(kept) & set(c.correct))
        if tiles:
            entry["png"] = _png_name(ci, cls)
            heading = (
                f"{cls}: {shown_line(entry)}. Grad-CAM of the predicted class, red: most evidence"
            )
            save_grid(tiles, out / entry["png"], heading)
            entry["tiles"] = [
                {"path": maps[i].path, "title": t.title, "wrong": t.wrong}
                for i, t in zip(kept, tiles, strict=True)
            ]
        result["classes"].append(entry)
    write_json(out / HEATMAPS_JSON, result)
    return result
