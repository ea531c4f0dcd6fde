"""The one way to run and compare artifacts: Predictors for checks, and compare_artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tlbuild.errors import UsageError
from tlbuild.export.compare import batches_of, compare_artifacts, compare_logits
from tlbuild.runtime import (
    OnnxPredictor,
    Predictor,
    RecordedPredictor,
    TensorRTPredictor,
    TorchPredictor,
    open_onnx,
)
from tlbuild.runtime.sessions import ort_session

RNG = np.random.default_rng(0)
W = RNG.standard_normal((48, 5)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)
IMAGES = RNG.standard_normal((10, 3, 4, 4)).astype(np.float32)


def _linear_onnx(path: Path) -> Path:
    """Flatten + Gemm over [N, 3, 4, 4]: five logits, weights W and B."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
        str(path),
    )
    return path


def _qdq_onnx(path: Path) -> Path:
    """The same layer with its input and weights quantized to INT8 (Q/DQ as written)."""
    sx, sw = np.float32(0.02), np.float32(np.abs(W).max() / 127)
    wq = np.clip(np.rint(W / sw), -127, 127).astype(np.int8)
    zero = np.array(0, np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "sw", "z"], ["wd"]),
            helper.make_node("Flatten", ["xd"], ["f"]),
            helper.make_node("Gemm", ["f", "wd", "b"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [
            numpy_helper.from_array(np.array(sx), "sx"),
            numpy_helper.from_array(np.array(sw), "sw"),
            numpy_helper.from_array(zero, "z"),
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(B, "b"),
        ],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        str(path),
    )
    return path


class _Shifted(Predictor):
    """Another predictor's logits, its first `flip` rows rolled to another class; refuses
    batches smaller than `min_batch` as a TensorRT engine below its profile does."""

    def __init__(self, inner: Predictor, flip: int = 0, min_batch: int = 1) -> None:
        super().__init__(Path("shifted"))
        self.inner, self.flip, self.min_batch, self.calls = inner, flip, min_batch, 0

    @property
    def backend(self) -> str:
        return "test"

    def supports_batch(self, n: int) -> bool:
        return n >= self.min_batch

    def logits(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        y = self.inner.logits(batch).copy()
        n = min(self.flip, len(y))
        y[:n] = np.roll(y[:n], 1, axis=1)
        self.flip -= n
        return y


def test_an_artifact_compared_with_itself_agrees_exactly(tmp_path: Path) -> None:
    p = open_onnx(_linear_onnx(tmp_path / "m.onnx"))
    labels = np.arange(10) % 5
    c = compare_artifacts(p, {"same": p}, batches_of(IMAGES, 4), labels)["same"]
    assert c["images"] == 10 and c["top1_agreement"] == 1.0
    assert c["max_abs_logit_diff"] == 0.0 and c["mean_abs_logit_diff"] == 0.0
    assert c["drop_points"] == 0.0 and c["accuracy"] == c["fp32_accuracy"]


def test_compare_artifacts_is_compare_logits_over_the_batches(tmp_path: Path) -> None:
    ref = open_onnx(_linear_onnx(tmp_path / "m.onnx"))
    labels = ref.logits(IMAGES).argmax(1)
    got = compare_artifacts(ref, {"flip": _Shifted(ref, flip=3)}, batches_of(IMAGES, 4), labels)
    logits = ref.logits_in_batches(IMAGES, 4)
    rolled = logits.copy()
    rolled[:3] = np.roll(rolled[:3], 1, axis=1)
    assert got["flip"] == compare_logits(logits, rolled, labels)
    assert got["flip"]["top1_agreement"] == 0.7 and got["flip"]["drop_points"] == 30.0


def test_a_candidate_stops_at_the_first_batch_it_does_not_run(tmp_path: Path) -> None:
    ref = open_onnx(_linear_onnx(tmp_path / "m.onnx"))
    small = _Shifted(ref, min_batch=3)  # batches of 4, 4, then 2: stops before the last
    every = _Shifted(ref)
    labels = np.zeros(10, np.int64)
    got = compare_artifacts(ref, {"small": small, "every": every}, batches_of(IMAGES, 4), labels)
    assert got["small"]["images"] == 8 and small.calls == 2
    assert got["every"]["images"] == 10 and every.calls == 3
    # Alone, the loop ends there: the reference does not run a batch no candidate takes.
    ref_calls = _Shifted(ref)
    compare_artifacts(ref_calls, {"small": _Shifted(ref, min_batch=3)}, batches_of(IMAGES, 4))
    assert ref_calls.calls == 2
    with pytest.raises(UsageError, match="big ran none of the batches"):
        compare_artifacts(ref, {"big": _Shifted(ref, min_batch=20)}, batches_of(IMAGES, 4))
    assert compare_artifacts(ref, {}, batches_of(IMAGES, 4)) == {}


def test_qdq_simulation_gives_the_raw_sessions_logits(tmp_path: Path) -> None:
    path = _qdq_onnx(tmp_path / "q.onnx")
    raw = ort_session(path, simulate_qdq=True).run(None, {"x": IMAGES})[0]
    p = open_onnx(path, simulate_qdq=True)
    assert np.array_equal(p.logits(IMAGES), raw)
    assert p.options.simulate_qdq and p.classes is None and p.preprocessing is None
    assert set(p.outputs(IMAGES[:1])) == {"y"}


def test_torch_module_and_its_onnx_agree(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(W.T))
        model[1].bias.copy_(torch.from_numpy(B))
    torch_p = TorchPredictor.from_module(model)
    assert torch_p.backend == "torch:cpu" and torch_p.precision == "fp32"
    onnx_p = open_onnx(_linear_onnx(tmp_path / "m.onnx"))
    c = compare_artifacts(torch_p, {"onnx": onnx_p}, batches_of(IMAGES, 16))["onnx"]
    assert c["top1_agreement"] == 1.0 and c["max_abs_logit_diff"] < 1e-5
    assert onnx_p.active_provider == "CPUExecutionProvider"


def test_recorded_logits_are_served_only_for_their_images_in_order() -> None:
    logits = RNG.standard_normal((10, 5)).astype(np.float32)
    p = RecordedPredictor(IMAGES, logits)
    assert np.array_equal(p.logits_in_batches(IMAGES, 4), logits)
    assert np.array_equal(p.logits(IMAGES[:3]), logits[:3])  # a second pass starts over
    with pytest.raises(UsageError, match="not recorded images 3..6"):
        p.logits(IMAGES[5:9])  # skipped a batch
    with pytest.raises(UsageError, match="not recorded images"):
        RecordedPredictor(IMAGES, logits).logits(IMAGES[:4] + 1)
    with pytest.raises(UsageError, match="10 images but 9 rows"):
        RecordedPredictor(IMAGES, logits[:9])


def test_classes_are_checked_when_given_and_optional_for_checks(tmp_path: Path) -> None:
    path = _linear_onnx(tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="outputs 5 scores but its manifest names 2 classes"):
        OnnxPredictor(path, ["a", "b"])
    p = open_onnx(path)
    with pytest.raises(UsageError, match="without its manifest's preprocessing"):
        p.preprocess(Image.new("RGB", (4, 4)))
    with pytest.raises(UsageError, match="without profile_prefix"):
        p.end_profiling()


def test_profiling_goes_through_the_predictor(tmp_path: Path) -> None:
    p = open_onnx(_linear_onnx(tmp_path / "m.onnx"), threads=1, profile_prefix=str(tmp_path / "o"))
    p.logits(IMAGES)
    profile = p.end_profiling()
    assert profile.is_file() and "model_run" in profile.read_text()


def test_an_engine_already_loaded_becomes_a_predictor() -> None:
    class Engine:  # stands in for TensorRTEngine: profile 2..4
        path = Path("model.int8-trt.b2-4.sm87.trt10.3.engine")
        min_batch, max_batch = 2, 4
        output_name = "logits"

        def run_all(self, x: np.ndarray) -> dict[str, np.ndarray]:
            assert 2 <= len(x) <= 4
            return {"logits": x.reshape(len(x), -1)[:, :5]}

    p = TensorRTPredictor.from_engine(Engine())  # type: ignore[arg-type]
    assert p.precision == "int8-trt" and p.backend == "tensorrt" and p.classes is None
    assert p.supports_batch(3) and not p.supports_batch(1)
    assert np.array_equal(p.logits(IMAGES[:3]), IMAGES[:3].reshape(3, -1)[:, :5])
