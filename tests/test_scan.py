from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tlbuild.data.scan import scan_dataset
from tlbuild.errors import DataError
from tlbuild.recipe import DataConfig


def _cfg(**kw: object) -> DataConfig:
    return DataConfig.model_validate(kw)


def test_stratified_split_is_seeded_and_keeps_every_class(tiny_data: Path) -> None:
    a = scan_dataset(_cfg(root=tiny_data, split={"val": 0.25, "seed": 3}))
    b = scan_dataset(_cfg(root=tiny_data, split={"val": 0.25, "seed": 3}))
    c = scan_dataset(_cfg(root=tiny_data, split={"val": 0.25, "seed": 4}))
    assert a.classes == ["crack", "ok", "scratch", "spot"]  # sorted
    assert a.val == b.val and a.train == b.train
    assert a.val != c.val
    assert a.counts()["val"] == {c: 2 for c in a.classes}
    assert a.counts()["train"] == {c: 6 for c in a.classes}
    assert not {s.path for s in a.train} & {s.path for s in a.val}


def test_unreadable_files_are_listed_and_skipped(data_copy: Path) -> None:
    (data_copy / "ok" / "zero.jpg").write_bytes(b"")
    (data_copy / "ok" / "text.png").write_text("hello")
    good = (data_copy / "ok").glob("ok_*.jpg").__next__().read_bytes()
    (data_copy / "spot" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (data_copy / "spot" / "readme.txt").write_text("ignored: not an image extension")
    splits = scan_dataset(_cfg(root=data_copy))
    skipped = {p.name: why for p, why in splits.skipped}
    assert set(skipped) == {"zero.jpg", "text.png", "cut.jpg"}
    assert skipped["zero.jpg"] == "empty file"
    used = {s.path.name for s in splits.train + splits.val}
    assert not used & set(skipped)
    assert len(used) == 32


def test_empty_or_too_small_class_stops_with_the_folder_named(data_copy: Path) -> None:
    (data_copy / "dent").mkdir()
    with pytest.raises(DataError, match=r"class 'dent' has 0 usable image\(s\) in .*dent"):
        scan_dataset(_cfg(root=data_copy))
    Image.new("RGB", (8, 8)).save(data_copy / "dent" / "a.png")
    (data_copy / "dent" / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"1 usable .*1 unreadable file\(s\) skipped"):
        scan_dataset(_cfg(root=data_copy))


def test_explicit_layout_and_unknown_val_class(tmp_path: Path, tiny_data: Path) -> None:
    import shutil

    shutil.copytree(tiny_data, tmp_path / "train")
    shutil.copytree(tiny_data, tmp_path / "val")
    s = scan_dataset(_cfg(train=tmp_path / "train", val=tmp_path / "val"))
    assert len(s.train) == len(s.val) == 32 and s.test == []
    (tmp_path / "val" / "dust").mkdir()
    with pytest.raises(DataError, match="classes the training data lacks: dust"):
        scan_dataset(_cfg(train=tmp_path / "train", val=tmp_path / "val"))


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="no class folders"):
        scan_dataset(_cfg(root=tmp_path / "flat"))


def test_one_class_is_not_a_classifier(tiny_data: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_data / "ok", tmp_path / "only" / "ok")
    with pytest.raises(DataError, match="only one class folder"):
        scan_dataset(_cfg(root=tmp_path / "only"))


def test_split_that_leaves_too_few_training_images_stops(tiny_data: Path) -> None:
    with pytest.raises(DataError, match=r"keeps 1 training image\(s\) of 8 .*lower data.split.val"):
        scan_dataset(_cfg(root=tiny_data, split={"val": 0.5, "test": 0.35}, min_per_class=2))


def test_holdout_is_seeded_stratified_and_leaves_each_class_its_minimum(tiny_data: Path) -> None:
    from tlbuild.data.holdout import hold_out

    cfg = _cfg(root=tiny_data, split={"val": 0.25, "seed": 3}, holdout=8, min_per_class=2)
    splits = scan_dataset(cfg)
    a, b = hold_out(splits, cfg), hold_out(splits, cfg)
    assert a.holdout == b.holdout and a.train == b.train  # seeded
    assert a.counts()["holdout"] == {c: 2 for c in a.classes}  # each class its share
    assert a.counts()["train"] == {c: 4 for c in a.classes}
    assert not {s.path for s in a.holdout} & {s.path for s in a.train + a.val}
    assert sorted(s.path for s in a.train + a.holdout) == sorted(s.path for s in splits.train)
    # Asking for more than the classes can spare leaves each its min_per_class images.
    greedy = hold_out(splits, cfg.model_copy(update={"holdout": 1000, "min_per_class": 5}))
    assert greedy.counts()["train"] == {c: 5 for c in a.classes}
    none = hold_out(splits, cfg.model_copy(update={"holdout": 0}))
    assert none.holdout == [] and none.train == splits.train and "holdout" not in none.counts()


@pytest.mark.parametrize(
    ("n_train", "held"), [(24, 0), (300, 0), (320, 32), (1000, 100), (9000, 256)]
)
def test_auto_holdout_is_a_tenth_between_32_and_256(n_train: int, held: int) -> None:
    from tlbuild.data.holdout import holdout_size

    assert holdout_size("auto", n_train) == held
    assert holdout_size(7, n_train) == 7


def test_a_negative_holdout_is_refused_by_name(tiny_data: Path) -> None:
    with pytest.raises(ValueError, match="holdout"):
        _cfg(root=tiny_data, holdout=-1)
