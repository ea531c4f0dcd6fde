"""Which given labels are probably wrong, from out-of-fold probabilities (confident learning).

The method of Northcutt, Jiang and Chuang, "Confident Learning" (JAIR 2021), as cleanlab's
`find_label_issues(filter_by="confident_learning")` runs it: a class's threshold is the mean
probability the model gives that class over the images labelled with it; an image is counted
as confidently of class j when p_j reaches j's threshold (the most probable of several); it is a
label issue when that class is not its given label and the model's top class is not the given
one either. Issues are ranked by self-confidence (p of the given label), lowest first.
cleanlab itself is not needed (nor its scikit-learn dependency) for these few lines; the
tests check that both flag the same images when cleanlab is installed.
"""

from __future__ import annotations

import numpy as np

# cleanlab's tolerance for "reaches the threshold" and "the given label is also the argmax".
_EPS = 1e-6


def class_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per class, the mean probability of that class over the images given that label."""
    k = probs.shape[1]
    out = np.full(k, 2.0)  # a class nobody carries: never confidently predicted
    for j in range(k):
        mine = labels == j
        if mine.any():
            out[j] = probs[mine, j].mean()
    return out


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of the likely label errors, most likely first."""
    labels = np.asarray(labels)
    confident = probs >= class_thresholds(labels, probs) - _EPS
    n_confident = confident.sum(axis=1)
    guess = np.where(n_confident > 1, probs.argmax(axis=1), confident.argmax(axis=1))
    issue = (n_confident > 0) & (guess != labels)
    rows = np.arange(len(labels))
    nudged = probs.copy()
    nudged[rows, labels] += _EPS
    issue &= nudged.argmax(axis=1) != labels
    found = np.flatnonzero(issue)
    return found[np.argsort(self_confidence(labels, probs)[found], kind="stable")]


def self_confidence(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """p(given label) per image: cleanlab's default label-quality score (low = suspicious)."""
    return probs[np.arange(len(labels)), np.asarray(labels)]
