"""`tlbuild explain IMAGE... --model DIR`: a heat-map PNG per image and a Parquet row for each.

Needs the PyTorch model (model.pt): Grad-CAM differentiates the network, which ONNX Runtime and
TensorRT cannot, so a device copy of an export folder is refused with a clear message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from tlbuild.artifacts import MODEL_PT
from tlbuild.classify.inputs import InputWalker, check_inputs
from tlbuild.classify.storage import is_url
from tlbuild.data.extensions import IMAGE_EXTENSIONS
from tlbuild.errors import UsageError
from tlbuild.explain.maps import FileMap, explain_files, overlay_of, pick_device
from tlbuild.explain.overlay import Tile, save_grid, save_tile, tile_title
from tlbuild.fileio import write_parquet
from tlbuild.models.checkpoint import TrainedModel, load_trained

RESULTS_PARQUET = "heatmaps.parquet"
GRID_PNG = "grid.png"
# Column -> fastparquet object encoding (the numeric `score` is typed by its dtype).
COLUMNS = {
    "path": "utf8",
    "label": "utf8",
    "score": "",
    "topk_labels": "json",
    "topk_scores": "json",
    "heatmap": "utf8",
    "error": "utf8",
}


@dataclass
class ExplainRun:
    """What `explain_images` wrote, and what it left out."""

    out: Path
    parquet: Path
    found: int  # image files the inputs named
    explained: int  # heat maps written
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    grid: Path | None = None


def model_file(model: Path) -> Path:
    """model.pt inside an export folder (or the file itself); a clear UsageError otherwise."""
    if model.is_file():
        if model.suffix == ".pt":
            return model
        raise UsageError(f"--model {model} is a file; give the export folder (with {MODEL_PT})")
    if not model.is_dir():
        raise UsageError(f"--model {model}: no such export folder")
    pt = model / MODEL_PT
    if not pt.is_file():
        raise UsageError(
            f"--model {model} has no {MODEL_PT}: heat maps need the PyTorch model, which a "
            "device copy of an export folder does not carry; point --model at the export "
            f"folder the build wrote, or copy its {MODEL_PT} here"
        )
    return pt


def _image_paths(inputs: Sequence[str], console: Console) -> list[str]:
    if any(is_url(raw) for raw in inputs):
        raise UsageError("explain reads local files; copy the images here first")
    walker = InputWalker(IMAGE_EXTENSIONS, lambda msg: console.print(f"[yellow]warning:[/] {msg}"))
    return list(dict.fromkeys(walker(check_inputs(inputs))))  # a file named twice: once


def _png_name(i: int, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem)[:60]
    return f"{i:04d}_{stem}.png"  # numbered: two folders may both hold img001.jpg


def _rows(maps: list[FileMap], names: list[str | None], tm: TrainedModel, topk: int):  # noqa: ANN202
    import pandas as pd

    classes = np.asarray(tm.classes, dtype=object)
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for fm, name in zip(maps, names, strict=True):
        cols["path"].append(fm.path)
        cols["error"].append(fm.error)
        cols["heatmap"].append(name)
        if fm.probs is None:
            for c in ("label", "score", "topk_labels", "topk_scores"):
                cols[c].append(None)
            continue
        order = np.argsort(-fm.probs, kind="stable")[:topk]
        cols["label"].append(str(classes[order[0]]))
        cols["score"].append(float(fm.probs[order[0]]))
        cols["topk_labels"].append([str(c) for c in classes[order]])
        cols["topk_scores"].append([round(float(fm.probs[i]), 6) for i in order])
    data = {c: pd.Series(v, dtype=object) for c, v in cols.items() if c != "score"}
    data["score"] = pd.array(cols["score"], dtype="Float32")
    return pd.DataFrame({c: data[c] for c in COLUMNS})


def explain_images(
    inputs: Sequence[str],
    model: Path,
    out: Path,
    console: Console,
    max_images: int = 64,
    topk: int = 3,
    grid: bool = False,
) -> ExplainRun:
    """Heat maps of the images `inputs` name (files, folders, path lists), into `out`."""
    pt = model_file(model)
    paths = _image_paths(inputs, console)
    if not paths:
        raise UsageError(f"no image files in {', '.join(inputs)}")
    tm = load_trained(pt)
    chosen = paths[:max_images]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Heat maps", total=2 * len(chosen))
        maps = explain_files(
            tm.model, tm.preprocessing, chosen, pick_device(), lambda n: progress.advance(task, n)
        )
        names: list[str | None] = []
        tiles: list[Tile] = []
        for i, fm in enumerate(maps):
            names.append(None)
            if fm.probs is not None:
                p = int(fm.probs.argmax())
                title = tile_title(tm.classes[p], float(fm.probs[p]), flat=fm.flat)
                tile = Tile(overlay_of(fm, tm.preprocessing), title)
                names[-1] = _png_name(i, fm.path)
                save_tile(tile, out / names[-1])
                tiles.append(tile)
            progress.advance(task)
    run = ExplainRun(out, out / RESULTS_PARQUET, len(paths), len(tiles))
    run.errors = [(fm.path, fm.error) for fm in maps if fm.error is not None]
    encodings = {c: e for c, e in COLUMNS.items() if e}
    write_parquet(run.parquet, _rows(maps, names, tm, min(topk, len(tm.classes))), encodings)
    if grid and tiles:
        run.grid = out / GRID_PNG
        save_grid(tiles, run.grid, f"{len(tiles)} image(s): Grad-CAM of the predicted class")
    return run
