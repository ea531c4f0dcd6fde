"""splits.json: the train / val / test lists training used, read back by every later stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbuild.artifacts import SPLITS_JSON
from tlbuild.data.scan import Sample, Splits
from tlbuild.errors import UsageError
from tlbuild.fileio import read_recorded_json


def splits_json(splits: Splits) -> dict[str, Any]:
    """JSON form: classes, counts, the three lists as [path, label] and the skipped files."""

    def paths(samples: list[Sample]) -> list[list[Any]]:
        return [[str(s.path), s.label] for s in samples]

    return {
        "classes": splits.classes,
        "counts": splits.counts(),
        "train": paths(splits.train),
        "val": paths(splits.val),
        "test": paths(splits.test),
        "skipped": [[str(p), why] for p, why in splits.skipped],
    }


def read_split(folder: Path, split: str, classes: list[str] | None = None) -> list[Sample]:
    """One split recorded in folder/splits.json; with `classes`, checked against the model's."""
    path = folder / SPLITS_JSON
    recorded = read_recorded_json(path, "run `tlbuild train` again")
    if classes is not None and recorded.get("classes") != classes:
        raise UsageError(f"{path} names other classes than the model; run `tlbuild train` again")
    return [Sample(Path(p), int(label)) for p, label in recorded.get(split, [])]
