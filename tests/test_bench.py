"""`tlbuild bench`: what it measures, where it writes it, and how it times."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from tlbuild.bench.timing import measure, ort_profile_check
from tlbuild.cli import app

runner = CliRunner()


def test_bench_on_an_export_folder_writes_json_parquet_and_a_table(
    tiny_build: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "device"
    shutil.copytree(tiny_build, folder)
    (folder / "bench.json").unlink()
    res = runner.invoke(app, ["bench", str(folder)])
    assert res.exit_code == 0, res.output
    assert "p99 ms" in res.output and "model.int8.cpu.onnx" in res.output
    bench = json.loads((folder / "bench.json").read_text())
    env = bench["environment"]
    assert env["cores"] >= 1 and env["cpu"] and env["versions"]["onnxruntime"]
    assert bench["settings"]["threads"] >= 1 and bench["settings"]["batch_sizes"] == [1, 4]
    rows = bench["results"]
    assert {(r["artifact"], r["batch"]) for r in rows} == {
        (a, b) for a in ("model.pt", "model.onnx", "model.int8.cpu.onnx") for b in (1, 4)
    } | {("model_image.onnx", 1), ("model_image.int8.cpu.onnx", 1)}  # frames one at a time
    by_name = {r["artifact"]: r for r in rows}
    assert by_name["model_image.onnx"]["input"] == "64x64x3 uint8"  # the frames' own size
    assert by_name["model.onnx"]["input"] == "3x64x64 float32"
    assert by_name["model_image.onnx"]["accuracy"] == by_name["model.onnx"]["accuracy"]
    for r in rows:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iters"] >= 5
        assert np.isclose(r["throughput_ips"], r["batch"] * 1000 / r["mean_ms"])
        assert 0.0 <= r["accuracy"] <= 1.0 and r["size_bytes"] > 0
    skipped = {s["artifact"] for s in bench["skipped"]}
    assert {"model.fp16.onnx", "model.int8.trt.onnx"} <= skipped  # no GPU provider here
    assert "model_image.fp16.onnx" in skipped
    checks = bench["timer_check"]
    # At the smallest batch, where the binding's own cost weighs most.
    assert {(c["artifact"], c["batch"]) for c in checks} == {
        ("model.onnx", 1),
        ("model.int8.cpu.onnx", 1),
    }
    for r in rows:  # each row says why its timing stopped, with what it knows
        assert r["stopped"] in ("precision", "cap")
        assert r["p50_ci_pct"] is None or r["p50_ci_pct"] >= 0
    assert all(c["runs"] >= 5 and c["ort_profiler_p50_ms"] > 0 for c in checks)
    df = pd.read_parquet(folder / "bench.parquet")
    assert len(df) == len(rows) and {"p99_ms", "cpu", "created", "backend"} <= set(df.columns)


def test_measure_reaches_both_the_count_and_the_time() -> None:
    calls = []
    lat = measure(
        lambda: calls.append(1), warmup_iters=3, min_iters=20, min_seconds=0.0, max_seconds=9
    )
    assert lat.samples_ms.size == 20 and len(calls) == 23
    s = lat.summary(batch=8)
    assert s["iters"] == 20 and s["p50_ms"] <= s["p99_ms"]


def test_timer_check_reads_the_onnx_runtime_profile(tiny_build: Path) -> None:
    x = np.zeros((2, 3, 64, 64), np.float32)
    c = ort_profile_check(tiny_build / "model.onnx", x, threads=1, iters=8)
    assert c["runs"] == 8 and c["batch"] == 2
    assert c["timer_p50_ms"] > 0 and c["ort_profiler_p50_ms"] > 0


def test_timing_stops_once_p50_and_p99_are_known_or_at_the_cap() -> None:
    from tlbuild.bench.timing import Precision, quantile_ci_pct

    # Order statistics: 50 calls cannot bound a p99; 1,000 steady ones bound both.
    assert quantile_ci_pct(np.linspace(1.0, 1.1, 50), 0.99) is None
    steady = np.full(1000, 2.0)
    assert quantile_ci_pct(steady, 0.5) == 0.0 and quantile_ci_pct(steady, 0.99) == 0.0
    # A call of constant cost (a clock that moves 1 ms per reading) is known to any precision
    # as soon as a p99 can be bounded (from about 380 calls), long before a generous cap.
    from types import SimpleNamespace

    from tlbuild.bench import timing

    ticks = iter(range(0, 10**12, 1_000_000))
    real = timing.time
    timing.time = SimpleNamespace(perf_counter_ns=lambda: next(ticks))  # type: ignore[assignment]
    try:
        lat = measure(lambda: None, 0, 10, 0.0, 30.0, Precision(2.0, 10.0))
    finally:
        timing.time = real
    assert lat.stopped == "precision" and 380 <= lat.samples_ms.size <= 390  # checked per 10
    assert set(lat.samples_ms) == {1.0}
    # A slow call reaches the cap first, with at least 5 runs.
    import time

    lat = measure(lambda: time.sleep(0.02), 0, 10, 0.0, 0.15, Precision(2.0, 10.0))
    assert lat.stopped == "cap" and lat.samples_ms.size >= 5
    assert lat.summary(1)["p99_ci_pct"] is None  # and says the p99 is not bounded
