"""classify past one machine: folder (dataset) output, object storage, and the Ray engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tlbuild.classify.dataset_out import PLAN_FILE, ResultsDataset
from tlbuild.classify.run import ClassifyOptions, RayOptions, classify
from tlbuild.classify.storage import fetch_model
from tlbuild.cli import app
from tlbuild.errors import UsageError

runner = CliRunner()


def _images(folder: Path, n: int, broken: bool = True) -> Path:
    """n small JPEGs (seeded noise) plus, if asked, an empty and a non-image file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:04d}.jpg", quality=85)
    if broken:
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "notes.png").write_text("not an image")
    return folder


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows comparable across runs and engines: every column but the time, sorted by path."""
    return df.drop(columns=["classified_at"]).sort_values("path").reset_index(drop=True)


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def test_folder_out_is_one_table_for_pandas_pyarrow_and_duckdb(
    tiny_build: Path, tmp_path: Path
) -> None:
    images = _images(tmp_path / "in", 30)
    single = tmp_path / "one.parquet"
    assert classify([str(images)], tiny_build, single, ClassifyOptions()).rows == 32
    out = tmp_path / "ds"
    s = classify([str(images)], tiny_build, f"{out}/", ClassifyOptions(part_rows=10, batch_size=8))
    assert s.rows == 32 and s.errors == 2
    parts = _parts(out)
    assert len(parts) == 2  # 16 rows each: a part closes at the first batch past 10 rows
    assert (out / "_tlbuild.json").is_file() and not list(out.glob(".*tmp"))
    # The same rows as the single file, whichever reader opens the folder.
    expected = _rows(pd.read_parquet(single))
    pd.testing.assert_frame_equal(_rows(pd.read_parquet(out)), expected)
    import duckdb
    import pyarrow.dataset as pads

    assert pads.dataset(str(out)).to_table().num_rows == 32
    n, distinct = duckdb.sql(
        f"select count(*), count(distinct path) from read_parquet('{out}/*.parquet')"
    ).fetchall()[0]
    assert (n, distinct) == (32, 32)
    # One schema in every part, whatever nulls each holds.
    import pyarrow.parquet as pq

    schemas = {str(pq.read_schema(p)) for p in parts}
    assert len(schemas) == 1


def test_folder_out_resumes_sets_aside_a_broken_part_and_compacts(
    tiny_build: Path, tmp_path: Path
) -> None:
    images = _images(tmp_path / "in", 30)
    out = tmp_path / "ds"
    first = classify(
        [str(images)], tiny_build, f"{out}/", ClassifyOptions(part_rows=10, batch_size=8)
    )
    parts = _parts(out)
    # A part cut short (a copy that died mid-way): set aside, its files classified again.
    broken = parts[0]
    lost = len(pd.read_parquet(broken))
    broken.write_bytes(broken.read_bytes()[:200])
    warnings: list[str] = []
    again = classify(
        [str(images)],
        tiny_build,
        f"{out}/",
        ClassifyOptions(part_rows=10, batch_size=8),
        warn=warnings.append,
    )
    assert again.rows == lost and again.skipped == first.rows - lost
    assert (out / "_unreadable" / broken.name).is_file()
    assert any("not a readable Parquet file" in w for w in warnings)
    table = pd.read_parquet(out)
    assert len(table) == 32 and table.path.is_unique
    # --compact merges the small parts and keeps every row once.
    done = runner.invoke(
        app,
        ["classify", "--model", str(tiny_build), "--out", f"{out}/", "--compact"],
    )
    assert done.exit_code == 0, done.output
    assert "Compacted" in done.output
    assert len(_parts(out)) == 1
    pd.testing.assert_frame_equal(_rows(pd.read_parquet(out)), _rows(table))


def test_a_compaction_killed_midway_is_finished_or_undone(tiny_build: Path, tmp_path: Path) -> None:
    images = _images(tmp_path / "in", 20, broken=False)
    out = tmp_path / "ds"
    classify([str(images)], tiny_build, f"{out}/", ClassifyOptions(part_rows=8, batch_size=4))
    before = _rows(pd.read_parquet(out))
    names = [p.name for p in _parts(out)]
    # Killed after writing one merged part but before publishing: the merged part goes.
    shutil.copy(out / names[0], out / "part-z-merged.parquet")
    plan = {"remove": names[:2], "add": ["part-z-merged.parquet"], "published": False}
    (out / PLAN_FILE).write_text(json.dumps(plan))
    options = ClassifyOptions(part_rows=8, batch_size=4)
    s = classify([str(images)], tiny_build, f"{out}/", options)
    assert s.rows == 0 and not (out / "part-z-merged.parquet").exists()
    assert not (out / PLAN_FILE).exists()
    pd.testing.assert_frame_equal(_rows(pd.read_parquet(out)), before)
    # Killed after publishing, before removing the old part: it goes, no row is there twice.
    shutil.copy(out / names[0], out / "part-z-merged.parquet")
    plan = {"remove": names[:1], "add": ["part-z-merged.parquet"], "published": True}
    (out / PLAN_FILE).write_text(json.dumps(plan))
    assert classify([str(images)], tiny_build, f"{out}/", options).rows == 0
    assert not (out / names[0]).exists() and not (out / PLAN_FILE).exists()
    pd.testing.assert_frame_equal(_rows(pd.read_parquet(out)), before)


def test_folder_out_refuses_another_writer_another_model_and_foreign_files(
    tiny_build: Path, tmp_path: Path
) -> None:
    images = _images(tmp_path / "in", 4, broken=False)
    out = tmp_path / "ds"
    classify([str(images)], tiny_build, f"{out}/", ClassifyOptions())
    with pytest.raises(UsageError, match="another model or settings"):
        classify([str(images)], tiny_build, f"{out}/", ClassifyOptions(threshold=0.5))
    holder = ResultsDataset(
        str(out),
        json.loads((out / "_tlbuild.json").read_text())["identity"],
    )
    try:
        with pytest.raises(UsageError, match="another tlbuild classify is writing"):
            classify([str(images)], tiny_build, f"{out}/", ClassifyOptions())
    finally:
        holder.close()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(foreign / "x.parquet")
    with pytest.raises(UsageError, match="did not write"):
        classify([str(images)], tiny_build, f"{foreign}/", ClassifyOptions())


def test_option_mistakes_get_one_message(tiny_build: Path, tmp_path: Path) -> None:
    images = _images(tmp_path / "in", 2, broken=False)
    base = ["classify", str(images), "--model", str(tiny_build)]
    cases = [
        (["--out", str(tmp_path / "r.parquet"), "--actors", "2"], "need --engine ray"),
        (["--out", str(tmp_path / "r.parquet"), "--compact"], "part files of a folder"),
        (["--out", str(tmp_path / "r.parquet"), "--engine", "spark"], "one of local, ray"),
        (["--out", "memory://bucket/r.parquet"], "name a folder ending in '/'"),
        (["--out", str(tmp_path / "r/"), "--part-rows", "0"], "--part-rows"),
        (["--out", str(tmp_path / "r/"), "--engine", "ray", "--actors", "0"], "--actors"),
    ]
    for extra, message in cases:
        done = runner.invoke(app, [*base, *extra])
        assert done.exit_code == 2, (extra, done.output)
        assert message in done.output and "Traceback" not in done.output


# -- object storage ------------------------------------------------------------------------------


def _upload(fs, local: Path, prefix: str) -> None:  # noqa: ANN001 - an fsspec filesystem
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{prefix}/{p.relative_to(local).as_posix()}", p.read_bytes())


def test_inputs_model_and_out_in_storage_match_local_files(
    tiny_build: Path, tmp_path: Path
) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    images = _images(tmp_path / "in", 12)
    _upload(fs, images, "/job/in")
    _upload(fs, tiny_build, "/job/model")
    local = tmp_path / "local.parquet"
    classify([str(images)], tiny_build, local, ClassifyOptions())
    cache = tmp_path / "cache"
    options = ClassifyOptions(model_cache=cache)
    s = classify(["memory://job/in"], "memory://job/model", "memory://job/out/", options)
    assert s.rows == 14 and s.errors == 2
    with fs.open("/job/out/_tlbuild.json") as f:
        assert json.load(f)["identity"]["model_sha256"]
    parts = [p for p in fs.ls("/job/out", detail=False) if p.endswith(".parquet")]
    remote = pd.concat([pd.read_parquet(fs.open(p)) for p in parts])
    got = _rows(remote).drop(columns=["path"])
    want = _rows(pd.read_parquet(local)).drop(columns=["path"])
    # Same files, same rows: paths differ only by where they live.
    assert sorted(remote.path.str.rsplit("/", n=1).str[-1]) == sorted(
        pd.read_parquet(local).path.str.rsplit("/", n=1).str[-1]
    )
    pd.testing.assert_frame_equal(
        got.sort_values(["score", "file_size"]).reset_index(drop=True),
        want.sort_values(["score", "file_size"]).reset_index(drop=True),
    )
    # Resumed from storage: nothing is classified twice.
    assert (
        classify(["memory://job/in"], "memory://job/model", "memory://job/out/", options).rows == 0
    )
    # The model was fetched once into the cache, and only the files a Predictor may open
    # and the novelty score's.
    fetched = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(fetched) == 1
    assert {p.suffix for p in fetched[0].iterdir()} <= {".onnx", ".json", ".engine", ".npz"}
    assert (fetched[0] / "novelty.npz").is_file()


def test_a_fetched_model_is_checked_against_its_manifest(tiny_build: Path, tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    _upload(fs, tiny_build, "/bad/model")
    size = (tiny_build / "model.onnx").stat().st_size  # same size: the sha256 must catch it
    fs.pipe_file("/bad/model/model.onnx", b"tampered".ljust(size, b"\0"))
    with pytest.raises(UsageError, match="does not match the sha256"):
        fetch_model("memory://bad/model", tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/model.onnx"))  # nothing half-published
    with pytest.raises(UsageError, match="no manifest.json"):
        fetch_model("memory://bad/nothing", tmp_path / "cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_through_a_local_s3_server(
    tiny_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        # What FSSPEC_S3_ENDPOINT_URL sets when a run starts (fsspec reads it on import, which
        # happened before this test); every s3:// request then goes to the local server.
        import fsspec.config
        import s3fs

        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bucket")
        _upload(fs, _images(tmp_path / "in", 6), "bucket/in")
        _upload(fs, tiny_build, "bucket/model")
        done = runner.invoke(
            app,
            [
                "classify",
                "s3://bucket/in/",
                "--model",
                "s3://bucket/model/",
                "--out",
                "s3://bucket/results/",
                "--model-cache",
                str(tmp_path / "cache"),
            ],
        )
        assert done.exit_code == 0, done.output
        table = pd.read_parquet("s3://bucket/results/", storage_options={"endpoint_url": endpoint})
        assert len(table) == 8 and table.path.str.startswith("s3://bucket/in/").all()
        assert set(table.error.dropna().str.split(",").str[0]) == {"empty file", "not an image"}
        assert not fs.exists("bucket/results/_tlbuild.lock")  # released at the end
    finally:
        server.stop()


# -- Ray -----------------------------------------------------------------------------------------


def test_ray_engine_writes_the_local_engines_rows_and_resumes_after_a_kill(
    tiny_build: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray.data")
    images = _images(tmp_path / "in", 400)
    local = tmp_path / "local.parquet"
    classify([str(images)], tiny_build, local, ClassifyOptions())
    # A single file, through the CLI, on a private local cluster.
    single = tmp_path / "ray.parquet"
    cmd = [sys.executable, "-m", "tlbuild", "classify", str(images), "--model", str(tiny_build)]
    done = subprocess.run(
        [*cmd, "--out", str(single), "--engine", "ray", "--actors", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "engine ray" in done.stdout
    pd.testing.assert_frame_equal(_rows(pd.read_parquet(single)), _rows(pd.read_parquet(local)))
    # A folder, killed (SIGKILL: nothing gets to clean up) once a part is written, then resumed.
    out = tmp_path / "ds"
    args = [*cmd, "--out", f"{out}/", "--engine", "ray", "--part-rows", "64", "--batch-size", "8"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _parts(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sum(len(pd.read_parquet(p)) for p in _parts(out))
    assert 0 < written < 402, "the kill should land mid-run"
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{written:,} already in" in done.stdout
    pd.testing.assert_frame_equal(_rows(pd.read_parquet(out)), _rows(pd.read_parquet(local)))


def test_ray_engine_reports_a_bad_model_as_one_message(tiny_build: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    model = tmp_path / "model"
    shutil.copytree(tiny_build, model)
    (model / "model.int8.cpu.onnx").write_bytes(b"tampered")
    options = ClassifyOptions(
        engine="ray", artifact="model.int8.cpu.onnx", ray=RayOptions(address="local", actors=1)
    )
    with pytest.raises(UsageError, match="does not match the sha256"):
        classify([str(_images(tmp_path / "in", 2))], model, tmp_path / "r.parquet", options)
    assert not (tmp_path / "r.parquet").exists()


def test_a_path_written_in_a_part_is_not_taken_again_in_the_same_run(tmp_path: Path) -> None:
    # A file named twice (a folder and a list) after its part was written gets one row.
    from tlbuild.classify.results import COLUMNS

    ds = ResultsDataset(f"{tmp_path}/ds/", {"model_sha256": "x"}, part_rows=1)
    assert ds.claim("/data/a.jpg")
    row = {c: [None] for c in COLUMNS} | {"path": ["/data/a.jpg"], "classified_at": [0]}
    ds.add(row)  # part_rows = 1: written as a part at once
    assert len(_parts(tmp_path / "ds")) == 1
    assert not ds.claim("/data/a.jpg") and ds.done("/data/a.jpg")
    ds.close()
