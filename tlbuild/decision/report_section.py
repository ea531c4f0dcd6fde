"""The report's decision-threshold section, from the manifest's `decision` entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbuild.decision.operating_point import images_for_upper_bound
from tlbuild.decision.plot import DECISION_PNG


def _cell(x: dict[str, Any]) -> str:
    return f"{x['count']} of {x['total']}"


def _rate(x: dict[str, Any]) -> str:
    return f"{x['rate']:.1%}"


def _interval(x: dict[str, Any]) -> str:
    low, high = x["wilson"]
    return f"{low:.1%} to {high:.1%}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _upper_bound_advice(d: dict[str, Any], key: str, limit: float) -> str:
    """What the upper bound says about the target, in a sentence."""
    stat = "escapes" if key == "max_escape_rate" else "false_rejects"
    x, conf = d["val"][stat], d["confidence"]
    high = x["wilson"][1]
    kind = "defective" if stat == "escapes" else "ok"
    text = (
        f"The validation split holds {x['total']} {kind} images, so the rate is only known to "
        f"within its interval: **read the upper bound ({high:.1%}) as what this split can vouch "
        f"for**, not the point estimate."
    )
    if high > limit and not d["require_upper_bound"]:
        need = images_for_upper_bound(limit, conf)
        more = (
            f" With none at all, the {conf:.0%} upper bound reaches {limit:.2%} only from "
            f"{need:,} {kind} validation images."
            if need is not None
            else ""
        )
        text += (
            f" The target is met by the point estimate; the upper bound is above it.{more} "
            "`require_upper_bound = true` makes the bound the target."
        )
    return text


def decision_lines(out: Path, manifest: dict[str, Any]) -> list[str]:
    """The section; [] when the recipe has no [decision]."""
    d = manifest.get("decision")
    if not d:
        return []
    (key, limit), conf = next(iter(d["target"].items())), d["confidence"]
    on = d["chosen_on"]
    lines = [
        "## Decision threshold",
        "",
        f"A part is rejected when **{d['rule']}** (`[decision]` {key} = {limit:g}, chosen on "
        f"the validation split's {on['images']} images with `{on['artifact']}`, "
        f"{on['precision'].upper()}). `tlbuild classify` applies it unless given `--threshold`.",
        "",
    ]
    if not d["met"]:
        lines += [f"**Target not met**: {d['why_not_met']}.", ""]
    lines += [
        _row(["at the threshold, validation", "count", "rate", f"{conf:.0%} Wilson interval"]),
        "| --- | ---: | ---: | ---: |",
    ]
    for label, x in (
        ("escapes (defective accepted)", d["val"]["escapes"]),
        (f"false rejects ('{d['ok_class']}' rejected)", d["val"]["false_rejects"]),
    ):
        lines.append(_row([label, _cell(x), _rate(x), _interval(x)]))
    lines += ["", _upper_bound_advice(d, key, limit), ""]
    if (out / DECISION_PNG).is_file():
        lines += [f"![escape rate against false-reject rate]({DECISION_PNG})", ""]
    lines += [
        _row(
            [
                f"p({d['ok_class']}) below",
                *("escapes", "escape rate", "upper bound", "false rejects", "rate"),
            ]
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["thresholds"]:
        e, f = r["escapes"], r["false_rejects"]
        t = (
            f"**{r['threshold']:g}** (chosen)"
            if r["threshold"] == d["threshold"]
            else f"{r['threshold']:g}"
        )
        lines.append(_row([t, _cell(e), _rate(e), f"{e['wilson'][1]:.1%}", _cell(f), _rate(f)]))
    lines += ["", *_artifact_lines(d), *_test_lines(d)]
    if d.get("escaped"):
        shown = ", ".join(f"`{p}`" for p in d["escaped"])
        n = d["val"]["escapes"]["count"]
        which = f" (the {len(d['escaped'])} of {n} scored highest)" if n > len(d["escaped"]) else ""
        lines += [f"Defective validation images accepted at the threshold{which}: {shown}.", ""]
    return lines


def _artifact_lines(d: dict[str, Any]) -> list[str]:
    arts = d.get("artifacts", {})
    if not arts:
        return []
    lines = [
        f"The shipped artifacts at {d['rule']} on the validation images:",
        "",
        _row(["artifact", "run with", "escapes", "escape rate", "false rejects", "rate", "target"]),
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, a in arts.items():
        e, f = a["escapes"], a["false_rejects"]
        mark = " (classify on a CPU)" if name == d.get("classify_cpu") else ""
        lines.append(
            _row(
                [
                    f"`{name}`{mark}",
                    a["evaluated_with"],
                    _cell(e),
                    _rate(e),
                    _cell(f),
                    _rate(f),
                    "met" if a["met"] else "**missed**",
                ]
            )
        )
    return lines + [
        "",
        "TensorRT engines are judged on the device (`tlbuild build --on-device`), not here.",
        "",
    ]


def _test_lines(d: dict[str, Any]) -> list[str]:
    t = d.get("test")
    if not t:
        return []
    e, f = t["escapes"], t["false_rejects"]
    return [
        f"Held out (the test split, never used to choose): escapes {_cell(e)} ({_rate(e)}, "
        f"{d['confidence']:.0%} interval {_interval(e)}), false rejects {_cell(f)} "
        f"({_rate(f)}, {_interval(f)}): target {'met' if t['met'] else '**missed**'}.",
        "",
    ]
