"""INT8 calibration, collected once: the FP32 model's activation statistics on the calibration
images, streamed batch by batch, shared by both INT8 variants and every search trial.

Both INT8 schemes quantize the same FP32 activations, and a search trial changes only what is
derived from the statistics (the method's ranges, the nodes left in float), so one pass per
method serves them all. ONNX Runtime's histogram calibrators, given every image at once, keep
every activation of every image in memory (9.7 GB for 300 images at 160 px) and sort them to
histogram them; here one batch at a time goes through the same calibrators, whose collectors
merge histograms across calls, and the merge bins with `np.bincount` instead of a sort.
"""

from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tlbuild.runtime.providers import CPU, Placement

# Images per inference while collecting: memory is one batch's activations, whatever the
# number of images.
COLLECT_BATCH = 8


def cache_supported() -> bool:
    """Whether this onnxruntime's quantize_static reads ranges from a calibration cache
    (onnxruntime 1.26 and later); without it each call calibrates itself, as before."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


class _OneBatch:
    """A CalibrationDataReader over one batch: each collect_data call sees only it."""

    def __init__(self, input_name: str, batch: np.ndarray) -> None:
        self._left = [{input_name: batch}]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return self._left.pop() if self._left else None


@dataclass
class Calibration:
    """The calibration images of one FP32 model; `ranges(method, percentile)` collects the
    statistics for a method once and returns the calibration cache quantize_static reads."""

    src: Path
    images: np.ndarray
    folder: Path
    on: Placement = CPU  # where the FP32 model runs to collect them
    _done: dict[tuple[str, float], Path] = field(default_factory=dict)

    def ranges(self, method: str, percentile: float) -> Path:
        """The cache file for `method` (percentile only matters to 'percentile')."""
        key = (method, percentile if method == "percentile" else 0.0)
        if key not in self._done:
            path = self.folder / f"calibration-{method}-{key[1]:g}.json"
            _collect(self.src, self.images, method, percentile, path, self.on)
            self._done[key] = path
        return self._done[key]


def _collect(
    src: Path, images: np.ndarray, method: str, percentile: float, dst: Path, on: Placement
) -> None:
    """One pass of `images` through `src` for `method`; the ranges saved to `dst`."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    # quantize_static's own default set of op types, so the cache covers every tensor it asks.
    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    extra = {"percentile": percentile} if method == "percentile" else {}
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="tlbuild-calibration-") as tmp:
        calibrator = create_calibrator(
            src,
            ops,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=methods[method],
            providers=on.ort_providers(),
            extra_options=extra,
        )
        for i in range(0, len(images), COLLECT_BATCH):
            calibrator.collect_data(_OneBatch(name, images[i : i + COLLECT_BATCH]))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, dst)
