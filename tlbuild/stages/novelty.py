"""The novelty stage: a score for how unlike the training images an image is, and the threshold
over which `tlbuild classify` flags it for review instead of passing it as a good part.

Keyed on `[novelty]` and on what training, export and quantize wrote: a new target re-chooses
the threshold in seconds, without retraining. It measures the threshold on the camera-fault
probe (tlbuild/novelty/probe.py) and checks that every shipped variant flags as FP32 does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.progress import Progress

from tlbuild.artifacts import MODEL_ONNX, NOVELTY_NPZ, SPLITS_JSON, VARIANTS
from tlbuild.data.splits_file import evenly_spaced, read_split
from tlbuild.errors import UsageError
from tlbuild.manifest import read_manifest_if_any, write_section
from tlbuild.novelty.fit import Inputs, fit_novelty
from tlbuild.novelty.plot import MOST_NOVEL_PNG, NOVELTY_PNG, plot_most_novel, plot_scores
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    """Fit the score, choose and check its threshold, write novelty.npz and its plots."""
    cfg, out = ctx.recipe.novelty, ctx.out
    manifest = read_manifest_if_any(out)
    if manifest is None or manifest.onnx is None:
        raise UsageError(f"no exported model in {out}; run `tlbuild run` first")
    classes = manifest.classes
    fit = read_split(out, "train", classes) + read_split(out, "holdout", classes)
    rng = np.random.default_rng(cfg.seed)
    if len(fit) > cfg.fit_images:
        fit = [fit[i] for i in sorted(rng.choice(len(fit), cfg.fit_images, replace=False))]
    val = read_split(out, "val", classes)
    if not val:
        raise UsageError(f"{out / SPLITS_JSON} lists no validation images; retrain")
    inputs = Inputs(fit, val, evenly_spaced(val, cfg.probe_images))
    on = ctx.checks_on()
    with Progress(console=ctx.console, transient=True) as progress:
        model, entry, scores = fit_novelty(out, manifest, cfg, inputs, progress, on)
    model.save(out / NOVELTY_NPZ)
    plot_scores(out / NOVELTY_PNG, scores, entry["threshold"])
    plot_most_novel(out / MOST_NOVEL_PNG, entry["most_novel_val"][:6], entry["threshold"])
    write_section(out, "novelty", {"novelty": entry}, [NOVELTY_NPZ, NOVELTY_PNG, MOST_NOVEL_PNG])
    _print(ctx, entry)
    return entry


def _print(ctx: StageContext, entry: dict[str, Any]) -> None:
    v, p = entry["val"], entry["probe"]
    faults = ", ".join(f"{k} {x:.0%}" for k, x in p["flagged"].items())
    ctx.console.print(
        f"[bold]Novelty threshold {entry['threshold']:.3g}[/] (target {entry['target']:.1%} of "
        f"validation-like images): {v['flagged']:.1%} of {v['images']} validation images "
        f"flagged; camera-fault probe {p['faults_flagged']:.0%} flagged ({faults})"
    )
    for name, a in entry["artifacts"].items():
        mark = "" if a["met"] else " [red](under min_agreement)[/]"
        ctx.console.print(f"  {name} flags as FP32 on {a['agreement']:.1%} of images{mark}")


def summarise(entry: dict[str, Any]) -> str:
    """The threshold and what it flagged."""
    return (
        f"threshold {entry['threshold']:.3g}: {entry['val']['flagged']:.1%} of val, "
        f"{entry['probe']['faults_flagged']:.0%} of camera faults flagged"
    )


def _disabled(recipe: Recipe) -> str | None:
    return 'novelty.target = "off"' if recipe.novelty.target == "off" else None


STAGE = Stage(
    name="novelty",
    sections=("novelty",),
    inputs=(SPLITS_JSON, MODEL_ONNX, *(a.file for a in VARIANTS.values())),
    outputs=(NOVELTY_NPZ, NOVELTY_PNG, MOST_NOVEL_PNG),
    run=run,
    summarise=summarise,
    disabled=_disabled,
    upstream=("train", "export", "quantize"),
)
