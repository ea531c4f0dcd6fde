"""novelty.png: the score on validation against each camera fault, the threshold marked; and
novelty_most_novel.png: the validation images the score finds most unlike training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.data.images import load_rgb
from tlbuild.fileio import atomic_path

NOVELTY_PNG = "novelty.png"
MOST_NOVEL_PNG = "novelty_most_novel.png"


def plot_scores(path: Path, scores: Mapping[str, np.ndarray], threshold: float) -> None:
    """Histograms of the score per group, one row each, the threshold as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = dict(scores)
    lo = min(float(v.min()) for v in logs.values())
    hi = max(float(v.max()) for v in logs.values())
    bins = np.linspace(lo, hi + 1e-9, 40)
    fig, axes = plt.subplots(len(logs), 1, figsize=(7, 1.1 * len(logs) + 0.8), sharex=True)
    for ax, (name, v) in zip(np.atleast_1d(axes), logs.items(), strict=True):
        flagged = float((scores[name] > threshold).mean())
        colour = "tab:blue" if name == "validation" else "tab:orange"
        ax.hist(v, bins=bins, color=colour, alpha=0.8)
        ax.axvline(threshold, color="tab:red", ls="--", lw=1)
        ax.set_ylabel(f"{name}\n{flagged:.0%} flagged", rotation=0, ha="right", va="center")
        ax.set_yticks([])
    np.atleast_1d(axes)[-1].set_xlabel("novelty score (the red line: the threshold)")
    fig.suptitle("Novelty score: validation images and the camera-fault probe", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def plot_most_novel(path: Path, most: Sequence[dict[str, Any]], threshold: float) -> None:
    """The most novel validation images in a row, each with its score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(most), figsize=(1.6 * len(most), 2.0))
    for ax, m in zip(np.atleast_1d(axes), most, strict=True):
        img = load_rgb(Path(m["path"]))
        img.thumbnail((128, 128))
        ax.imshow(img)
        flagged = " (flagged)" if m["score"] > threshold else ""
        ax.set_title(f"{m['score']:.3g}{flagged}", fontsize=7)
        ax.set_xlabel(Path(m["path"]).name[:18], fontsize=6)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
