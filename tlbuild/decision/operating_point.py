"""The operating point: a threshold T on p(ok) met for an escape or a false-reject target.

A part is rejected (defective) when p(ok) < T. An escape is a defective part (any class but the
ok class) with p(ok) >= T; a false reject is an ok part with p(ok) < T. Pure functions over
scores and labels: no files, no models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

Metric = Literal["escape_rate", "false_reject_rate"]
# Thresholds where nobody reads p(ok) but where reviewers ask "and what if we used 0.9?".
REVIEW_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
_EPS = 1e-9  # keeps logits finite where a probability is exactly 0 or 1
_WORDS = {"escape_rate": "escape rate", "false_reject_rate": "false-reject rate"}


@dataclass(frozen=True)
class Counts:
    """Escapes and false rejects at one threshold, with their denominators."""

    escapes: int
    defective: int
    false_rejects: int
    ok: int

    @property
    def escape_rate(self) -> float:
        """Share of defective parts accepted as ok."""
        return self.escapes / self.defective if self.defective else 0.0

    @property
    def false_reject_rate(self) -> float:
        """Share of ok parts rejected."""
        return self.false_rejects / self.ok if self.ok else 0.0

    def rate(self, metric: Metric) -> float:
        """The named rate."""
        return self.escape_rate if metric == "escape_rate" else self.false_reject_rate

    def count(self, metric: Metric) -> tuple[int, int]:
        """(count, total) behind the named rate."""
        if metric == "escape_rate":
            return self.escapes, self.defective
        return self.false_rejects, self.ok


def counts_at(p_ok: np.ndarray, is_ok: np.ndarray, threshold: float) -> Counts:
    """Counts at `threshold`, compared exactly as `tlbuild classify` does (p(ok) < T rejects)."""
    accepted = np.asarray(p_ok) >= threshold
    is_ok = np.asarray(is_ok, bool)
    return Counts(
        escapes=int((accepted & ~is_ok).sum()),
        defective=int((~is_ok).sum()),
        false_rejects=int((~accepted & is_ok).sum()),
        ok=int(is_ok.sum()),
    )


def wilson(count: int, total: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of count/total, two-sided at `confidence` (e.g. 0.95).

    Wilson rather than the normal approximation: it stays inside [0, 1] and is not zero-width
    at 0 escapes, which is exactly where small validation sets of good models sit.
    """
    if total == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = count / total, z * z
    denom = 1 + z2 / total
    centre = (p + z2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denom
    low = 0.0 if count == 0 else max(0.0, centre - half)
    high = 1.0 if count == total else min(1.0, centre + half)
    return low, high


def images_for_upper_bound(limit: float, confidence: float) -> int | None:
    """Fewest images whose Wilson upper bound reaches `limit` with a count of 0 (None: never)."""
    if limit <= 0:
        return None
    z2 = NormalDist().inv_cdf(0.5 + confidence / 2) ** 2
    # Upper bound at 0 of n is z^2 / (n + z^2).
    return math.ceil(z2 * (1 - limit) / limit - 1e-9)


@dataclass(frozen=True)
class Target:
    """What the threshold must achieve: one rate at most `limit`, by the point estimate or by
    the Wilson upper bound at `confidence`."""

    metric: Metric
    limit: float
    confidence: float = 0.95
    upper_bound: bool = False

    @property
    def key(self) -> str:
        """The recipe key: max_escape_rate or max_false_reject_rate."""
        return f"max_{self.metric}"

    def value(self, c: Counts) -> float:
        """What is compared with the limit: the rate, or its Wilson upper bound."""
        if self.upper_bound:
            return wilson(*c.count(self.metric), self.confidence)[1]
        return c.rate(self.metric)

    def met(self, c: Counts) -> bool:
        """Whether `c` meets the target."""
        return self.value(c) <= self.limit


@dataclass(frozen=True)
class Curve:
    """Every operating point a set of scores allows.

    With the distinct scores s_0 < ... < s_{m-1}, cell j holds the thresholds in
    (s_{j-1}, s_j] (s_{-1} = 0, s_m = 1): all of them give the same counts. Cell 0 accepts
    every part, cell m rejects every one.
    """

    scores: np.ndarray
    escapes: np.ndarray  # per cell, m + 1 entries
    false_rejects: np.ndarray
    defective: int
    ok: int

    @property
    def cells(self) -> int:
        """Number of cells (distinct scores + 1)."""
        return len(self.escapes)

    def counts(self, j: int) -> Counts:
        """The counts every threshold of cell j gives."""
        return Counts(int(self.escapes[j]), self.defective, int(self.false_rejects[j]), self.ok)

    def bounds(self, j: int) -> tuple[float, float]:
        """(low, high]: the thresholds of cell j."""
        low = float(self.scores[j - 1]) if j > 0 else 0.0
        high = float(self.scores[j]) if j < len(self.scores) else 1.0
        return low, high

    def reachable(self, j: int) -> bool:
        """Whether a threshold in (0, 1], which classify accepts, falls in cell j."""
        low, high = self.bounds(j)
        return high > 0.0 and low < 1.0


def curve(p_ok: np.ndarray, is_ok: np.ndarray) -> Curve:
    """The escape / false-reject counts of every distinct threshold over these scores."""
    p_ok = np.asarray(p_ok)
    is_ok = np.asarray(is_ok, bool)
    scores, where = np.unique(p_ok, return_inverse=True)
    ok_at = np.bincount(where[is_ok], minlength=len(scores))
    defect_at = np.bincount(where[~is_ok], minlength=len(scores))
    n_defect, n_ok = int((~is_ok).sum()), int(is_ok.sum())
    # Cell j: ok parts scored <= s_{j-1} are rejected, defective ones scored above it accepted.
    false_rejects = np.concatenate([[0], np.cumsum(ok_at)])
    escapes = n_defect - np.concatenate([[0], np.cumsum(defect_at)])
    return Curve(scores, escapes, false_rejects, n_defect, n_ok)


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def _inside(t: float, low: float, high: float) -> bool:
    # Compared in float32, as classify compares float32 probabilities with the threshold.
    t32 = np.float32(t)
    return bool(np.float32(low) < t32 <= np.float32(high)) and 0.0 < t <= 1.0


def threshold_in(low: float, high: float) -> float:
    """A short decimal threshold in the middle of the cell (low, high].

    Every threshold of the cell gives the same counts on these images; the middle leaves the
    most room on both sides for images not seen yet and for the few-thousandths shifts of
    p(ok) that INT8 and FP16 artifacts make (sklearn's trees split at the midpoint of two
    values for the same reason). The middle is taken between logits, since p(ok) crowds
    near 0 and 1; then the shortest decimal within the middle half of that span is used, so
    the rule reads "p(ok)<0.9", not "p(ok)<0.8973412".
    """
    a, b = _logit(low), _logit(high)
    mid = (a + b) / 2
    centre = 1 / (1 + math.exp(-mid))
    for digits in range(1, 13):
        t = round(centre, digits)
        if _inside(t, low, high) and abs(_logit(t) - mid) <= (b - a) / 4:
            return t
    return centre if _inside(centre, low, high) else high


@dataclass(frozen=True)
class Choice:
    """The chosen threshold, its counts on the images it was chosen on, and whether it meets
    the target."""

    threshold: float
    counts: Counts
    met: bool


def choose(c: Curve, target: Target) -> Choice:
    """The threshold for `target` over the curve's images.

    max_escape_rate: the fewest false rejects (highest yield) among thresholds that meet it,
    then the fewest escapes. max_false_reject_rate: the fewest escapes among thresholds that
    meet it, then the fewest false rejects. A threshold that rejects every ok part (or accepts
    every defective one) does not count as meeting a target. When none does, the strictest
    sensible threshold is returned with `met` False: the fewest escapes reachable while some ok
    parts are still accepted (or the fewest false rejects while some defective parts are still
    rejected), then the best other rate at that count.
    """
    cells = [j for j in range(c.cells) if c.reachable(j)]
    sensible = [j for j in cells if c.false_rejects[j] < c.ok and c.escapes[j] < c.defective]
    meeting = [j for j in sensible if target.met(c.counts(j))]
    if target.metric == "escape_rate":
        order = (c.false_rejects, c.escapes)
    else:
        order = (c.escapes, c.false_rejects)
    if meeting:
        j = min(meeting, key=lambda i: (order[0][i], order[1][i]))
    else:
        j = min(sensible or cells, key=lambda i: (order[1][i], order[0][i]))
    return Choice(threshold_in(*c.bounds(j)), c.counts(j), bool(meeting))


def rule(ok_class: str, threshold: float) -> str:
    """The decision rule as `tlbuild classify` writes it in `decided_by`."""
    return f"p({ok_class})<{threshold:g}"


def why_not_met(choice: Choice, target: Target, ok_class: str) -> str:
    """One sentence saying why no threshold meets the target, and what comes closest."""
    count, total = choice.counts.count(target.metric)
    at = rule(ok_class, choice.threshold)
    if target.metric == "escape_rate":
        cost, parts = "without rejecting every ok part", "defective parts accepted"
    else:
        cost, parts = "without accepting every defective part", "ok parts rejected"
    closest = f"the closest otherwise is {at}: {count} of {total} {parts}"
    if not target.upper_bound:
        return (
            f"no threshold meets {target.key} {target.limit:g} on the validation split {cost}; "
            f"{closest} ({count / total:.1%})"
        )
    upper = wilson(count, total, target.confidence)[1]
    need = images_for_upper_bound(target.limit, target.confidence)
    enough = (
        f"even with none, the upper bound reaches {target.limit:.2%} only from {need:,} images"
        if need is not None
        else "no number of images brings an upper bound to 0"
    )
    return (
        f"no threshold brings the {target.confidence:.0%} Wilson upper bound of the "
        f"{_WORDS[target.metric]} to {target.key} {target.limit:g} {cost}; "
        f"{closest}, upper bound {upper:.1%} ({enough})"
    )
