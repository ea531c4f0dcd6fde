"""One comparison of a candidate's logits with a reference's: export parity, the variant gate
and the engine gate all judge an artifact by these numbers."""

from __future__ import annotations

from typing import Any

import numpy as np


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
    }
    if labels is not None:
        labels = labels[: len(reference)]
        out["fp32_accuracy"] = float((ref_top == labels).mean())
        out["accuracy"] = float((got_top == labels).mean())
        out["drop_points"] = round((out["fp32_accuracy"] - out["accuracy"]) * 100, 4)
    return out
