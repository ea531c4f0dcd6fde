"""The image_models stage: beside each shipped ONNX artifact its image-input twin
(model_image*.onnx: a client decodes, feeds, done), each checked against the artifact it wraps
on validation images decoded at their own size. Before the engines and the benchmark, so bench
and the gates run them too."""

from __future__ import annotations

from typing import Any

from tlbuild.artifacts import MODEL_ONNX, SPLITS_JSON, VARIANTS, image_twin, onnx_artifact
from tlbuild.clients.image_models import (
    INPUT,
    exported,
    make_image_model,
    resize_note,
    simulates_qdq,
    wrapped,
)
from tlbuild.data.splits_file import evenly_spaced
from tlbuild.manifest import write_section
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext


def run(ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Write a twin of each shipped ONNX artifact, check it, record it in the manifest."""
    cfg, out = ctx.recipe.clients, ctx.out
    manifest, spec, val = exported(out)
    for old in out.glob("model_image*.onnx"):  # made from files that may have changed
        old.unlink()
    on = ctx.checks_on()
    samples = evenly_spaced(val, cfg.check_images)
    records: dict[str, dict[str, Any]] = {}
    for file in wrapped(out, manifest):
        a = onnx_artifact(file)
        where = on.for_artifact(a) if a is not None else on
        twin = image_twin(file)
        r = make_image_model(
            out / file, out / twin, spec, samples, cfg.min_top1_agreement, simulates_qdq(file),
            where,
        )  # fmt: skip
        records[twin] = {**r, "input": INPUT, "resize": resize_note(spec)} if r["file"] else r
        if r["file"] is None:
            ctx.console.print(f"[yellow]No {twin}:[/] {r['why_not']}")
            continue
        c = r["check"]
        ctx.console.print(
            f"{twin}: {file}'s answer on {c['top1_agreement']:.1%} of {c['images']} validation "
            f"images decoded at their own size, top probability within {c['max_prob_diff']:.2e}"
        )
    files = [r["file"] for r in records.values() if r["file"]]
    write_section(out, "image_models", {"image_models": records}, files)
    return records


def summarise(records: dict[str, dict[str, Any]]) -> str:
    """How many twins shipped."""
    made = sum(1 for r in records.values() if r["file"])
    return f"{made} of {len(records)} image models"


def _disabled(recipe: Recipe) -> str | None:
    return None if recipe.clients.image_models else "clients.image_models = false"


STAGE = Stage(
    name="image_models",
    sections=("clients",),
    inputs=(SPLITS_JSON, MODEL_ONNX, *(a.file for a in VARIANTS.values())),
    outputs=("model_image*.onnx",),
    run=run,
    summarise=summarise,
    disabled=_disabled,
    upstream=("train", "export", "quantize"),
    ignored_keys={"clients": frozenset({"kit_images"})},
)
