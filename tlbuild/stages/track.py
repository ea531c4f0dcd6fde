"""The track stage: the build logged as one MLflow run (`[track]`, or $MLFLOW_TRACKING_URI).

Keyed on every earlier stage, so a build whose stages were all reused logs nothing new. An
unreachable tracker (or MLflow not installed) is one warning and the stage stays stale, so the
next build logs it; with `required = true` it fails the build instead.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from tlbuild.errors import BuildError
from tlbuild.fileio import write_json
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext, StageDeferred

TRACKING_JSON = "tracking.json"


def _unavailable(ctx: StageContext, why: str) -> BuildError | StageDeferred:
    if ctx.recipe.track.required:
        return BuildError(f"[track] required = true and {why}")
    return StageDeferred(f"{why}; the build goes on and the next one logs it")


def run(ctx: StageContext) -> dict[str, Any]:
    """Log the build; tracking.json says where."""
    cfg = ctx.recipe.track
    uri = cfg.uri(dict(os.environ))
    assert uri is not None  # disabled otherwise
    if importlib.util.find_spec("mlflow") is None:  # an extra
        raise _unavailable(ctx, "MLflow is not installed: pip install 'tlbuild[mlflow]'")
    from tlbuild.track.mlflow_log import log_build, transient, unreachable

    problem = unreachable(uri)
    if problem:
        raise _unavailable(ctx, problem)
    from tlbuild.track.record import build_record

    record = build_record(ctx.out, ctx.recipe)
    experiment = cfg.experiment or ctx.recipe.name
    try:
        logged = log_build(uri, experiment, record, ctx.recipe.name, ctx.out, cfg.registered_model)
    except Exception as e:
        why = f"MLflow at {uri} failed ({type(e).__name__}: {e})"
        if transient(e):  # the server went away mid-way: the same as unreachable
            raise _unavailable(ctx, why) from e
        # A setting to fix (a deleted experiment, no permission): put off, it would fail at
        # every build without a word beyond a warning.
        raise BuildError(f"{why}; fix the [track] settings or the server, or remove [track]") from e
    write_json(ctx.out / TRACKING_JSON, logged)
    ctx.console.print(
        f"Logged to MLflow: run {logged['run_id']} in experiment '{experiment}' "
        f"({len(record.params)} parameters, {len(record.metrics)} metrics, "
        f"{len(record.history)} epochs): {logged['url']}"
        + (f"; registered {logged['registered']}" if logged["registered"] else "")
    )
    return logged


def summarise(logged: dict[str, Any]) -> str:
    """Where the run went."""
    return f"MLflow run {logged['run_id']} ({logged['experiment']})"


def _disabled(recipe: Recipe) -> str | None:
    if recipe.track.uri(dict(os.environ)) is None:
        return "no [track] mlflow and no $MLFLOW_TRACKING_URI"
    return None


STAGE = Stage(
    name="track",
    sections=("track",),
    inputs=(),
    outputs=(TRACKING_JSON,),
    run=run,
    summarise=summarise,
    disabled=_disabled,
)
