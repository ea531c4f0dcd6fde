"""One comparison of candidates' logits with a reference's: export parity, the variant gate
and the engine gate all judge an artifact by these numbers, from compare_artifacts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from tlbuild.decision.operating_point import wilson
from tlbuild.errors import UsageError
from tlbuild.runtime.base import Predictor


def compare_logits(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, Any]:
    """Logit differences and top-1 agreement; with labels, both accuracies and their drop."""
    diff = np.abs(reference.astype(np.float32) - candidate.astype(np.float32))
    ref_top, got_top = reference.argmax(1), candidate.argmax(1)
    out: dict[str, Any] = {
        "images": int(len(reference)),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float((ref_top == got_top).mean()),
        "answers_changed": int((ref_top != got_top).sum()),
    }
    if labels is not None:
        labels = labels[: len(reference)]
        out["fp32_accuracy"] = float((ref_top == labels).mean())
        out["accuracy"] = float((got_top == labels).mean())
        out["drop_points"] = round((out["fp32_accuracy"] - out["accuracy"]) * 100, 4)
        out.update(drop_bound(ref_top == labels, got_top == labels))
    return out


def drop_bound(fp32_right: np.ndarray, candidate_right: np.ndarray) -> dict[str, Any]:
    """Answers changed and a one-sided 95% upper bound on the accuracy points lost.

    The bound is the Wilson upper bound on the share of images FP32 gets right and the
    candidate gets wrong, less the share only the candidate gets right: on 109 images with
    no answer changed it is 2.4 points, with 3 lost 6.7, so a 1-point gate on a small split
    is read with its uncertainty.
    """
    n = len(fp32_right)
    lost = int((fp32_right & ~candidate_right).sum())
    gained = int((~fp32_right & candidate_right).sum())
    upper = wilson(lost, n, 0.90)[1] - gained / max(n, 1)  # two-sided 90% = one-sided 95%
    return {
        "answers_lost": lost,
        "answers_gained": gained,
        "drop_upper_points": round(100 * upper, 4),
    }


def batches_of(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of `size` images (the last one shorter)."""
    for i in range(0, len(images), size):
        yield images[i : i + size]


def compare_artifacts(
    reference: Predictor,
    candidates: Mapping[str, Predictor],
    batches: Iterable[np.ndarray],
    labels: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the reference and every candidate batch by batch (only logits kept: memory stays
    flat), then compare_logits per candidate, keyed as `candidates`."""
    if not candidates:
        return {}
    taking = dict(candidates)
    ref: list[np.ndarray] = []
    got: dict[str, list[np.ndarray]] = {name: [] for name in candidates}
    for x in batches:
        # A candidate stops at the first batch size it does not run natively (a TensorRT
        # engine below its profile), as the engine gate always did: its figures (and labels)
        # cover the images before; the reference runs only batches some candidate takes.
        taking = {name: p for name, p in taking.items() if p.supports_batch(len(x))}
        if not taking:
            break
        ref.append(reference.logits(x))
        for name, p in taking.items():
            got[name].append(p.logits(x))
    out: dict[str, dict[str, Any]] = {}
    reference_logits = np.concatenate(ref) if ref else None
    for name, parts in got.items():
        if not parts or reference_logits is None:
            raise UsageError(
                f"{name} ran none of the batches it was to be compared on (there were none, "
                "or none of a batch size it runs)"
            )
        logits = np.concatenate(parts)
        out[name] = compare_logits(reference_logits[: len(logits)], logits, labels)
    return out
