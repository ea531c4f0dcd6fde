"""The train stage: fine-tune the backbone on the recipe's data; model.pt, metrics and plots."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console

from tlbuild.artifacts import (
    CHECKPOINTS,
    CURVES_PNG,
    HISTORY_CSV,
    LR_FIND_PNG,
    METRICS_JSON,
    MODEL_PT,
    SPLITS_JSON,
    TRAINING_FILES,
)
from tlbuild.data.duplicates_report import check_duplicates
from tlbuild.data.holdout import hold_out
from tlbuild.data.load import load_data
from tlbuild.data.scan import Sample, Splits
from tlbuild.data.sizes import SizeSummary, size_advice
from tlbuild.data.splits_file import splits_json
from tlbuild.fileio import write_json, write_text
from tlbuild.models.checkpoint import TrainedModel, save_trained
from tlbuild.models.factory import NewClassifier
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext
from tlbuild.train import distributed
from tlbuild.train.eval_logits import EVAL_LOGITS, write_eval_logits
from tlbuild.train.events import RichEvents, SilentEvents, TrainEvents
from tlbuild.train.from_recipe import train_from_recipe
from tlbuild.train.lr_find import plot_lr_find
from tlbuild.train.metrics import (
    best_label,
    classification_metrics,
    fine_tuning_gain,
    plot_confusion,
    plot_history,
)
from tlbuild.train.trainer import TrainResult

LAST_CKPT = f"{CHECKPOINTS}/last.pt"


@dataclass
class TrainOutputs:
    """What the train stage produced."""

    result: TrainResult
    metrics: dict[str, Any]
    splits: Splits


def _history_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    for row in history:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def _evaluate_split(
    tm: TrainedModel, samples: list[Sample], ok_class: str | None, batch: int = 32
) -> tuple[dict[str, Any], np.ndarray]:
    from tlbuild.train.validate import evaluate_samples

    cpu = torch.device("cpu")
    loss, logits, labels = evaluate_samples(tm.model, samples, tm.preprocessing, cpu, batch)
    m = classification_metrics(labels, logits.argmax(1), tm.classes, ok_class)
    m["loss"] = loss
    return m, logits


def _head_only(result: TrainResult, recipe: Recipe) -> dict[str, Any] | None:
    """What the new head alone reached: the best head-only phase, else the linear probe."""
    frozen = {p.name for p in recipe.train.phases if p.unfreeze == 0}
    rows = [r for r in result.history if r["stage"] in frozen]
    if not rows:
        return result.probe
    best = min(rows, key=lambda r: r["val_loss"])
    return {
        "accuracy": best["val_acc"],
        "loss": best["val_loss"],
        # metrics.json's (and the manifest's) wording, unchanged by the rename to phases.
        "source": f"stage '{best['stage']}', body frozen",
    }


def _fit(
    ctx: StageContext, splits: Splits, events: TrainEvents
) -> tuple[TrainedModel, TrainResult]:
    """Build the backbone with its new head and fine-tune it; the best weights, with metadata."""
    recipe, console = ctx.recipe, ctx.console
    ckpt = ctx.out / LAST_CKPT

    def built_here(built: NewClassifier, images: SizeSummary | None) -> None:
        default_side = max(built.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        advice = size_advice(images, built.preprocessing.input_size, default_side)
        if advice and recipe.model.preprocess.input_size != "auto":
            console.print(f"[yellow]Note: {advice}[/]")
        console.print(
            f"Backbone {recipe.model.backbone}, weights {built.weights_source}, input "
            f"{built.preprocessing.input_size[0]}x{built.preprocessing.input_size[1]} "
            f"({built.preprocessing.resize}, {built.preprocessing.interpolation})"
        )
        if not ctx.resume and ckpt.is_file():
            console.print(
                f"[yellow]Starting over; an earlier checkpoint ({ckpt}) is replaced. "
                "Use --resume to continue it instead.[/]"
            )

    built, result = train_from_recipe(recipe, splits, ckpt, events, ctx.resume, built_here)
    tm = TrainedModel(
        result.model,
        recipe.model.backbone,
        splits.classes,
        built.preprocessing,
        built.weights_source,
        recipe.model.dropout,
        # Export reads these from model.pt itself: the model carries the recipe it was
        # trained with, whatever happened to the folder since.
        meta={
            "best_epoch": result.best_epoch,
            "ok_class": recipe.data.ok_class,
            "recipe": recipe.to_jsonable(),
        },
    )
    return tm, result


def _write_metrics(
    ctx: StageContext, tm: TrainedModel, result: TrainResult, splits: Splits
) -> dict[str, Any]:
    """metrics.json and the confusion plots: the shipped weights on validation and test."""
    out, recipe = ctx.out, ctx.recipe
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "device": result.device}
    head_only = _head_only(result, recipe)
    if head_only is not None:
        metrics["head_only"] = head_only
    if result.lr_find:
        metrics["lr_find"] = result.lr_find
        plot_lr_find(result.lr_find, out / LR_FIND_PNG)
    else:
        (out / LR_FIND_PNG).unlink(missing_ok=True)  # stale, from another run
    logits: dict[str, tuple[list[Sample], np.ndarray]] = {}
    for split in ("val", "test"):
        samples: list[Sample] = getattr(splits, split)
        if samples:
            metrics[split], split_logits = _evaluate_split(tm, samples, recipe.data.ok_class)
            logits[split] = (samples, split_logits)
            plot_confusion(metrics[split], out / f"confusion_{split}.png", f"{recipe.name} {split}")
        else:
            (out / f"confusion_{split}.png").unlink(missing_ok=True)  # stale, from another run
    write_json(out / METRICS_JSON, metrics)
    write_eval_logits(out / EVAL_LOGITS, tm.classes, logits)
    return metrics


def _train_beside_rank0(ctx: StageContext) -> TrainOutputs:
    """Another torchrun process: scan, build and train like rank 0; print and write nothing."""
    quiet = StageContext(ctx.recipe, Console(quiet=True), ctx.resume)
    splits = hold_out(load_data(quiet.recipe, quiet.console), quiet.recipe.data)
    return TrainOutputs(_fit(quiet, splits, SilentEvents())[1], {}, splits)


def run(ctx: StageContext) -> TrainOutputs:
    """Fine-tune the backbone; write model.pt, history, curves, metrics and confusion plots.

    Under torchrun every process trains (Trainer.fit) and rank 0 alone writes; the evaluation
    of the shipped weights below runs on rank 0 only, while the others have finished.
    """
    if not distributed.is_main_process():
        return _train_beside_rank0(ctx)
    splits = load_data(ctx.recipe, ctx.console)
    check_duplicates(ctx.recipe.data, splits, ctx.out, ctx.console)  # "error" stops it here
    splits = hold_out(splits, ctx.recipe.data)
    if splits.holdout:
        ctx.console.print(
            f"{len(splits.holdout)} training images held out of training for the INT8 search "
            "(data.holdout)"
        )
    tm, result = _fit(ctx, splits, RichEvents(ctx.console))
    save_trained(ctx.out / MODEL_PT, tm)
    write_json(ctx.out / SPLITS_JSON, splits_json(splits))
    write_text(ctx.out / HISTORY_CSV, _history_csv(result.history))
    plot_history(result.history, ctx.out / CURVES_PNG)
    metrics = _write_metrics(ctx, tm, result, splits)
    v = metrics["val"]
    line = f"Validation accuracy {v['accuracy']:.1%} (macro F1 {v['macro_f1']:.3f})"
    if "escape_rate" in v:
        line += (
            f", escape rate {v['escape_rate']:.1%}, false-reject rate {v['false_reject_rate']:.1%}"
        )
    ctx.console.print(f"[bold]{line}[/] — best: {best_label(metrics['best_epoch'])}")
    gain = fine_tuning_gain(metrics)
    if gain:
        ctx.console.print(gain)
    del tm
    _release_gpu_memory()
    return TrainOutputs(result, metrics, splits)


def _release_gpu_memory() -> None:
    """Give back the GPU memory PyTorch's allocator keeps cached: the checks after training open
    ONNX Runtime CUDA sessions in this same process."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarise(out: TrainOutputs) -> str:
    """Validation accuracy and which weights ship."""
    v = out.metrics["val"]
    return f"val accuracy {v['accuracy']:.1%}, best: {best_label(out.result.best_epoch)}"


STAGE = Stage(
    name="train",
    sections=("data", "model", "train"),
    inputs=(),
    # eval_logits.json is read by later stages, not shipped: the manifest does not list it.
    outputs=(*TRAINING_FILES, EVAL_LOGITS),
    run=run,
    summarise=summarise,
    data=True,
    distributed=True,
    # How fast it runs, not what it produces. (`fingerprint` is how data changes are seen,
    # not what the data is: see incremental.data_digest.)
    ignored_keys={"data": frozenset({"workers", "fingerprint", "cache_ram_mib"})},
)
