"""Drift: does what one classify run saw look like what validation looked like? Pure numpy.

The build records a reference from the validation images (tlbuild/novelty/fit.py): the share of
each predicted label, and the deciles of the novelty score, the brightness and the sharpness
of the images. A run counts its images into the same bins and compares with the population
stability index, PSI = sum((seen - expected) * ln(seen / expected)), the measure credit-risk and
ML monitoring use with the same reading: under 0.1 stable, 0.1 to 0.25 moving, over 0.25 shifted.
Over PSI_LIMIT a run warns with the figures; every run's figures are kept beside its results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PSI_LIMIT = 0.25
# Fewer images than this: the figures are recorded, but no warning (PSI's own sampling noise on
# ten bins is about 9 / n: 0.09 at 100 images).
MIN_IMAGES = 100
MEASURES = ("novelty", "brightness", "sharpness")


@dataclass(frozen=True)
class ImageBlock:
    """Where the input image's statistics sit in a features row, and the preprocessing's
    per-channel mean and std, to read them back in pixel units (0..1)."""

    start: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def measures(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brightness (mean pixel value) and sharpness (standard deviation of fine detail) of
        each image, averaged over its channels, in 0..1 pixel units."""
        c, s = self.channels, self.start
        std = np.asarray(self.std, np.float64)
        mean = np.asarray(self.mean, np.float64)
        bright = (features[:, s : s + c] * std + mean).mean(1)
        sharp = (features[:, s + 2 * c : s + 3 * c] * std).mean(1)
        return bright, sharp


def image_block(layout: Sequence[dict[str, Any]], mean: Sequence[float], std: Sequence[float]):  # noqa: ANN201
    """The ImageBlock of a features layout, or None if it has no 'image' block."""
    start = 0
    for b in layout:
        if b["name"] == "image":
            return ImageBlock(start, int(b["width"]) // 3, tuple(mean), tuple(std))
        start += int(b["width"])
    return None


def _bins(values: np.ndarray) -> dict[str, Any]:
    edges = np.unique(np.quantile(values, np.linspace(0.1, 0.9, 9)))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {
        "edges": [round(float(e), 6) for e in edges],
        "shares": [round(float(c) / len(values), 6) for c in counts],
        "median": round(float(np.median(values)), 6),
    }


def reference(
    labels: Sequence[str], measures: dict[str, np.ndarray], classes: Sequence[str]
) -> dict[str, Any]:
    """The validation images' profile: label shares and each measure's deciles."""
    n = len(labels)
    out: dict[str, Any] = {
        "images": n,
        "labels": {c: round(sum(1 for x in labels if x == c) / max(n, 1), 6) for c in classes},
    }
    for name, values in measures.items():
        out[name] = _bins(np.asarray(values, np.float64))
    return out


def psi(expected: Sequence[float], seen: Sequence[float]) -> float:
    """Population stability index of two share vectors (empty bins floored at 1e-4)."""
    e = np.maximum(np.asarray(expected, np.float64), 1e-4)
    o = np.maximum(np.asarray(seen, np.float64), 1e-4)
    return float(((o - e) * np.log(o / e)).sum())


@dataclass
class DriftCounter:
    """One run's counts in the reference's bins."""

    ref: dict[str, Any]
    labels: dict[str, int] = field(default_factory=dict)
    bins: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: Sequence[str | None], **measures: Sequence[float | None]) -> None:
        """Count one batch of rows (None: an error row, or no value)."""
        for x in label:
            if x is not None:
                self.labels[x] = self.labels.get(x, 0) + 1
        for name, vals in measures.items():
            if name not in self.ref:
                continue
            v = np.array([x for x in vals if x is not None], np.float64)
            if not len(v):
                continue
            edges = np.asarray(self.ref[name]["edges"])
            counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
            self.bins[name] = self.bins.get(name, 0) + counts
            # Medians for the message: a bounded sample is enough.
            kept = self.values.setdefault(name, [])
            if len(kept) < 100_000:
                kept.extend(v[: 100_000 - len(kept)].tolist())

    def figures(self) -> dict[str, Any]:
        """Each quantity's PSI, this run's shares and medians, and whether it shifted."""
        n = sum(self.labels.values())
        out: dict[str, Any] = {"images": n, "psi_limit": PSI_LIMIT, "judged": n >= MIN_IMAGES}
        classes = list(self.ref["labels"])
        shares = [self.labels.get(c, 0) / max(n, 1) for c in classes]
        out["labels"] = {
            "psi": round(psi(list(self.ref["labels"].values()), shares), 4),
            "shares": {c: round(s, 4) for c, s in zip(classes, shares, strict=True)},
        }
        for name, counts in self.bins.items():
            total = max(int(counts.sum()), 1)
            out[name] = {
                "psi": round(psi(self.ref[name]["shares"], counts / total), 4),
                "median": round(float(np.median(self.values[name])), 6),
                "reference_median": self.ref[name]["median"],
            }
        return out


def warnings_for(figures: dict[str, Any]) -> list[str]:
    """One sentence per quantity over the limit (none when too few images to judge)."""
    if not figures.get("judged"):
        return []
    out = []
    limit = figures["psi_limit"]
    lab = figures["labels"]
    if lab["psi"] > limit:
        top = sorted(lab["shares"].items(), key=lambda kv: -kv[1])[:3]
        said = ", ".join(f"{c} {s:.0%}" for c, s in top)
        out.append(f"labels drifted from validation's (PSI {lab['psi']:.2f} > {limit}): {said}")
    for name in MEASURES:
        f = figures.get(name)
        if f and f["psi"] > limit:
            out.append(
                f"{name} drifted from validation's (PSI {f['psi']:.2f} > {limit}): median "
                f"{f['median']:.3g} against {f['reference_median']:.3g}"
            )
    return out


def drift_line(figures: dict[str, Any]) -> str:
    """This run against validation in one line, for the end summary."""
    parts = [f"labels PSI {figures['labels']['psi']:.2f}"]
    parts += [f"{m} PSI {figures[m]['psi']:.2f}" for m in MEASURES if m in figures]
    verdict = (
        f"limit {figures['psi_limit']}"
        if figures["judged"]
        else f"too few images to judge: {figures['images']} < {MIN_IMAGES}"
    )
    return f"Drift against validation: {', '.join(parts)} ({verdict}; recorded with the results)"
