"""The stage graph: data -> train -> export (later: quantize, build, bench, classify).

Each stage reads the recipe and the files earlier stages wrote under `recipe.out_dir`, and
writes its own; nothing passes between stages except those files.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tlbuild.data.scan import Sample, Splits, scan_dataset
from tlbuild.errors import BuildError, UsageError
from tlbuild.export.checkpoint import TrainedModel, load_trained, save_trained
from tlbuild.export.manifest import write_manifest
from tlbuild.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, onnx_io
from tlbuild.export.parity import ParityResult, check_parity, load_batch
from tlbuild.fileio import atomic_path, write_json, write_text
from tlbuild.models.factory import build_model
from tlbuild.recipe import Recipe
from tlbuild.train.loop import TrainResult, fit
from tlbuild.train.metrics import classification_metrics, plot_confusion, plot_history

# Files each stage owns, relative to the recipe's export folder.
MODEL_PT = "model.pt"
MODEL_ONNX = "model.onnx"
SPLITS_JSON = "splits.json"
LAST_CKPT = "checkpoints/last.pt"
TRAIN_FILES = [MODEL_PT, "metrics.json", "history.csv", "training_curves.png", SPLITS_JSON]


@dataclass
class TrainOutputs:
    """What the train stage produced."""

    result: TrainResult
    metrics: dict[str, Any]
    splits: Splits


@dataclass
class ExportOutputs:
    """What the export stage produced."""

    onnx_path: Path
    parity: ParityResult
    manifest_path: Path


def load_data(recipe: Recipe, console: Console) -> Splits:
    """Scan and split the recipe's data, reporting counts and skipped files."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Checking images", total=None)
        splits = scan_dataset(recipe.data, lambda n: progress.advance(task, n))
    table = Table(title=f"{len(splits.classes)} classes", title_justify="left")
    counts = splits.counts()
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for c in splits.classes:
        mark = " (ok)" if c == recipe.data.ok_class else ""
        table.add_row(c + mark, *(str(counts[s][c]) for s in counts))
    console.print(table)
    if splits.skipped:
        console.print(f"[yellow]Skipped {len(splits.skipped)} unreadable file(s):[/]")
        for p, why in splits.skipped[:20]:
            console.print(f"  {p}: {why}")
        if len(splits.skipped) > 20:
            console.print(f"  ... and {len(splits.skipped) - 20} more (listed in {SPLITS_JSON})")
    return splits


def _splits_json(splits: Splits) -> dict[str, Any]:
    def paths(samples: list[Sample]) -> list[list[Any]]:
        return [[str(s.path), s.label] for s in samples]

    return {
        "classes": splits.classes,
        "counts": splits.counts(),
        "train": paths(splits.train),
        "val": paths(splits.val),
        "test": paths(splits.test),
        "skipped": [[str(p), why] for p, why in splits.skipped],
    }


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to the export folder {out} ({e.strerror}); "
            "set output_dir in the recipe to a writable folder"
        ) from None


def _history_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    for row in history:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def _evaluate_split(
    tm: TrainedModel, samples: list[Sample], ok_class: str | None, batch: int = 32
) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from tlbuild.data.dataset import EvalTransform, ImageDataset
    from tlbuild.train.loop import evaluate

    loader = DataLoader(ImageDataset(samples, EvalTransform(tm.preprocessing)), batch_size=batch)
    loss, logits, labels = evaluate(tm.model, loader, torch.device("cpu"), None)
    m = classification_metrics(labels, logits.argmax(1), tm.classes, ok_class)
    m["loss"] = loss
    return m


def train_stage(recipe: Recipe, console: Console, resume: bool = False) -> TrainOutputs:
    """Fine-tune the backbone; write model.pt, history, curves, metrics and confusion plots."""
    out = recipe.out_dir
    _prepare_out_dir(out)
    splits = load_data(recipe, console)

    # Seed before building: the new head's initial weights are part of reproducibility.
    torch.manual_seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)
    built = build_model(recipe.model, len(splits.classes))
    console.print(
        f"Backbone {recipe.model.backbone}, weights {built.weights_source}, input "
        f"{built.preprocessing.input_size[0]}x{built.preprocessing.input_size[1]} "
        f"({built.preprocessing.resize}, {built.preprocessing.interpolation})"
    )
    ckpt = out / LAST_CKPT
    if not resume and ckpt.is_file():
        console.print(
            f"[yellow]Starting over; an earlier checkpoint ({ckpt}) is replaced. "
            "Use --resume to continue it instead.[/]"
        )
    result = fit(
        built.model,
        splits,
        built.preprocessing,
        recipe.train,
        recipe.data,
        ckpt,
        console,
        resume=resume,
        model_key=recipe.model.model_dump_json(),
    )
    tm = TrainedModel(
        result.model,
        recipe.model.backbone,
        splits.classes,
        built.preprocessing,
        built.weights_source,
        recipe.model.dropout,
        # Export reads these from model.pt itself, so it always checks the model against the
        # split and recipe it was trained with, whatever happened to the folder since.
        meta={
            "best_epoch": result.best_epoch,
            "ok_class": recipe.data.ok_class,
            "val": [[str(s.path), s.label] for s in splits.val],
            "recipe": recipe.to_jsonable(),
        },
    )
    save_trained(out / MODEL_PT, tm)
    write_json(out / SPLITS_JSON, _splits_json(splits))
    write_text(out / "history.csv", _history_csv(result.history))
    plot_history(result.history, out / "training_curves.png")

    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "device": result.device}
    for split in ("val", "test"):
        samples: list[Sample] = getattr(splits, split)
        if samples:
            metrics[split] = _evaluate_split(tm, samples, recipe.data.ok_class)
            plot_confusion(metrics[split], out / f"confusion_{split}.png", f"{recipe.name} {split}")
        else:
            (out / f"confusion_{split}.png").unlink(missing_ok=True)  # stale, from another run
    write_json(out / "metrics.json", metrics)
    v = metrics["val"]
    line = f"Validation accuracy {v['accuracy']:.1%} (macro F1 {v['macro_f1']:.3f})"
    if "escape_rate" in v:
        line += (
            f", escape rate {v['escape_rate']:.1%}, false-reject rate {v['false_reject_rate']:.1%}"
        )
    console.print(f"[bold]{line}[/] — best epoch {result.best_epoch + 1}")
    return TrainOutputs(result, metrics, splits)


