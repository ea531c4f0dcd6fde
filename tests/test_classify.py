"""`tlbuild classify`: inputs, fast decode vs training preprocessing, Parquet, resume, bad files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tlbuild.classify.inputs import InputWalker
from tlbuild.classify.results import COLUMNS, ResultsFile
from tlbuild.cli import app
from tlbuild.data.images import decode, load_rgb
from tlbuild.data.preprocess import Preprocessing, load_input, preprocess, resized_size

runner = CliRunner()
CLASSES = ["crack", "ok", "scratch", "spot"]


def _photos(folder: Path) -> list[Path]:
    """Real photographs the project never trained on, saved as camera-like JPEGs."""
    skdata = pytest.importorskip("skimage.data")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        for q in (75, 95):
            p = folder / f"{name}_{q}.jpg"
            img.save(p, quality=q)
            out.append(p)
    return out


def _png_header_bomb(path: Path, w: int, h: int) -> None:
    """A PNG that claims w x h pixels: a decompression bomb to Pillow, a few bytes on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)


def _bad_files(folder: Path) -> dict[str, str]:
    """Broken files of every kind a production folder gets, and the error each must give."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    (folder / "unsupported.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    good = folder / "whole.jpg"
    Image.effect_noise((200, 150), 40).convert("RGB").save(good, quality=90)
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:900])
    good.unlink()
    _png_header_bomb(folder / "bomb.png", 30_000, 30_000)
    return {
        "empty.jpg": "empty file",
        "notes.jpg": "not an image",
        "unsupported.tif": "",
        "truncated.jpg": "cannot decode",
        "bomb.png": "too large",
    }


def _classify(*args: str) -> object:
    return runner.invoke(app, ["classify", *args])


# -- fast decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["resize", "center_crop"])
def test_fast_jpeg_decode_matches_the_training_preprocessing(tmp_path: Path, policy: str) -> None:
    """Draft-mode decoding stays within 1 grey level on average and 6 at the 99th percentile."""
    spec = Preprocessing((96, 96), "bicubic", (0.5,) * 3, (0.5,) * 3, policy, 0.875)  # type: ignore[arg-type]
    diffs, reduced = [], 0
    for p in _photos(tmp_path):
        full = load_rgb(p)
        d = decode(p, lambda w, h: tuple(int(v * 1.5) for v in resized_size(w, h, spec)))
        reduced += d.image.width < full.width
        assert (d.width, d.height) == full.size
        exact = preprocess(full, spec)
        fast = load_input(p, spec).array
        assert fast.shape == exact.shape == (3, 96, 96)
        diffs.append(np.abs(fast - exact) * 0.5 * 255)  # back to 0..255 grey levels
        assert np.array_equal(load_input(p, spec, exact=True).array, exact)
    d = np.concatenate([x.ravel() for x in diffs])
    assert reduced >= len(diffs) // 2  # the fast path really decoded at a reduced scale
    assert d.mean() <= 1.0 and np.percentile(d, 99) <= 6.0, (d.mean(), np.percentile(d, 99))


def test_exif_rotated_jpeg_keeps_its_upright_size(tmp_path: Path) -> None:
    skdata = pytest.importorskip("skimage.data")
    img = Image.fromarray(skdata.chelsea()).resize((400, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    spec = Preprocessing((50, 50), "bicubic", (0.5,) * 3, (0.5,) * 3, "center_crop", 1.0)
    mi = load_input(p, spec)
    assert (mi.width, mi.height) == (200, 400)
    exact = preprocess(load_rgb(p), spec)
    assert np.abs(mi.array - exact).mean() * 127.5 <= 1.0


# -- inputs ---------------------------------------------------------------------------------


def test_walker_follows_folders_lists_and_reports_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "locked").mkdir()
    for rel in ("a/1.jpg", "a/b/2.PNG", "a/notes.txt", "a/.hidden.jpg", "locked/3.jpg"):
        (root / rel).write_bytes(b"x")
    os.symlink(root, root / "a" / "b" / "loop")
    listed = tmp_path / "list.txt"
    listed.write_text("# nightly extras\nin/a/1.jpg\n\nmissing.jpg\n")
    real_scandir = os.scandir

    def scandir(path):  # noqa: ANN001, ANN202 - stands in for a folder we may not read
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    warnings: list[str] = []
    walker = InputWalker(warn=warnings.append)
    got = list(walker([str(root), str(listed)]))
    names = sorted(Path(p).name for p in got)
    assert names == ["1.jpg", "1.jpg", "2.PNG", "missing.jpg"]
    assert all(os.path.isabs(p) for p in got)
    assert walker.ignored == 1  # notes.txt; hidden files are not counted as images
    assert any("symlink loop" in w for w in warnings)
    assert any("locked" in w and "Permission denied" in w for w in warnings)


# -- end to end -------------------------------------------------------------------------------


def test_classify_writes_one_row_per_input_and_keeps_bad_files(
    tiny_build: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    photos = _photos(images / "photos")
    expected_errors = _bad_files(images / "broken")
    out = tmp_path / "res.parquet"
    res = _classify(str(images), "--model", str(tiny_build), "--out", str(out), "--topk", "2")
    assert res.exit_code == 0, res.output
    assert "13 files classified" in res.output and "error" in res.output
    # One denominator per column: each row's share of all files, and of the readable ones.
    cells = {
        row[0]: row[1:]
        for row in ([c.strip() for c in ln.split("│")[1:-1]] for ln in res.output.splitlines())
        if row
    }
    n_err = len(expected_errors)
    assert cells["error"] == [str(n_err), f"{n_err / 13:.1%}", "-"]
    label_rows = [v for k, v in cells.items() if k in CLASSES]
    assert sum(int(v[0]) for v in label_rows) == 13 - n_err
    assert sum(float(v[2].rstrip("%")) for v in label_rows) == pytest.approx(100, abs=0.2)
    assert not out.with_name("res.parquet.journal").exists()

    df = pd.read_parquet(out)  # pyarrow
    assert list(df.columns) == list(COLUMNS) and len(df) == len(photos) + len(expected_errors)
    good = df[df.error.isna()]
    assert set(good.label) <= set(CLASSES) and good.score.between(0, 1).all()
    assert all(
        len(t) == 2 and t[0] == lab
        for t, lab in zip(good.topk_labels.map(json.loads), good.label, strict=True)
    )
    assert (good.width > 0).all() and (good.file_size > 0).all()
    # ok_class comes from the model's manifest; photographs of other things the novelty
    # score flags are never good parts, and say so.
    assert set(good[~good.novel.astype(bool)].decided_by) <= {"argmax"}
    assert good[good.novel.astype(bool)].decided_by.str.startswith("novelty>").all()
    assert (good.defective == ((good.label != "ok") | good.novel.astype(bool))).all()
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert set(df.model_sha256) == {manifest["artifacts"]["model.int8.cpu.onnx"]["sha256"]}
    assert set(df.precision) == {"int8"} and df.classified_at.notna().all()
    bad = df[df.error.notna()].set_index(df[df.error.notna()].path.map(lambda p: Path(p).name))
    assert set(bad.index) == set(expected_errors)
    for name, reason in expected_errors.items():
        assert reason in bad.loc[name, "error"]
        assert pd.isna(bad.loc[name, "label"]) and pd.isna(bad.loc[name, "score"])

    duckdb = pytest.importorskip("duckdb")
    q = f"select count(*), count(error) from '{out}'"
    n, errors = duckdb.connect().execute(q).fetchall()[0]
    assert (n, errors) == (len(df), len(expected_errors))


def test_gif_files_in_a_folder_are_classified_as_training_reads_them(
    tiny_build: Path, tmp_path: Path
) -> None:
    images = tmp_path / "gifs"
    images.mkdir()
    frame = Image.effect_noise((64, 48), 30).convert("RGB")
    frame.save(images / "a.gif")
    frame.save(images / "b.png")
    out = tmp_path / "gif.parquet"
    res = _classify(str(images), "--model", str(tiny_build), "--out", str(out))
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert sorted(Path(p).name for p in df.path) == ["a.gif", "b.png"]
    assert df.error.isna().all()


def test_resume_skips_done_inputs_and_refuses_another_model(
    tiny_build: Path, tmp_path: Path
) -> None:
    photos = _photos(tmp_path / "photos")
    half = tmp_path / "half.txt"
    half.write_text("\n".join(str(p) for p in photos[:3]))
    out = tmp_path / "res.parquet"
    base = ["--model", str(tiny_build), "--out", str(out)]
    assert _classify(str(half), *base).exit_code == 0
    first = pd.read_parquet(out)
    res = _classify(str(tmp_path / "photos"), *base)
    assert res.exit_code == 0 and "3 already in --out" in res.output
    df = pd.read_parquet(out)
    assert len(df) == len(photos) and df.path.is_unique
    assert (
        df.set_index("path").loc[first.path, "classified_at"].tolist()
        == first.classified_at.tolist()
    )

    both = tmp_path / "both.parquet"  # a folder and a list naming files inside it
    res = _classify(
        str(tmp_path / "photos"), str(half), "--model", str(tiny_build), "--out", str(both)
    )
    assert res.exit_code == 0 and pd.read_parquet(both).path.is_unique

    other = _classify(str(tmp_path / "photos"), *base, "--artifact", "model.onnx")
    assert (
        other.exit_code == 2 and "another model" in other.output and "--overwrite" in other.output
    )
    assert len(pd.read_parquet(out)) == len(photos)  # refused: nothing touched
    again = _classify(str(tmp_path / "photos"), *base, "--artifact", "model.onnx", "--overwrite")
    assert again.exit_code == 0
    assert set(pd.read_parquet(out).artifact) == {"model.onnx"}


def test_a_kill_loses_at_most_the_batch_in_flight(tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    ident = {
        "model_sha256": "abc",
        "artifact": "m.onnx",
        "ok_class": None,
        "threshold": None,
        "topk": 1,
    }

    def rows(start: int, n: int) -> dict[str, list]:
        cols: dict[str, list] = {c: [None] * n for c in COLUMNS}
        cols["path"] = [f"/img/{i}.jpg" for i in range(start, start + n)]
        cols["label"] = ["ok"] * n
        cols["classified_at"] = [1_700_000_000_000_000] * n
        return cols

    rf = ResultsFile(out, ident, commit_rows=1000, commit_seconds=1e9)
    rf.add(rows(0, 4))  # the first batch is committed at once
    rf.add(rows(4, 4))  # journaled only
    rf.add(rows(8, 4))
    assert len(pd.read_parquet(out)) == 4  # readable at any moment, one commit behind
    with open(rf.journal_path, "a") as f:
        f.write('{"path": "/img/half-writ')  # the line being written when killed
    rf._journal.close()  # the process dies: no close(), the lock goes with it

    again = ResultsFile(out, ident)
    assert again.previous_rows == 12 and again.done("/img/11.jpg") and not again.done("/img/12.jpg")
    again.close()
    df = pd.read_parquet(out)
    assert sorted(df.path) == sorted(f"/img/{i}.jpg" for i in range(12))
    assert not rf.journal_path.exists()


def test_killing_the_process_and_rerunning_completes_the_file(
    tiny_build: Path, tmp_path: Path
) -> None:
    images = tmp_path / "many"
    images.mkdir()
    src = _photos(tmp_path / "photos")
    for i in range(400):
        shutil.copy(src[i % len(src)], images / f"{i:04d}.jpg")
    out = tmp_path / "res.parquet"
    cmd = [
        sys.executable,
        "-m",
        "tlbuild",
        "classify",
        str(images),
        "--model",
        str(tiny_build),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out.with_name(out.name + ".journal")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") > 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = pd.read_parquet(out)  # whatever was committed is a complete file
    assert 0 < len(partial) < 400
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    df = pd.read_parquet(out)
    assert len(df) == 400 and df.path.is_unique


def test_threshold_rule_and_error_rate_gate(tiny_build: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in")
    out = tmp_path / "t.parquet"
    # The threshold rule alone (the novelty flag would decide the photographs it flags).
    base = [str(tmp_path / "in"), "--model", str(tiny_build), "--out", str(out), "--novelty", "off"]
    assert _classify(*base, "--ok-class", "ok", "--threshold", "0.999").exit_code == 0
    df = pd.read_parquet(out)
    assert set(df.decided_by) == {"p(ok)<0.999"}
    assert (df.defective == (df.ok_score < 0.999)).all() and df.defective.all()

    bad = _classify(*base, "--overwrite", "--threshold", "0.5", "--ok-class", "nope")
    assert bad.exit_code == 2 and "'nope' is not a class" in bad.output

    _bad_files(tmp_path / "in")
    res = _classify(*base, "--overwrite", "--max-error-rate", "0.2")
    assert res.exit_code == 1 and "over --max-error-rate 0.2" in res.output
    assert len(pd.read_parquet(out)) == len(photos) + 5  # the rows are written all the same


def test_user_mistakes_get_one_message(tiny_build: Path, tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path / "nope"), "--model", str(tiny_build)], "input not found"),
        ([str(tmp_path), "--model", str(tmp_path / "none")], "model not found"),
        ([str(tmp_path), "--model", str(tiny_build), "--ext", ","], "--ext"),
        ([str(tmp_path), "--model", str(tiny_build), "--batch-size", "0"], "--batch-size"),
    ]
    for args, msg in cases:
        res = _classify(*args, "--out", str(tmp_path / "r.parquet"))
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (
            res.output
        )
    (tmp_path / "junk.parquet").write_text("not parquet")
    res = _classify(
        str(tmp_path), "--model", str(tiny_build), "--out", str(tmp_path / "junk.parquet")
    )
    assert res.exit_code == 2 and "not a readable Parquet file" in res.output
    assert not (tmp_path / "junk.parquet.journal").exists()


def test_retry_errors_classifies_a_fixed_file_again(tiny_build: Path, tmp_path: Path) -> None:
    src = _photos(tmp_path / "photos")[0]
    folder = tmp_path / "in"
    folder.mkdir()
    late = folder / "late.jpg"
    late.write_bytes(src.read_bytes()[:500])  # still being copied when the run came by
    shutil.copy(src, folder / "early.jpg")
    out = tmp_path / "r.parquet"
    base = [str(folder), "--model", str(tiny_build), "--out", str(out)]
    assert _classify(*base).exit_code == 0
    late.write_bytes(src.read_bytes())  # the copy has finished
    assert _classify(*base).exit_code == 0  # plain resume: nothing to do
    assert len(pd.read_parquet(out)) == 2
    res = _classify(*base, "--retry-errors")
    assert res.exit_code == 0 and "1 file classified" in res.output
    df = pd.read_parquet(out).sort_values("classified_at")
    rows = df[df.path == str(late)]
    assert len(rows) == 2 and rows.error.iloc[0] and pd.isna(rows.error.iloc[-1])


def test_a_signal_during_a_commit_waits_for_the_commit_to_finish() -> None:
    from tlbuild.classify.results import signals_deferred

    finished = False
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler would run here without the deferral
        finished = True
    assert finished


def test_classify_and_bench_run_where_torch_and_ray_are_not_installed(
    tiny_build: Path, tmp_path: Path
) -> None:
    # A device ships the export folder and ONNX Runtime, not PyTorch, timm or Ray.
    device = tmp_path / "device"
    shutil.copytree(tiny_build, device)
    images = tmp_path / "images"
    _photos(images)
    blocker = (
        "import sys\n"
        "for m in ('torch', 'timm', 'torchvision', 'ray', 'ray.data'):\n"
        "    sys.modules[m] = None\n"
        "from tlbuild.cli import main\n"
        "sys.argv = ['tlbuild'] + sys.argv[1:]\n"
        "main()\n"
    )
    script = tmp_path / "no_torch.py"
    script.write_text(blocker)
    out = tmp_path / "r.parquet"
    cmd = [sys.executable, str(script), "classify", str(images), "--model", str(device)]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_parquet(out)) == 8
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "r2/"), "--engine", "ray"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "pip install 'tlbuild[ray]'" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, str(script), "bench", str(device)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    bench = json.loads((device / "bench.json").read_text())
    assert "model.pt" not in {r["artifact"] for r in bench["results"]}
    assert any(s["artifact"] == "model.pt" and "PyTorch" in s["reason"] for s in bench["skipped"])


def test_resuming_results_of_another_tlbuild_version_is_refused_not_crashed(
    tiny_build: Path, tmp_path: Path
) -> None:
    photos = _photos(tmp_path / "in")
    out = tmp_path / "old.parquet"
    args = [str(tmp_path / "in"), "--model", str(tiny_build), "--out", str(out), "--novelty", "off"]
    assert _classify(*args).exit_code == 0
    # As a tlbuild before the novelty columns wrote it: same identity, fewer columns.
    df = pd.read_parquet(out).drop(columns=["novelty", "novel", "brightness", "sharpness"])
    import warnings

    import fastparquet

    meta = fastparquet.ParquetFile(str(out)).key_value_metadata
    out.unlink()
    with warnings.catch_warnings():  # fastparquet's own pandas deprecation notices
        warnings.simplefilter("ignore")
        fastparquet.write(str(out), df.iloc[:2], custom_metadata=meta)
    res = _classify(*args)
    assert res.exit_code == 2 and "columns of another tlbuild version" in res.output
    assert "--overwrite" in res.output and len(pd.read_parquet(out)) == 2  # untouched
    assert len(photos) > 2
