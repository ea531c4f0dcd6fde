"""The export stage: model.pt to model.onnx, checked against PyTorch; the manifest's core."""

from __future__ import annotations

from typing import Any

import numpy as np

from tlbuild.artifacts import (
    DEVICE_BATCH,
    LABELS_JSON,
    METRICS_JSON,
    MODEL_ONNX,
    MODEL_PT,
    SPLITS_JSON,
    TRAINING_FILES,
)
from tlbuild.data.preprocess import load_batch
from tlbuild.data.scan import Sample
from tlbuild.data.splits_file import evenly_spaced, read_split
from tlbuild.errors import BuildError, UsageError
from tlbuild.export.feature_graph import FEATURES_NAME
from tlbuild.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, onnx_io
from tlbuild.export.parity import ParityResult, check_parity
from tlbuild.fileio import atomic_path, read_json_or_empty, sha256_file, write_json
from tlbuild.manifest import MANIFEST_JSON, write_section
from tlbuild.models.checkpoint import TrainedModel, load_trained
from tlbuild.runtime.backends import open_onnx
from tlbuild.stages.base import Stage, StageContext
from tlbuild.train.metrics import best_label


def _export_checked(
    ctx: StageContext, tm: TrainedModel, val: list[Sample]
) -> tuple[ParityResult, list[dict[str, Any]]]:
    """Export beside the final name and check parity before the rename: a model.onnx on disk
    has always passed its check."""
    cfg = ctx.recipe.export
    if not val:
        raise UsageError(f"{ctx.out / SPLITS_JSON} lists no validation images; retrain")
    samples = evenly_spaced(val, cfg.parity_images)
    images = load_batch([s.path for s in samples], tm.preprocessing)
    with atomic_path(ctx.out / MODEL_ONNX) as tmp:
        layout = export_onnx(tm.model, tm.preprocessing, tmp, cfg.opset)
        parity = check_parity(tm.model, tmp, images, cfg.parity_atol, cfg.min_top1_agreement)
        if not parity.passed:
            features = (
                ""
                if parity.features_max_rel_diff is None
                else f", features' largest difference {parity.features_max_rel_diff:.2e} of "
                "their largest value"
            )
            raise BuildError(
                f"ONNX export disagrees with PyTorch on {parity.images} validation images: "
                f"max |logit diff| {parity.max_abs_logit_diff:.2e} "
                f"(allowed {cfg.parity_atol:.1e}), "
                f"top-1 agreement {parity.top1_agreement:.1%} (required "
                f"{cfg.min_top1_agreement:.0%}){features}. Try another export.opset, or report "
                "the backbone."
            )
    return parity, layout


def _write_device_batch(
    ctx: StageContext, tm: TrainedModel, val: list[Sample]
) -> dict[str, Any] | None:
    """device_batch.npz: validation images (preprocessed, FP16 to halve the copy), labels and
    model.onnx's logits on them, so a device judges its engines on real data."""
    n = ctx.recipe.export.device_images
    path = ctx.out / DEVICE_BATCH
    if n == 0:
        path.unlink(missing_ok=True)
        return None
    samples = evenly_spaced(val, n)
    images = load_batch([s.path for s in samples], tm.preprocessing).astype(np.float16)
    # The FP16 images as the device will feed them, batch by batch, back in float32.
    logits = open_onnx(ctx.out / MODEL_ONNX).logits_in_batches(images, 32)
    labels = np.array([s.label for s in samples], np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels, fp32_logits=logits)
    return {"file": DEVICE_BATCH, "images": len(samples), "sha256": sha256_file(path)}


def _metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "macro_f1", "escape_rate", "false_reject_rate", "images")
    return {
        s: {k: metrics[s][k] for k in keys if k in metrics[s]}
        for s in ("val", "test")
        if s in metrics
    }


def _training_summary(m: dict[str, Any]) -> dict[str, Any]:
    """What training chose and reached, for the manifest: head-only accuracy, found rates."""
    if not m:
        return {}
    best = int(m["best_epoch"])
    summary: dict[str, Any] = {"best_epoch": best, "shipped": best_label(best)}  # -1: the probe
    if "head_only" in m:
        summary["head_only"] = {k: m["head_only"][k] for k in ("accuracy", "source")}
    if m.get("lr_find"):
        summary["lr_find"] = [
            {k: r[k] for k in ("stage", "chosen", "steps", "rule")} for r in m["lr_find"]
        ]
    return summary


def _manifest_fields(
    ctx: StageContext,
    tm: TrainedModel,
    checked: tuple[ParityResult, list[dict[str, Any]]],
    batch: dict[str, Any] | None,
) -> dict[str, Any]:
    parity, layout = checked
    io_desc = onnx_io(ctx.out / MODEL_ONNX)
    metrics = read_json_or_empty(ctx.out / METRICS_JSON)
    trained = tm.meta.get("recipe", {})
    return {
        "name": ctx.recipe.name,
        "classes": tm.classes,
        "ok_class": tm.meta.get("ok_class"),
        "preprocessing": tm.preprocessing.to_dict(),
        "model": {
            "backbone": tm.backbone,
            "weights_source": tm.weights_source,
            "dropout": tm.dropout,
        },
        "onnx": {
            "file": MODEL_ONNX,
            "opset": io_desc.pop("opset"),
            "input": INPUT_NAME,
            "output": OUTPUT_NAME,
            # The novelty features beside the logits: blocks in order (export/features.py).
            "features": {"output": FEATURES_NAME, "layout": layout} if layout else None,
            **io_desc,
            "parity": parity.to_dict(),
        },
        "metrics": _metrics_summary(metrics),
        "training": _training_summary(metrics),
        # What made these two files; later stages record their own settings in their sections.
        "recipe": {
            **{k: trained[k] for k in ("data", "model", "train") if k in trained},
            "export": ctx.recipe.export.model_dump(mode="json"),
        },
        "recipe_file": str(ctx.recipe.source) if ctx.recipe.source else None,
        "device_batch": batch,
    }


def run(ctx: StageContext) -> ParityResult:
    """Export model.pt to ONNX, verify it against PyTorch on validation images, write manifest."""
    tm = load_trained(ctx.out / MODEL_PT)
    val = read_split(ctx.out, "val", tm.classes)
    checked = _export_checked(ctx, tm, val)
    parity = checked[0]
    batch = _write_device_batch(ctx, tm, val)
    ctx.console.print(
        f"ONNX parity on {parity.images} validation images: max |logit diff| "
        f"{parity.max_abs_logit_diff:.2e}, top-1 agreement {parity.top1_agreement:.1%} [green]ok[/]"
    )
    write_json(ctx.out / LABELS_JSON, tm.classes)
    files = [MODEL_ONNX, LABELS_JSON, *TRAINING_FILES] + ([DEVICE_BATCH] if batch else [])
    fields = _manifest_fields(ctx, tm, checked, batch)
    write_section(ctx.out, "export", fields, files)
    ctx.console.print(f"Wrote {ctx.out / MODEL_ONNX} and {ctx.out / MANIFEST_JSON}")
    return parity


def summarise(parity: ParityResult) -> str:
    """The parity check in a few words."""
    return f"parity max |logit diff| {parity.max_abs_logit_diff:.1e}"


STAGE = Stage(
    name="export",
    sections=("export",),
    inputs=(MODEL_PT, SPLITS_JSON, METRICS_JSON),
    outputs=(MODEL_ONNX, LABELS_JSON, DEVICE_BATCH),
    run=run,
    summarise=summarise,
)
