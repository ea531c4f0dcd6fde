"""Latency as a distribution: warm-up, then timed runs until both a count and a time are reached."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    """Per-call latencies of one artifact at one batch size, in milliseconds."""

    samples_ms: np.ndarray

    def summary(self, batch: int) -> dict[str, float | int]:
        """p50/p90/p99, mean, std, count, timed seconds and throughput (images/s)."""
        s = self.samples_ms
        mean = float(s.mean())
        return {
            "p50_ms": float(np.percentile(s, 50)),
            "p90_ms": float(np.percentile(s, 90)),
            "p99_ms": float(np.percentile(s, 99)),
            "mean_ms": mean,
            "std_ms": float(s.std(ddof=1)) if s.size > 1 else 0.0,
            "iters": int(s.size),
            "timed_s": float(s.sum() / 1000.0),
            "throughput_ips": batch * 1000.0 / mean,
        }


def measure(
    call: Callable[[], Any],
    warmup_iters: int,
    min_iters: int,
    min_seconds: float,
    max_seconds: float,
) -> Latency:
    """Time `call` (which must return only when its work is done, synchronised).

    Runs until at least `min_iters` calls and `min_seconds` of timed work, stopping early at
    `max_seconds` (a slow artifact at a big batch) once 5 calls are in.
    """
    for _ in range(warmup_iters):
        call()
    samples: list[int] = []
    start = time.perf_counter_ns()
    while True:
        t0 = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - t0)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        if len(samples) >= min_iters and elapsed >= min_seconds:
            break
        if elapsed >= max_seconds and len(samples) >= 5:
            break
    return Latency(np.asarray(samples, np.float64) / 1e6)


def ort_profile_check(path: Path, x: np.ndarray, threads: int, iters: int = 30) -> dict[str, Any]:
    """Time one ONNX Runtime session with this module's timer and with ORT's own profiler.

    Both see the same calls of the same session: ORT records each `model_run` in its profile;
    the timer wraps the Predictor's `logits` call, the one bench times. Their medians should
    agree within a few percent (the difference is the Python binding's cost).
    """
    from tlbuild.runtime.backends import open_onnx

    with tempfile.TemporaryDirectory() as tmp:
        p = open_onnx(path, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        lat = measure(lambda: p.logits(x), 3, iters, 0.0, 30.0)
        profile = json.loads(p.end_profiling().read_text())
    runs = [e["dur"] / 1000.0 for e in profile if e.get("name") == "model_run"]
    ort_ms = np.asarray(runs[-lat.samples_ms.size :], np.float64)  # the timed ones
    ours, theirs = float(np.median(lat.samples_ms)), float(np.median(ort_ms))
    return {
        "artifact": path.name,
        "batch": int(x.shape[0]),
        "runs": int(ort_ms.size),
        "timer_p50_ms": ours,
        "ort_profiler_p50_ms": theirs,
        "diff_pct": 100.0 * (ours - theirs) / theirs,
    }
