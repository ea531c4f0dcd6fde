"""Stratified, seeded folds over every labelled image, and the key that says a fold is done."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlbuild.data.scan import Sample


def assign_folds(samples: Sequence[Sample], k: int, seed: int) -> np.ndarray:
    """Fold index per sample: each class shuffled with `seed` and dealt round-robin, so every
    fold holds each class's share (within one image) and the same seed gives the same folds."""
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    folds = np.empty(len(samples), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        # Start each class where the last one stopped: small classes do not all land in fold 0.
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset = (offset + len(idx)) % k
    return folds


def inner_val(samples: Sequence[Sample], fraction: float, seed: int) -> np.ndarray:
    """Mask of the training folds' images held out for early stopping (stratified, seeded):
    the scored fold never chooses the epoch, so its probabilities are out of sample."""
    rng = np.random.default_rng(seed + 1)
    labels = np.array([s.label for s in samples])
    mask = np.zeros(len(samples), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n = max(1, round(len(idx) * fraction)) if len(idx) >= 3 else 0
        mask[idx[rng.permutation(len(idx))[:n]]] = True
    return mask


def fold_key(settings: dict[str, Any], train: Sequence[Sample], held_out: Sequence[Sample]) -> str:
    """sha256 of the settings and of exactly which images train and which are scored."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for part in (train, held_out):
        for s in part:
            h.update(f"{s.path}\0{s.label}\n".encode("utf-8", "surrogateescape"))
        h.update(b"--\n")
    return h.hexdigest()
