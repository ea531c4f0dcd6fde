"""The engines stage: compile accepted ONNX variants into TensorRT engines and gate each one
(export/engines.py). Where TensorRT or a GPU is missing the stage is recorded as skipped with
the reason; nothing else fails. The command stays `tlbuild build`: "build an engine" is
TensorRT's own word (trtexec, IBuilder), and device scripts already call it.
"""

from __future__ import annotations

from typing import Any

from tlbuild.artifacts import ONNX_ARTIFACTS, SPLITS_JSON
from tlbuild.data.splits_file import read_split
from tlbuild.export.engines import make_engines
from tlbuild.manifest import read_manifest
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    """TensorRT engines for the recipe's export folder, gated on its validation images."""
    manifest = read_manifest(ctx.out)
    val = read_split(ctx.out, "val", manifest.classes)
    cfg, max_drop = ctx.recipe.build, ctx.recipe.quantize.max_drop
    return make_engines(ctx.out, cfg, max_drop, ctx.console, val, ctx.checks_on())


def summarise(section: dict[str, Any]) -> str:
    """Built, or why not."""
    return "engines built" if section.get("status") == "built" else section.get("reason", "")


def _disabled(recipe: Recipe) -> str | None:
    return None if recipe.build.variants else "no variants in [build]"


STAGE = Stage(
    name="engines",
    aliases=("build",),
    sections=("build",),
    inputs=(SPLITS_JSON, *(a.file for a in ONNX_ARTIFACTS.values() if a.engine_label)),
    outputs=("*.engine",),
    run=run,
    summarise=summarise,
    disabled=_disabled,
    machine=True,
    # Not the image models: no engine is built from them, and a [clients] change must not
    # rebuild engines.
    upstream=("train", "export", "quantize"),
)
