"""Find the images of an ImageFolder layout, drop unreadable ones, and split them by class."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tlbuild.data.decode_threads import DecodeThreads
from tlbuild.data.images import ImageReadError, load_rgb
from tlbuild.errors import DataError
from tlbuild.recipe import DataConfig


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: int


@dataclass
class Splits:
    """The dataset as the build uses it: sorted classes, the splits and what was skipped."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # Training images kept out of training for later decisions (data/holdout.py).
    holdout: list[Sample] = field(default_factory=list)
    # Each readable file's fingerprint when the scan was given one (the duplicate check's pHash).
    fingerprints: dict[Path, int] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split."""
        out: dict[str, dict[str, int]] = {}
        for split in ("train", "holdout", "val", "test"):
            samples: list[Sample] = getattr(self, split)
            if split in ("test", "holdout") and not samples:
                continue
            per = [0] * len(self.classes)
            for s in samples:
                per[s.label] += 1
            out[split] = dict(zip(self.classes, per, strict=True))
        return out


def list_class_folders(root: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """Image paths per class folder under `root`, both sorted; hidden entries ignored."""
    if not root.is_dir():
        raise DataError(f"data folder does not exist: {root}")
    classes: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files: list[Path] = []
        # os.walk(followlinks=False) so a symlink loop cannot make the scan endless.
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            files.extend(
                Path(dirpath) / f
                for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in extensions
            )
        classes[d.name] = files
    if not classes:
        raise DataError(
            f"no class folders under {root}: expected one sub-folder per class "
            "(e.g. ok/, scratch/) holding its images"
        )
    return classes


def find_unreadable(
    paths: Sequence[Path],
    on_checked: Callable[[int], None] | None = None,
    on_decoded: Callable[[Path, Image.Image], None] | None = None,
) -> dict[Path, str]:
    """Decode every file (JPEG at reduced scale, which still reads all the data) in threads;
    `on_decoded(path, image)` sees each readable one (called from those threads)."""

    def check(p: Path) -> tuple[Path, str | None]:
        try:
            img = load_rgb(p, draft_size=(64, 64))
            if on_decoded is not None:
                on_decoded(p, img)
            return p, None
        except ImageReadError as e:
            return p, e.reason

    bad: dict[Path, str] = {}
    # Pillow releases the GIL while decoding, so threads give real parallelism here. Daemon
    # threads: a read that hangs (a dead network mount) must not make Ctrl-C hang too.
    workers = min(8, (os.cpu_count() or 2) * 2)
    with DecodeThreads(workers, "tlbuild-scan") as pool:
        for p, reason in pool.imap(check, paths, 4 * workers):
            if reason is not None:
                bad[p] = reason
            if on_checked is not None:
                on_checked(1)
    return bad


def stratified_split(
    per_class: Sequence[Sequence[Path]], val: float, test: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Seeded split that keeps each class's share in every split (at least one val image)."""
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val_s: list[Sample] = []
    test_s: list[Sample] = []
    for label, paths in enumerate(per_class):
        order = rng.permutation(len(paths))
        shuffled = [paths[i] for i in order]
        n = len(shuffled)
        n_val = max(1, round(n * val)) if n >= 2 else 0
        n_test = max(1, round(n * test)) if test > 0 and n - n_val >= 2 else 0
        val_s += [Sample(p, label) for p in shuffled[:n_val]]
        test_s += [Sample(p, label) for p in shuffled[n_val : n_val + n_test]]
        train += [Sample(p, label) for p in shuffled[n_val + n_test :]]
    return train, val_s, test_s


def _list_splits(cfg: DataConfig) -> dict[str, dict[str, list[Path]]]:
    """Image paths per class folder of each folder the recipe names (root, or train/val/test)."""
    if cfg.root is not None:
        return {"root": list_class_folders(cfg.root, cfg.extensions)}
    assert cfg.train is not None and cfg.val is not None
    found = {
        "train": list_class_folders(cfg.train, cfg.extensions),
        "val": list_class_folders(cfg.val, cfg.extensions),
    }
    if cfg.test is not None:
        found["test"] = list_class_folders(cfg.test, cfg.extensions)
    return found


def _check_classes(cfg: DataConfig, found: dict[str, dict[str, list[Path]]]) -> list[str]:
    """The first folder's sorted classes: at least two, and every folder's classes among them."""
    first = "root" if "root" in found else "train"
    classes = sorted(found[first])
    if len(classes) < 2:
        raise DataError(
            f"only one class folder ({', '.join(classes)}) under {getattr(cfg, first)}; "
            "a classifier needs at least two (e.g. ok/ and defect/)"
        )
    for split, per in found.items():
        unknown = sorted(set(per) - set(classes))
        if unknown:
            raise DataError(
                f"{split} folder has classes the training data lacks: {', '.join(unknown)}; "
                f"add them under {getattr(cfg, first)} or remove them"
            )
    return classes


