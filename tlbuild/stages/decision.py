"""The decision stage: the threshold on p(ok) that meets the recipe's [decision] target.

A stage of its own, keyed on `[decision]` and on what training and quantize wrote: a new target
re-chooses the threshold in seconds without retraining, and a new benchmark (another machine)
does not redo it. It runs after the benchmark only so that a change here leaves the engines and
the benchmark fresh. The threshold goes to the manifest, where `tlbuild classify` finds it.
"""

from __future__ import annotations

from typing import Any

from tlbuild.artifacts import MODEL_ONNX, SPLITS_JSON, VARIANTS
from tlbuild.decision.evaluate import decide
from tlbuild.decision.plot import DECISION_PNG
from tlbuild.errors import UsageError
from tlbuild.manifest import read_manifest_if_any, write_section
from tlbuild.recipe import Recipe
from tlbuild.stages.base import Stage, StageContext
from tlbuild.train.eval_logits import EVAL_LOGITS


def _rates(r: dict[str, Any], confidence: float) -> str:
    e, f = r["escapes"], r["false_rejects"]
    return (
        f"escapes {e['count']} of {e['total']} ({e['rate']:.1%}, {confidence:.0%} upper bound "
        f"{e['wilson'][1]:.1%}), false rejects {f['count']} of {f['total']} ({f['rate']:.1%}, "
        f"upper bound {f['wilson'][1]:.1%})"
    )


def run(ctx: StageContext) -> dict[str, Any]:
    """Choose the threshold, check it on every shipped artifact, record it in the manifest."""
    cfg, out = ctx.recipe.decision, ctx.out
    assert cfg is not None  # the stage is disabled without [decision]
    manifest = read_manifest_if_any(out)
    if manifest is None or manifest.onnx is None:
        raise UsageError(f"no exported model in {out}; run `tlbuild run` first")
    entry = decide(out, manifest, cfg, ctx.console, ctx.checks_on())
    write_section(out, "decision", {"decision": entry}, [])
    (key, limit), conf = next(iter(entry["target"].items())), entry["confidence"]
    ctx.console.print(
        f"[bold]Decision threshold {entry['rule']}[/] ({key} {limit:g}) on validation: "
        + _rates(entry["val"], conf)
    )
    for name, a in entry["artifacts"].items():
        mark = "" if a["met"] else " [red](misses the target)[/]"
        ctx.console.print(f"  {name} at it: {_rates(a, conf)}{mark}")
    if "test" in entry:
        ctx.console.print(f"  test split (held out) at it: {_rates(entry['test'], conf)}")
    if not entry["met"]:
        ctx.console.print(f"[yellow]Target not met:[/] {entry['why_not_met']}")
    return entry


def summarise(entry: dict[str, Any]) -> str:
    """The rule and what it achieved on validation."""
    e, f = entry["val"]["escapes"], entry["val"]["false_rejects"]
    verdict = "" if entry["met"] else "; target not met"
    return (
        f"{entry['rule']}: escapes {e['count']}/{e['total']}, false rejects "
        f"{f['count']}/{f['total']} on val{verdict}"
    )


def _disabled(recipe: Recipe) -> str | None:
    return None if recipe.decision is not None else "no [decision] in the recipe"


STAGE = Stage(
    name="decision",
    sections=("decision",),
    inputs=(EVAL_LOGITS, SPLITS_JSON, MODEL_ONNX, *(a.file for a in VARIANTS.values())),
    outputs=(DECISION_PNG,),
    run=run,
    summarise=summarise,
    disabled=_disabled,
    upstream=("train", "export", "quantize"),
)