def _parity_samples(samples: list[Sample], n: int) -> list[Sample]:
    # Evenly spaced through the (class-ordered) split, so every class is represented.
    if len(samples) <= n:
        return samples
    idx = np.linspace(0, len(samples) - 1, n).round().astype(int)
    return [samples[i] for i in idx]


def export_stage(recipe: Recipe, console: Console) -> ExportOutputs:
    """Export model.pt to ONNX, verify it against PyTorch on validation images, write manifest."""
    out = recipe.out_dir
    tm = load_trained(out / MODEL_PT)
    onnx_path = out / MODEL_ONNX
    cfg = recipe.export
    val = [Sample(Path(p), int(label)) for p, label in tm.meta.get("val", [])]
    if not val:
        raise UsageError(f"{out / MODEL_PT} records no validation images; retrain it")
    samples = _parity_samples(val, cfg.parity_images)
    images = load_batch([s.path for s in samples], tm.preprocessing)
    # Export beside the final name and check parity before the rename: a model.onnx on disk
    # has always passed its check.
    with atomic_path(onnx_path) as tmp:
        export_onnx(tm.model, tm.preprocessing, tmp, cfg.opset)
        parity = check_parity(tm.model, tmp, images, cfg.parity_atol, cfg.min_top1_agreement)
        if not parity.passed:
            raise BuildError(
                f"ONNX export disagrees with PyTorch on {parity.images} validation images: "
                f"max |logit diff| {parity.max_abs_logit_diff:.2e} "
                f"(allowed {cfg.parity_atol:.1e}), "
                f"top-1 agreement {parity.top1_agreement:.1%} (required "
                f"{cfg.min_top1_agreement:.0%}). Try another export.opset, or report the backbone."
            )
    console.print(
        f"ONNX parity on {parity.images} validation images: max |logit diff| "
        f"{parity.max_abs_logit_diff:.2e}, top-1 agreement {parity.top1_agreement:.1%} [green]ok[/]"
    )
    write_json(out / "labels.json", tm.classes)
    io_desc = onnx_io(onnx_path)
    body = {
        "name": recipe.name,
        "classes": tm.classes,
        "ok_class": tm.meta.get("ok_class"),
        "preprocessing": tm.preprocessing.to_dict(),
        "model": {
            "backbone": tm.backbone,
            "weights_source": tm.weights_source,
            "dropout": tm.dropout,
            "output": "logits (apply softmax for probabilities)",
        },
        "onnx": {
            "file": MODEL_ONNX,
            "opset": io_desc.pop("opset"),
            "input": INPUT_NAME,
            "output": OUTPUT_NAME,
            **io_desc,
            "parity": parity.to_dict(),
        },
        "metrics": _metrics_summary(out),
        # The recipe the model was trained with; its export section is this export's.
        "recipe": {**tm.meta.get("recipe", {}), "export": recipe.export.model_dump()},
    }
    artifacts = [MODEL_ONNX, "labels.json", *TRAIN_FILES, "confusion_val.png", "confusion_test.png"]
    manifest = write_manifest(out, body, artifacts)
    console.print(f"Wrote {onnx_path} and {manifest}")
    return ExportOutputs(onnx_path, parity, manifest)


def _metrics_summary(out: Path) -> dict[str, Any]:
    path = out / "metrics.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text(encoding="utf-8"))
    keys = ("accuracy", "macro_f1", "escape_rate", "false_reject_rate", "images")
    return {s: {k: m[s][k] for k in keys if k in m[s]} for s in ("val", "test") if s in m}


def run(recipe: Recipe, console: Console, resume: bool = False) -> ExportOutputs:
    """The whole build: train then export."""
    train_stage(recipe, console, resume=resume)
    return export_stage(recipe, console)
