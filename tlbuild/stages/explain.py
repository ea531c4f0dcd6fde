"""The explain stage: Grad-CAM heat maps of validation images (misclassified first) per class.

A stage of its own, keyed on `[explain]` and on training alone, rather than part of the report
stage: the report then stays free of PyTorch and re-renders in a second when only `[gates]`
change, and a new benchmark (another machine) does not recompute heat maps. Not in the train
stage either, where a new `[explain]` cap would retrain or, unkeyed, leave stale maps.
"""

from __future__ import annotations

from typing import Any

from tlbuild.artifacts import MODEL_PT, SPLITS_JSON
from tlbuild.explain.summary import HEATMAP_PNGS, HEATMAPS_JSON
from tlbuild.explain.validation import explain_validation
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext
from tlbuild.train.eval_logits import EVAL_LOGITS


def run(ctx: StageContext) -> dict[str, Any]:
    """Write heatmaps_<i>_<class>.png per class with validation images, and heatmaps.json."""
    result = explain_validation(ctx.out, ctx.recipe.explain, ctx.console)
    if "skipped" in result:
        ctx.console.print(f"[yellow]Heat maps skipped:[/] {result['skipped']}")
    else:
        grids = sum(1 for c in result["classes"] if c["png"])
        ctx.console.print(f"Wrote {grids} heat-map grid(s): {summarise(result)}")
    return result


def summarise(result: dict[str, Any]) -> str:
    """Images explained and how many of the misclassified ones are shown."""
    if "skipped" in result:
        return "skipped: no spatial feature map"
    classes = result["classes"]
    tiles = sum(c["misclassified_shown"] + c["correct_shown"] for c in classes)
    shown = sum(c["misclassified_shown"] for c in classes)
    total = sum(c["misclassified"] for c in classes)
    return f"{tiles} heat maps, {shown} of {total} misclassified shown"


def _disabled(recipe: Recipe) -> str | None:
    return "explain.max_images = 0" if recipe.explain.max_images == 0 else None


STAGE = Stage(
    name="explain",
    sections=("explain",),
    inputs=(MODEL_PT, SPLITS_JSON, EVAL_LOGITS),
    outputs=(HEATMAPS_JSON, HEATMAP_PNGS),
    run=run,
    summarise=summarise,
    disabled=_disabled,
    upstream=("train",),
)
