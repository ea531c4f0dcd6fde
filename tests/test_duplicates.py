"""data.duplicates: exact and near-duplicate images across splits and classes, before training."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from rich.console import Console
from typer.testing import CliRunner

from tests.conftest import run_stage, write_recipe
from tlbuild.artifacts import DUPLICATES_CSV
from tlbuild.cli import app
from tlbuild.data.duplicates import (
    Entry,
    exact_groups,
    find_duplicates,
    near_pairs,
    phash,
    popcount,
)
from tlbuild.data.duplicates_report import read_pairs
from tlbuild.data.images import load_rgb
from tlbuild.data.synth import synth_defects
from tlbuild.recipe import DataConfig, load_recipe


def _hash(path: Path) -> int:
    # As the dataset scan decodes (scan.find_unreadable), so as a build hashes.
    return phash(load_rgb(path, draft_size=(64, 64)))


def _split_layout(src: Path, dst: Path) -> Path:
    """tiny_data as explicit train/ (6 per class) and val/ (2 per class) folders."""
    for cls in sorted(p.name for p in src.iterdir()):
        for i, f in enumerate(sorted((src / cls).iterdir())):
            folder = dst / ("val" if i >= 6 else "train") / cls
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, folder / f.name)
    return dst


def _plant(data: Path) -> dict[str, tuple[str, str]]:
    """Copies a careless dataset gets, by what they are: (original, copy) relative to data."""
    planted = {
        "label conflict": ("train/crack/crack_00000.jpg", "train/spot/from_crack.jpg"),
        "split leak, resized": ("train/ok/ok_00001.jpg", "val/ok/ok_00001_small.png"),
        "split leak, brightened": ("train/spot/spot_00002.jpg", "val/spot/spot_bright.jpg"),
        "within split, re-encoded": (
            "train/scratch/scratch_00003.jpg",
            "train/scratch/scratch_00003_q75.jpg",
        ),
    }
    for what, (orig, copy) in planted.items():
        src, dst = data / orig, data / copy
        with Image.open(src) as im:
            rgb = im.convert("RGB")
        if "resized" in what:
            rgb.resize((48, 48), Image.Resampling.BICUBIC).save(dst)
        elif "brightened" in what:
            ImageEnhance.Brightness(rgb).enhance(1.1).save(dst, quality=90)
        elif "re-encoded" in what:
            rgb.save(dst, quality=75)
        else:
            shutil.copy(src, dst)
    return planted


def _recipe(folder: Path, data: Path, mode: str) -> Path:
    return write_recipe(
        folder / "dup.toml",
        f"""
