"""A slice of the training split kept out of training, for decisions made after it.

The INT8 search chooses between quantizations by the answers they change. Judged on images the
model has fit, it sees almost none change (the model is sure of them), while validation, which
it never trained on, sees several: so the search decides on images training never saw. The
validation split stays the final gate's alone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tlbuild.data.scan import Sample, Splits
from tlbuild.recipe import DataConfig

# "auto": a tenth of the training split, between these bounds. Under AUTO_MIN held-out images
# one changed answer is over 3 points, too coarse a step for a search to tell trials apart, so a
# training split too small to spare AUTO_MIN keeps every image.
AUTO_SHARE = 0.1
AUTO_MIN = 32
AUTO_MAX = 256


def holdout_size(setting: int | str, n_train: int) -> int:
    """How many training images `data.holdout` keeps out of training."""
    if setting == "auto":
        n = round(n_train * AUTO_SHARE)
        return 0 if n < AUTO_MIN else min(n, AUTO_MAX)
    return int(setting)


def hold_out(splits: Splits, cfg: DataConfig) -> Splits:
    """`splits` with `cfg.holdout` training images moved to `splits.holdout`: seeded, each
    class its share, every class keeping at least `cfg.min_per_class` training images."""
    n = holdout_size(cfg.holdout, len(splits.train))
    if n == 0 or not splits.train:
        return splits
    rng = np.random.default_rng(cfg.split.seed + 7919)  # apart from the val/test draw
    by_class: dict[int, list[Sample]] = {}
    for s in splits.train:
        by_class.setdefault(s.label, []).append(s)
    held: set[Sample] = set()
    for label in sorted(by_class):
        group = by_class[label]
        share = round(n * len(group) / len(splits.train))
        k = max(0, min(share, len(group) - cfg.min_per_class))
        held.update(group[i] for i in rng.choice(len(group), k, replace=False))
    train = [s for s in splits.train if s not in held]
    holdout = [s for s in splits.train if s in held]
    return replace(splits, train=train, holdout=holdout)
