"""decision_curve.png: escape rate against false-reject rate, the chosen threshold marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.decision.operating_point import Counts, Curve, Target, rule, wilson
from tlbuild.fileio import atomic_path

DECISION_PNG = "decision_curve.png"


def _plot_curve(ax: Any, c: Curve, target: Target) -> None:
    """The validation curve, its Wilson upper bound on the target's metric, the target line."""
    cells = [j for j in range(c.cells) if c.reachable(j)]
    fr = np.array([c.false_rejects[j] / c.ok for j in cells])
    esc = np.array([c.escapes[j] / c.defective for j in cells])
    conf = target.confidence
    ax.plot(fr, esc, "-", color="tab:blue", lw=1.5, label="validation (FP32), every threshold")
    if target.metric == "escape_rate":
        bound = [wilson(int(c.escapes[j]), c.defective, conf)[1] for j in cells]
        ax.plot(fr, bound, ":", color="tab:blue", label=f"its escape rate's {conf:.0%} upper bound")
        ax.axhline(
            target.limit, color="tab:red", ls="--", lw=1, label=f"{target.key} {target.limit:g}"
        )
    else:
        bound = [wilson(int(c.false_rejects[j]), c.ok, conf)[1] for j in cells]
        ax.plot(bound, esc, ":", color="tab:blue", label=f"its false-reject {conf:.0%} upper bound")
        ax.axvline(
            target.limit, color="tab:red", ls="--", lw=1, label=f"{target.key} {target.limit:g}"
        )


def _plot_chosen(ax: Any, chosen: Counts, confidence: float, label: str) -> tuple[float, float]:
    """The chosen point with its Wilson intervals; the upper ends (false rejects, escapes)."""
    e_lo, e_hi = wilson(chosen.escapes, chosen.defective, confidence)
    f_lo, f_hi = wilson(chosen.false_rejects, chosen.ok, confidence)
    x, y = chosen.false_reject_rate, chosen.escape_rate
    ax.errorbar(
        x,
        y,
        xerr=[[x - f_lo], [f_hi - x]],
        yerr=[[y - e_lo], [e_hi - y]],
        fmt="o",
        color="black",
        ms=7,
        capsize=3,
        label=label,
        zorder=5,
    )
    return f_hi, e_hi


def _zoom(ax: Any, target: Target, f_hi: float, e_hi: float) -> None:
    """Axis limits from the target and the upper ends of the chosen point's intervals."""
    # Zoomed on the corner that matters: the chosen point with its intervals and the target.
    on_x = target.metric == "false_reject_rate"
    x_max = min(1.0, max(0.1, 1.3 * f_hi, 1.3 * target.limit * on_x))
    y_max = min(1.0, max(0.1, 1.3 * e_hi, 1.3 * target.limit * (not on_x)))
    # A little room below 0, so a point at 0 escapes or 0 false rejects is not under an axis.
    ax.set_xlim(-0.03 * x_max, x_max)
    ax.set_ylim(-0.03 * y_max, y_max)


def plot_decision(
    c: Curve,
    threshold: float,
    chosen: Counts,
    target: Target,
    artifacts: dict[str, Counts],
    path: Path,
    ok_class: str,
) -> None:
    """The validation curve, its Wilson upper bound, the target line, the chosen point with
    its intervals and each shipped artifact at the same threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _plot_curve(ax, c, target)
    conf = target.confidence
    label = f"chosen: {rule(ok_class, threshold)} ({conf:.0%} Wilson intervals)"
    f_hi, e_hi = _plot_chosen(ax, chosen, conf, label)
    for marker, (name, a) in zip("sDv^", artifacts.items(), strict=False):
        ax.plot(a.false_reject_rate, a.escape_rate, marker, mfc="none", ms=9, label=f"{name} at it")
    _zoom(ax, target, f_hi, e_hi)
    pct = matplotlib.ticker.PercentFormatter(1.0)
    ax.xaxis.set_major_formatter(pct)
    ax.yaxis.set_major_formatter(pct)
    ax.set_xlabel(f"false-reject rate ('{ok_class}' parts rejected), {c.ok} validation images")
    ax.set_ylabel(f"escape rate (defects accepted), {c.defective} images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