name = "dup"
output_dir = "out"
[data]
train = "{data / "train"}"
val = "{data / "val"}"
duplicates = "{mode}"
[model]
preprocess = {{ input_size = 64, resize = "resize" }}
[[train.phases]]
name = "finetune"
epochs = 1
""",
    )


@pytest.fixture()
def planted(tiny_data: Path, tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    data = _split_layout(tiny_data, tmp_path / "data")
    return data, _plant(data)


class _Stop(Exception):
    """Raised in place of training: the check before it has run."""


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(*args: object, **kwargs: object) -> None:
        raise _Stop

    monkeypatch.setattr("tlbuild.stages.train._fit", stop)


def test_copies_hash_close_and_distinct_images_far(tmp_path: Path) -> None:
    synth_defects(tmp_path, per_class=40, size=160, seed=5)
    files = sorted(tmp_path.rglob("*.jpg"))
    hashes = np.array([_hash(p) for p in files], np.uint64)
    entries = [Entry(p, "train", p.parent.name) for p in files]
    # 160 distinct images: 12,720 pairs, none within the default 4 bits.
    assert (
        find_duplicates(entries, hashes, DataConfig.model_fields["near_duplicate_distance"].default)
        == []
    )

    with Image.open(files[0]) as im:
        rgb = im.convert("RGB")
    rgb.resize((80, 80)).save(tmp_path / "half.png")
    rgb.save(tmp_path / "q75.jpg", quality=75)
    ImageEnhance.Brightness(rgb).enhance(1.1).save(tmp_path / "bright.jpg", quality=90)
    for name in ("half.png", "q75.jpg", "bright.jpg"):
        d = bin(_hash(tmp_path / name) ^ int(hashes[0])).count("1")
        assert d <= 4, (name, d)
    # A mirror image is another picture to pHash (and often another class: left/right parts).
    rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.jpg", quality=90)
    assert bin(_hash(tmp_path / "mirror.jpg") ^ int(hashes[0])).count("1") > 10


def test_phash_is_imagehash_definition(tiny_data: Path) -> None:
    """Same bits as the imagehash package (scipy's DCT): its thresholds are comparable."""
    fftpack = pytest.importorskip("scipy.fftpack")
    for path in sorted(tiny_data.rglob("*.jpg"))[:12]:
        img = load_rgb(path)
        grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
        low = fftpack.dct(fftpack.dct(grey, axis=0), axis=1)[:8, :8]
        bits = (low > np.median(low)).ravel()
        assert phash(img) == int("".join("1" if b else "0" for b in bits), 2)


@pytest.mark.parametrize("k", [0, 2, 4, 7, 10])
def test_pair_search_finds_exactly_the_pairs_within_k(k: int) -> None:
    rng = np.random.default_rng(k)
    h = rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64, endpoint=True)
    for _ in range(200):  # planted neighbours at 0..12 bits
        i, j = rng.choice(len(h), 2, replace=False)
        x = int(h[i])
        for bit in rng.choice(64, int(rng.integers(0, 13)), replace=False):
            x ^= 1 << int(bit)
        h[j] = x
    d = popcount(h[:, None] ^ h[None, :])
    want_a, want_b = np.nonzero(np.triu(d <= k, 1))
    assert len(want_a) > 20
    for method in ("bands", "blocks", "auto"):
        a, b, dist = near_pairs(h, k, method)
        assert np.array_equal(a, want_a) and np.array_equal(b, want_b), method
        assert np.array_equal(dist, d[want_a, want_b])


def test_exact_groups_compare_bytes_not_sizes(tmp_path: Path) -> None:
    for name, data in (("a", b"x" * 10), ("b", b"y" * 10), ("c", b"x" * 10), ("d", b"x" * 11)):
        (tmp_path / name).write_bytes(data)
    paths = [tmp_path / n for n in "abcd"]
    assert exact_groups(paths) == [0, 1, 0, 3]


def test_planted_duplicates_come_first_conflicts_then_leaks(
    planted: tuple[Path, dict[str, tuple[str, str]]],
) -> None:
    data, plants = planted
    files = sorted(data.rglob("*.*"))
    entries = [Entry(p, p.parts[-3], p.parent.name) for p in files]
    hashes = np.array([_hash(p) for p in files], np.uint64)
    pairs = find_duplicates(entries, hashes, 4)
    got = [
        (p.relation, p.kind, str(p.a.path.relative_to(data)), str(p.b.path.relative_to(data)))
        for p in pairs
    ]
    assert len(got) == 4, got
    assert got[0] == ("label conflict", "exact", *plants["label conflict"])
    assert {g[1:] for g in got[1:3]} == {
        ("near", *plants["split leak, resized"]),
        ("near", *plants["split leak, brightened"]),
    }
    assert got[1][0] == got[2][0] == "split leak"
    assert got[3] == ("within split", "near", *plants["within split, re-encoded"])


