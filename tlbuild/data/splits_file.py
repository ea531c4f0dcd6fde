"""splits.json: the train / val / test lists training used, read back by every later stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.artifacts import SPLITS_JSON
from tlbuild.data.scan import Sample, Splits
from tlbuild.errors import UsageError
from tlbuild.fileio import read_recorded_json


def splits_json(splits: Splits) -> dict[str, Any]:
    """JSON form: classes, counts, the lists (train, val, test, holdout) as [path, label] and
    the skipped files."""

    def paths(samples: list[Sample]) -> list[list[Any]]:
        return [[str(s.path), s.label] for s in samples]

    return {
        "classes": splits.classes,
        "counts": splits.counts(),
        "train": paths(splits.train),
        "val": paths(splits.val),
        "test": paths(splits.test),
        "holdout": paths(splits.holdout),
        "skipped": [[str(p), why] for p, why in splits.skipped],
    }


def read_split(folder: Path, split: str, classes: list[str] | None = None) -> list[Sample]:
    """One split recorded in folder/splits.json; with `classes`, checked against the model's.
    A split the file does not record (holdout, in files written before it existed) is empty."""
    path = folder / SPLITS_JSON
    recorded = read_recorded_json(path, "run `tlbuild train` again")
    if not isinstance(recorded, dict):
        raise UsageError(f"{path} is not a splits file; run `tlbuild train` again")
    if classes is not None and recorded.get("classes") != classes:
        raise UsageError(f"{path} names other classes than the model; run `tlbuild train` again")
    n = len(recorded.get("classes") or classes or [])
    entries = recorded.get(split, [])
    samples = []
    for entry in entries if isinstance(entries, list) else [None]:
        # [path, label] with a label of one of the classes; anything else is a damaged file
        # (a wrong label would make every accuracy computed from it silently wrong).
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and type(entry[1]) is int
            and 0 <= entry[1] < n
        ):
            raise UsageError(
                f"{path}: {split} has an entry that is not [path, label] with a label of one "
                f"of its {n} classes ({entry!r:.80}); run `tlbuild train` again"
            )
        samples.append(Sample(Path(entry[0]), entry[1]))
    return samples


def evenly_spaced(samples: list[Sample], n: int) -> list[Sample]:
    """`n` of `samples`, evenly spaced through the (class-ordered) split, so every class is in;
    all of them when there are no more than `n`."""
    if len(samples) <= n:
        return samples
    return [samples[i] for i in np.linspace(0, len(samples) - 1, n).round().astype(int)]
