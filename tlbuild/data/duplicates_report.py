"""The build's duplicate check (data.duplicates): a summary, duplicates.csv and report.md section.

Runs in the train stage right after the dataset scan, on the pHashes the scan computed from its
own decode of every file, so it is part of training's work and outputs: keyed on the data and
the `[data]` section like the rest of training, reused with it, and `tlbuild status` sees a
changed or missing duplicates.csv as it sees a changed model.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape

from tlbuild.artifacts import DUPLICATES_CSV
from tlbuild.data.duplicates import (
    RELATIONS,
    SPLIT_ORDER,
    Entry,
    Pair,
    find_duplicates,
    phash,
)
from tlbuild.data.scan import Splits
from tlbuild.errors import DataError
from tlbuild.fileio import write_text
from tlbuild.recipe import DataConfig

COLUMNS = (
    "relation",
    "kind",
    "distance",
    "path",
    "split",
    "class",
    "other_path",
    "other_split",
    "other_class",
)
SHOWN = 10  # pairs printed by the build
REPORTED = 50  # pairs listed in report.md


def fingerprint_for(cfg: DataConfig) -> Callable[[Image.Image], int] | None:
    """What the dataset scan should compute per image for this recipe (None: nothing)."""
    return None if cfg.duplicates == "off" else phash


def _entries(splits: Splits) -> list[Entry]:
    return [
        Entry(s.path, split, splits.classes[s.label])
        for split in SPLIT_ORDER
        for s in getattr(splits, split)
    ]


def _data_folder(cfg: DataConfig) -> Path:
    folders = [str(p) for p in (cfg.root, cfg.train, cfg.val, cfg.test) if p is not None]
    return Path(os.path.commonpath(folders))


def _short(path: Path | str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def _rows(pairs: Sequence[Pair]) -> list[dict[str, str]]:
    return [
        {
            "relation": p.relation,
            "kind": p.kind,
            "distance": str(p.distance),
            "path": str(p.a.path),
            "split": p.a.split,
            "class": p.a.label,
            "other_path": str(p.b.path),
            "other_split": p.b.split,
            "other_class": p.b.label,
        }
        for p in pairs
    ]


def write_pairs(path: Path, pairs: Sequence[Pair]) -> None:
    """Every pair as CSV (absolute paths, most harmful first), atomically; a header alone if
    there are none, which says the check ran."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(pairs))
    write_text(path, buf.getvalue())


def read_pairs(path: Path) -> list[dict[str, str]]:
    """duplicates.csv back as rows (column name to text)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _tally(rows: Sequence[dict[str, str]]) -> str:
    """'2 label conflicts (1 exact, 1 near), 1 split leak (exact)'."""
    per = {r: {"exact": 0, "near": 0} for r in RELATIONS}
    for row in rows:
        per[row["relation"]][row["kind"]] += 1
    names = {
        "label conflict": ("label conflict", "label conflicts", "one image in two classes"),
        "split leak": ("split leak", "split leaks", "across train/val/test"),
        "within split": ("copy within a split", "copies within a split", "same class"),
    }
    parts = []
    for rel, kinds in per.items():
        n = kinds["exact"] + kinds["near"]
        if n:
            one, many, what = names[rel]
            how = ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
            parts.append(f"{n} {one if n == 1 else many} ({what}; {how})")
    return ", ".join(parts)


def _pair_line(row: dict[str, str], base: Path) -> str:
    kind = "exact" if row["kind"] == "exact" else f"near ({row['distance']} bits)"
    a = f"{row['split']}: {_short(row['path'], base)}"
    b = f"{row['other_split']}: {_short(row['other_path'], base)}"
    return f"{row['relation']:<14} {kind:<15} {a}  =  {b}"


def summary_lines(
    rows: Sequence[dict[str, str]], images: int, base: Path, csv_path: Path, shown: int = SHOWN
) -> list[str]:
    """What the build prints: the counts, then the first pairs with their paths."""
    lines = [
        f"{len(rows)} duplicate image pair(s) among {images:,} images: {_tally(rows)}. "
        f"Paths under {base}:"
    ]
    lines += ["  " + _pair_line(r, base) for r in rows[:shown]]
    more = f"  ... and {len(rows) - shown} more; " if len(rows) > shown else "  "
    return [*lines, f"{more}every pair, with full paths: {csv_path}"]


def check_duplicates(cfg: DataConfig, splits: Splits, out: Path, console: Console) -> list[Pair]:
    """Apply data.duplicates to the scanned data: print and write the pairs (warn), or raise
    DataError before training (error), or remove a stale pairs file (off)."""
    path = out / DUPLICATES_CSV
    if cfg.duplicates == "off":
        path.unlink(missing_ok=True)  # from a run that checked
        return []
    entries = _entries(splits)
    hashes = np.array([splits.fingerprints[e.path] for e in entries], np.uint64)
    pairs = find_duplicates(entries, hashes, cfg.near_duplicate_distance)
    write_pairs(path, pairs)
    if not pairs:
        console.print(
            f"No duplicate images among {len(entries):,} (exact copies, or pHash within "
            f"{cfg.near_duplicate_distance} bits)"
        )
        return pairs
    lines = summary_lines(_rows(pairs), len(entries), _data_folder(cfg), path)
    if cfg.duplicates == "error":
        raise DataError(
            "\n".join(lines)
            + "\nRemove or move one file of each pair (a near pair that is two different "
            'images: lower data.near_duplicate_distance), or set data.duplicates = "warn" '
            "to train anyway"
        )
    console.print(f"[yellow]Warning: {escape(lines[0])}[/]")
    for line in lines[1:]:
        console.print(escape(line), soft_wrap=True)
    return pairs


def report_section(out: Path) -> list[str]:
    """report.md's "Duplicate images" section from duplicates.csv ([] when the check is off)."""
    path = out / DUPLICATES_CSV
    if not path.is_file():
        return []
    rows = read_pairs(path)
    lines = ["## Duplicate images", ""]
    if not rows:
        return [*lines, "None found: no exact copies or near duplicates in or across splits.", ""]
    paths = [r[k] for r in rows for k in ("path", "other_path")]
    base = Path(os.path.commonpath(paths)) if len(set(paths)) > 1 else Path(paths[0]).parent
    lines += [
        f"{len(rows)} pair(s): {_tally(rows)}. A split leak lets validation or test images "
        "be learnt in training and inflates their accuracy; a label conflict teaches two "
        f"answers for one image. Every pair is in `{DUPLICATES_CSV}`; paths below are under "
        f"`{base}`.",
        "",
        "| problem | kind | file | split, class | other file | split, class |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows[:REPORTED]:
        kind = "exact" if r["kind"] == "exact" else f"near, {r['distance']} bits"
        cells = [
            r["relation"],
            kind,
            f"`{_short(r['path'], base)}`",
            f"{r['split']}, {r['class']}",
            f"`{_short(r['other_path'], base)}`",
            f"{r['other_split']}, {r['other_class']}",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if len(rows) > REPORTED:
        lines.append(f"\n... and {len(rows) - REPORTED} more pairs in `{DUPLICATES_CSV}`.")
    return [*lines, ""]
