"""eval_logits.json: the shipped weights' logits on the validation and test images.

Training evaluates model.pt on both splits once (metrics.json comes from the same pass); the
logits are kept so that later stages (the decision threshold) work from the very numbers the
metrics were computed from instead of running the model again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlbuild.data.scan import Sample
from tlbuild.errors import UsageError
from tlbuild.fileio import read_recorded_json, write_text

EVAL_LOGITS = "eval_logits.json"
FORMAT = "tlbuild.eval_logits/1"


@dataclass(frozen=True)
class SplitLogits:
    """One split: its files (splits.json order), labels and logits (N, classes), float32."""

    paths: list[str]
    labels: np.ndarray
    logits: np.ndarray


def write_eval_logits(
    path: Path, classes: list[str], splits: dict[str, tuple[Sequence[Sample], np.ndarray]]
) -> None:
    """Write each split's files, labels and logits; compact JSON, same bytes for same logits."""
    data: dict[str, object] = {
        "format": FORMAT,
        "about": "logits of model.pt (FP32, PyTorch on the CPU) per image, in splits.json order",
        "classes": list(classes),
    }
    for name, (samples, logits) in splits.items():
        data[name] = {
            "paths": [str(s.path) for s in samples],
            "labels": [int(s.label) for s in samples],
            # 9 significant digits hold a float32 exactly, in half the characters of repr().
            "logits": [[float(f"{v:.9g}") for v in row] for row in np.asarray(logits, np.float32)],
        }
    write_text(path, json.dumps(data, separators=(",", ":")) + "\n")


def read_eval_logits(folder: Path, classes: list[str]) -> dict[str, SplitLogits]:
    """The splits recorded in folder/eval_logits.json, checked against the model's classes."""
    path = folder / EVAL_LOGITS
    raw = read_recorded_json(path, "run `tlbuild train` (or `tlbuild run`) again")
    if raw.get("format") != FORMAT or raw.get("classes") != list(classes):
        raise UsageError(f"{path} does not belong to this model; run `tlbuild train` again")
    out = {}
    for name in ("val", "test"):
        if name in raw:
            s = raw[name]
            logits = np.asarray(s["logits"], np.float32).reshape(len(s["labels"]), len(classes))
            out[name] = SplitLogits(list(s["paths"]), np.asarray(s["labels"], np.int64), logits)
    return out
