"""Behaviour users of the synthetic defect dataset rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlbuild.data.synth import CLASSES, synth_defects

SIZE = 48  # small keeps the suite fast; layout and determinism do not depend on size


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_counts_and_progress(tmp_path: Path) -> None:
    calls: list[int] = []
    counts = synth_defects(tmp_path, per_class=3, size=SIZE, on_image=lambda: calls.append(1))
    assert counts == {c: 3 for c in CLASSES}
    assert len(calls) == 3 * len(CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CLASSES)
    for c in CLASSES:
        assert sorted(p.name for p in (tmp_path / c).iterdir()) == [
            f"{c}_{i:05d}.jpg" for i in range(3)
        ]


def test_images_decode_as_rgb_at_requested_size(tmp_path: Path) -> None:
    synth_defects(tmp_path, per_class=2, size=64)
    for p in tmp_path.rglob("*.jpg"):
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (64, 64)
            assert np.asarray(im).std() > 1  # not a blank frame


def test_deterministic_bytes(tmp_path: Path) -> None:
    synth_defects(tmp_path / "a", per_class=2, size=SIZE, seed=7)
    synth_defects(tmp_path / "b", per_class=2, size=SIZE, seed=7)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a and a == b


def test_seed_changes_images(tmp_path: Path) -> None:
    synth_defects(tmp_path / "a", per_class=1, size=SIZE, seed=0)
    synth_defects(tmp_path / "b", per_class=1, size=SIZE, seed=1)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_smaller_run_is_prefix_of_larger(tmp_path: Path) -> None:
    synth_defects(tmp_path / "small", per_class=3, size=SIZE)
    synth_defects(tmp_path / "big", per_class=5, size=SIZE)
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    assert len(small) == 3 * len(CLASSES) and len(big) == 5 * len(CLASSES)
    assert all(big[k] == v for k, v in small.items())


def test_classes_do_not_share_backgrounds(tmp_path: Path) -> None:
    synth_defects(tmp_path, per_class=1, size=SIZE)
    frames = [np.asarray(Image.open(tmp_path / c / f"{c}_00000.jpg"), np.float32) for c in CLASSES]
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            assert np.abs(frames[i] - frames[j]).mean() > 2


def test_no_temp_files_left(tmp_path: Path) -> None:
    synth_defects(tmp_path, per_class=2, size=SIZE)
    leftovers = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and (p.name.startswith(".") or p.suffix != ".jpg")
    ]
    assert leftovers == []


def test_rerun_into_same_folder_overwrites_cleanly(tmp_path: Path) -> None:
    synth_defects(tmp_path, per_class=2, size=SIZE)
    first = _files(tmp_path)
    synth_defects(tmp_path, per_class=2, size=SIZE)
    assert _files(tmp_path) == first


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_class": 0},
        {"per_class": -1},
        {"per_class": 2.5},
        {"per_class": 1, "size": 31},
        {"per_class": 1, "size": 1025},
        {"per_class": 1, "size": 64.0},
        {"per_class": 1, "seed": -1},
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synth_defects(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # validation happens before anything is written


def test_size_bounds_accepted(tmp_path: Path) -> None:
    assert synth_defects(tmp_path, per_class=1, size=32) == {c: 1 for c in CLASSES}
