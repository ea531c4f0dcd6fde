"""Latency as a distribution: warm-up, then timed runs until the p50 and p99 are known to a
stated precision, or a time cap is reached."""

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
    stopped: str = "minimums"  # "precision", "cap" or "minimums" (no precision asked)

    def summary(self, batch: int) -> dict[str, float | int]:
        """p50/p90/p99, mean, std, count, timed seconds and throughput (images/s)."""
        s = self.samples_ms
        mean = float(s.mean())
        p50_ci, p99_ci = quantile_ci_pct(s, 0.5), quantile_ci_pct(s, 0.99)
        return {
            "p50_ms": float(np.percentile(s, 50)),
            "p90_ms": float(np.percentile(s, 90)),
            "p99_ms": float(np.percentile(s, 99)),
            "mean_ms": mean,
            "std_ms": float(s.std(ddof=1)) if s.size > 1 else 0.0,
            "iters": int(s.size),
            "timed_s": float(s.sum() / 1000.0),
            "throughput_ips": batch * 1000.0 / mean,
            # Half-widths of the 95% intervals, in percent; None: too few calls to bound it.
            "p50_ci_pct": None if p50_ci is None else round(p50_ci, 2),
            "p99_ci_pct": None if p99_ci is None else round(p99_ci, 2),
            "stopped": self.stopped,
        }


def quantile_ci_pct(samples: np.ndarray, q: float, z: float = 1.96) -> float | None:
    """Half the width of the distribution-free 95% interval of quantile `q` (between the order
    statistics at n*q -/+ z*sqrt(n*q*(1-q))), in percent of the quantile; None while the
    samples are too few to bound it (the p99 of 50 calls: its upper rank is past the last)."""
    n = samples.size
    spread = z * np.sqrt(n * q * (1 - q))
    lo, hi = int(np.floor(n * q - spread)), int(np.ceil(n * q + spread))
    if lo < 1 or hi > n:
        return None
    s = np.sort(samples)
    mid = float(np.quantile(s, q))
    return 100.0 * float(s[hi - 1] - s[lo - 1]) / (2 * mid) if mid > 0 else None


@dataclass(frozen=True)
class Precision:
    """When a configuration's timing is known well enough: its p50 and p99 each within this
    percent (half-width of their 95% interval)."""

    p50_pct: float = 2.0
    p99_pct: float = 10.0

    def met(self, samples_ms: np.ndarray) -> bool:
        """Both quantiles bounded within their precision."""
        p50 = quantile_ci_pct(samples_ms, 0.5)
        p99 = quantile_ci_pct(samples_ms, 0.99)
        return p50 is not None and p99 is not None and p50 <= self.p50_pct and p99 <= self.p99_pct


def measure(
    call: Callable[[], Any],
    warmup_iters: int,
    min_iters: int,
    min_seconds: float,
    max_seconds: float,
    precision: Precision | None = None,
) -> Latency:
    """Time `call` (which must return only when its work is done, synchronised).

    Runs at least `min_iters` calls and `min_seconds` of timed work; then stops once the p50
    and p99 are known to `precision` (checked every 10 calls), or at `max_seconds` (the cap:
    a slow artifact at a big batch) once 5 calls are in. Without `precision`, runs to the
    minimums.
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
        if elapsed >= max_seconds and len(samples) >= 5:
            stopped = "cap"
            break
        if len(samples) < min_iters or elapsed < min_seconds:
            continue
        if precision is None:
            stopped = "minimums"
            break
        if len(samples) % 10 == 0 and precision.met(np.asarray(samples, np.float64)):
            stopped = "precision"
            break
    return Latency(np.asarray(samples, np.float64) / 1e6, stopped)


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