def test_error_mode_fails_before_training_naming_the_files(
    planted: tuple[Path, dict[str, tuple[str, str]]], tmp_path: Path
) -> None:
    data, plants = planted
    recipe = _recipe(tmp_path, data, "error")
    res = CliRunner().invoke(app, ["train", str(recipe)])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())  # the terminal wraps long lines
    assert "4 duplicate image pair(s)" in out and "Traceback" not in res.output
    assert (
        "label conflict exact train: train/crack/crack_00000.jpg = train: train/spot/from_crack.jpg"
        in out
    )
    assert 'data.duplicates = "warn"' in out and "Remove or move" in out
    export = tmp_path / "out" / "dup"
    assert not (export / "model.pt").exists()  # stopped before training
    rows = read_pairs(export / DUPLICATES_CSV)  # the list to act on is there
    assert [r["relation"] for r in rows] == [
        "label conflict",
        "split leak",
        "split leak",
        "within split",
    ]
    assert rows[0]["path"] == str(data / plants["label conflict"][0])


def test_warn_mode_prints_pairs_writes_the_file_and_report_section(
    planted: tuple[Path, dict[str, tuple[str, str]]], tmp_path: Path, no_training: None
) -> None:
    from tlbuild.report import write_report

    data, plants = planted
    recipe = load_recipe(_recipe(tmp_path, data, "warn"))
    console = Console(record=True, width=200)
    with pytest.raises(_Stop):  # got past the check to training
        run_stage("train", recipe, console)
    text = console.export_text()
    assert "Warning: 4 duplicate image pair(s) among 36 images" in text
    assert "split leak" in text and "val: val/ok/ok_00001_small.png" in text
    rows = read_pairs(recipe.out_dir / DUPLICATES_CSV)
    assert len(rows) == 4 and rows[0]["other_path"] == str(data / plants["label conflict"][1])

    report = write_report(recipe.out_dir, [], []).read_text()
    section = report[report.index("## Duplicate images") :]
    assert "4 pair(s): 1 label conflict" in section
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "`" in ln]
    assert [ln.split(" | ")[0] for ln in lines] == [
        "| label conflict",
        "| split leak",
        "| split leak",
        "| within split",
    ]
    assert "`train/crack/crack_00000.jpg`" in lines[0]


def test_off_skips_the_check(
    planted: tuple[Path, dict[str, tuple[str, str]]],
    tmp_path: Path,
    no_training: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tlbuild.data.duplicates_report as check

    data, _ = planted
    recipe = load_recipe(_recipe(tmp_path, data, "off"))
    stale = recipe.out_dir / DUPLICATES_CSV
    stale.parent.mkdir(parents=True)
    stale.write_text("relation\n")  # from an earlier run that checked
    monkeypatch.setattr(check, "phash", lambda img: pytest.fail("hashed with the check off"))
    with pytest.raises(_Stop):
        run_stage("train", recipe)
    assert not stale.exists()


def test_a_build_keeps_the_check_with_training(tiny_build: Path, tmp_path: Path) -> None:
    """The default (warn) build of distinct images: an empty pairs file, the report says so,
    and the file is training's output: reused with it, missing or a changed setting restales."""
    from tlbuild.runner import stage_status

    assert read_pairs(tiny_build / DUPLICATES_CSV) == []
    report = (tiny_build / "report.md").read_text()
    assert "## Duplicate images\n\nNone found" in report

    # The same recipe over a copy of the export folder, where it may be damaged.
    src = next(tiny_build.parent.parent.glob("*.toml"))
    folder = tmp_path / "copy"
    shutil.copytree(tiny_build, folder / "out" / tiny_build.name)

    def train_status(text: str) -> tuple[str, list[str]]:
        recipe = load_recipe(write_recipe(folder / src.name, text))
        row = next(r for r in stage_status(recipe) if r.stage == "train")
        return row.action, row.why

    original = src.read_text()
    assert train_status(original) == ("fresh", [])
    action, why = train_status(original.replace("[data]", '[data]\nduplicates = "error"'))
    assert action == "stale" and "recipe [data], [model], [train] changed" in why
    (folder / "out" / tiny_build.name / DUPLICATES_CSV).unlink()
    assert train_status(original) == ("stale", [f"{DUPLICATES_CSV} is missing"])