def _fingerprinter(
    fingerprint: Callable[[Image.Image], int] | None, prints: dict[Path, int]
) -> Callable[[Path, Image.Image], None] | None:
    """find_unreadable's on_decoded: each decoded image's fingerprint into `prints`."""
    if fingerprint is None:
        return None

    def on_decoded(p: Path, img: Image.Image) -> None:
        prints[p] = fingerprint(img)  # from several threads: one dict assignment is atomic

    return on_decoded


@dataclass
class _Checked:
    """The files found per folder and class, and the unreadable ones among them."""

    cfg: DataConfig
    found: dict[str, dict[str, list[Path]]]
    classes: list[str]
    bad: dict[Path, str]

    def usable(self, split: str) -> list[list[Path]]:
        """The readable files of `split`, per class."""
        return [
            [p for p in self.found[split].get(c, []) if p not in self.bad] for c in self.classes
        ]

    def check_counts(self, split: str, per_class: list[list[Path]], minimum: int) -> None:
        """DataError naming the first class of `split` with fewer than `minimum` usable files."""
        base = getattr(self.cfg, split)
        for c, paths in zip(self.classes, per_class, strict=True):
            if len(paths) < minimum:
                n_bad = sum(1 for p in self.found[split].get(c, []) if p in self.bad)
                why = f" ({n_bad} unreadable file(s) skipped)" if n_bad else ""
                raise DataError(
                    f"class '{c}' has {len(paths)} usable image(s) in {base / c}{why}; "
                    f"at least {minimum} needed: add images or remove the folder"
                )


def _split_root(checked: _Checked) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """One folder: the seeded stratified split, each class keeping enough training images."""
    cfg, classes = checked.cfg, checked.classes
    per_class = checked.usable("root")
    # Each class needs min_per_class training images plus at least one for validation.
    checked.check_counts("root", per_class, cfg.min_per_class + 1)
    train, val, test = stratified_split(per_class, cfg.split.val, cfg.split.test, cfg.split.seed)
    n_train = np.bincount([s.label for s in train], minlength=len(classes))
    for c, n, paths in zip(classes, n_train, per_class, strict=True):
        if n < cfg.min_per_class:
            raise DataError(
                f"class '{c}' keeps {n} training image(s) of {len(paths)} after the val/test "
                f"split; at least {cfg.min_per_class} needed: add images to {cfg.root / c} "
                "or lower data.split.val / data.split.test"
            )
    return train, val, test


def _split_folders(checked: _Checked) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Train, val (and test) folders: the splits as they are."""
    tr, va = checked.usable("train"), checked.usable("val")
    checked.check_counts("train", tr, checked.cfg.min_per_class)
    checked.check_counts("val", va, 1)
    train = [Sample(p, i) for i, ps in enumerate(tr) for p in ps]
    val = [Sample(p, i) for i, ps in enumerate(va) for p in ps]
    test = (
        [Sample(p, i) for i, ps in enumerate(checked.usable("test")) for p in ps]
        if "test" in checked.found
        else []
    )
    return train, val, test


def scan_dataset(
    cfg: DataConfig,
    on_checked: Callable[[int], None] | None = None,
    fingerprint: Callable[[Image.Image], int] | None = None,
) -> Splits:
    """Scan, check and split the recipe's data; raise DataError naming what to fix.

    `fingerprint` is computed from the check's own decode of each file (Splits.fingerprints), so
    the duplicate check reads no file a second time.
    """
    found = _list_splits(cfg)
    classes = _check_classes(cfg, found)
    all_paths = [p for per in found.values() for paths in per.values() for p in paths]
    prints: dict[Path, int] = {}
    bad = find_unreadable(all_paths, on_checked, _fingerprinter(fingerprint, prints))
    checked = _Checked(cfg, found, classes, bad)
    train, val, test = _split_root(checked) if "root" in found else _split_folders(checked)
    if cfg.ok_class is not None and cfg.ok_class not in classes:
        raise DataError(
            f"data.ok_class = '{cfg.ok_class}' is not one of the classes: {', '.join(classes)}"
        )
    return Splits(classes, train, val, test, skipped=sorted(bad.items()), fingerprints=prints)
