"""TensorRT engine building and running.

The naming, version and status logic runs everywhere (TensorRT is faked where needed); the
engine tests need TensorRT and a CUDA GPU and are skipped with tensorrt_status()'s reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tlbuild.errors import BuildError, UsageError
from tlbuild.export import tensorrt_compile as tb
from tlbuild.export.tensorrt_compile import (
    BatchProfile,
    compile_engine,
    engine_file_name,
    network_flags,
)
from tlbuild.runtime import tensorrt as rt
from tlbuild.runtime.tensorrt import TensorRTEngine, tensorrt_status, trt_version_xy

TRT_OK, TRT_REASON = tensorrt_status()
needs_tensorrt = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(not TRT_OK, reason=TRT_REASON),
]


# --- runs everywhere ---------------------------------------------------------------------------


def test_engine_file_name_encodes_precision_batch_gpu_and_tensorrt() -> None:
    name = engine_file_name("int8-trt", 1, 32, "8.7", "10.3")
    assert name == "model.int8-trt.b1-32.sm87.trt10.3.engine"
    assert engine_file_name("fp16", 4, 4, "9.0", "11.0") == "model.fp16.b4-4.sm90.trt11.0.engine"
    assert (
        engine_file_name("fp32", 1, 8, "12.0", "10.13") == "model.fp32.b1-8.sm120.trt10.13.engine"
    )


def test_engine_file_name_keeps_only_major_minor_of_the_version() -> None:
    assert (
        engine_file_name("fp32", 1, 8, "8.6", "10.3.0.26") == "model.fp32.b1-8.sm86.trt10.3.engine"
    )
    assert trt_version_xy("11.0.0") == "11.0"
    assert trt_version_xy("10") == "10.0"
    assert trt_version_xy("10.8.0.43+cuda12") == "10.8"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("fp16/x", 1, 8, "8.7", "10.3"), "precision"),
        (("", 1, 8, "8.7", "10.3"), "precision"),
        (("fp16", 0, 8, "8.7", "10.3"), "batch range"),
        (("fp16", 9, 8, "8.7", "10.3"), "batch range"),
        (("fp16", 1, 8, "87", "10.3"), "compute capability"),
        (("fp16", 1, 8, "8.7", "ten"), "version"),
    ],
)
def test_engine_file_name_rejects_bad_parts(args: tuple, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        engine_file_name(*args)


def test_network_flags_strongly_typed_on_10_and_nothing_on_11() -> None:
    flags_10 = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    assert network_flags(flags_10, 10) == 1 << 1
    # 11.x: always strongly typed; the flag is deprecated (or gone) and must not matter.
    assert network_flags(SimpleNamespace(STRONGLY_TYPED=0), 11) == 0
    assert network_flags(SimpleNamespace(), 11) == 0
    with pytest.raises(UsageError, match="strongly typed"):
        network_flags(SimpleNamespace(EXPLICIT_BATCH=0), 10)
    with pytest.raises(UsageError, match="strongly typed"):
        network_flags(SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1), 8)


def test_tensorrt_status_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    ok, reason = tensorrt_status()
    assert not ok
    assert "'tensorrt' is not importable" in reason


def test_tensorrt_status_here_gives_a_reason_when_unavailable() -> None:
    ok, reason = tensorrt_status()
    assert isinstance(ok, bool) and reason
    if ok:
        assert reason.startswith("TensorRT ") and "(sm_" in reason
    else:
        assert "tensorrt" in reason.lower() or "CUDA GPU" in reason


def _fake_trt(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)


def test_tensorrt_status_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_trt(monkeypatch, "10.3.0.26")
    monkeypatch.setattr(rt, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(rt, "cuda_mismatch", lambda: None)  # versions agree (or are unknown)
    ok, reason = tensorrt_status()
    assert not ok
    assert reason.startswith("TensorRT 10.3 is installed but no CUDA GPU is visible")


def test_tensorrt_status_names_a_cuda_driver_and_runtime_mismatch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cuda-python 13 on JetPack 6's CUDA 12 driver: the device count fails; say why.
    _fake_trt(monkeypatch, "10.3.0.26")
    monkeypatch.setattr(rt, "cuda_device_count", lambda: 0)
    fake = SimpleNamespace(
        cudaDriverGetVersion=lambda: (0, 12060), cudaRuntimeGetVersion=lambda: (0, 13000)
    )
    monkeypatch.setattr(rt, "cudart", lambda: fake)
    ok, reason = tensorrt_status()
    assert not ok
    assert "the driver supports CUDA 12.6 but cuda-python's runtime is CUDA 13.0" in reason
    assert "'cuda-python>=12,<13'" in reason
    # Matching versions: no mismatch to name; the generic reason stands.
    fake.cudaRuntimeGetVersion = lambda: (0, 12040)
    assert rt.cuda_mismatch() is None
    fake.cudaDriverGetVersion = lambda: (0, 0)
    assert rt.cuda_mismatch() == "no NVIDIA driver is loaded"


def test_tensorrt_status_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_trt(monkeypatch, "8.6.1")
    ok, reason = tensorrt_status()
    assert not ok and "TensorRT 8.6" in reason and "10 or newer" in reason


def test_tensorrt_status_names_version_gpu_and_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_trt(monkeypatch, "11.0.0.5")
    monkeypatch.setattr(rt, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(rt, "gpu_identity", lambda: ("NVIDIA Jetson AGX Orin", "8.7"))
    assert tensorrt_status() == (True, "TensorRT 11.0 on NVIDIA Jetson AGX Orin (sm_87)")


def test_build_and_load_refuse_clearly_without_tensorrt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(rt, "tensorrt_status", lambda: (False, "no TensorRT here"))
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"not used")
    with pytest.raises(UsageError, match="no TensorRT here"):
        compile_engine(
            onnx_path, tmp_path, "fp32", BatchProfile(1, 4, 8), 256, tmp_path / "timing.cache"
        )
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not used")
    with pytest.raises(UsageError, match="no TensorRT here"):
        TensorRTEngine(engine)


def test_compile_engine_checks_its_arguments_first(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    with pytest.raises(UsageError, match="min <= opt <= max"):
        compile_engine(tmp_path / "m.onnx", tmp_path, "fp32", BatchProfile(1, 16, 8), 256, cache)
    with pytest.raises(UsageError, match="workspace"):
        compile_engine(tmp_path / "m.onnx", tmp_path, "fp32", BatchProfile(1, 4, 8), 0, cache)
    with pytest.raises(UsageError, match="not found"):
        compile_engine(tmp_path / "m.onnx", tmp_path, "fp32", BatchProfile(1, 4, 8), 256, cache)


def _fake_network(*layers: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])


def _layer(kind: str, *dtypes: str) -> SimpleNamespace:
    outs = [SimpleNamespace(dtype=d) for d in dtypes]
    return SimpleNamespace(type=kind, num_outputs=len(outs), get_output=lambda j: outs[j])


def test_graph_precision_and_label_check() -> None:
    trt = SimpleNamespace(
        LayerType=SimpleNamespace(QUANTIZE="Q", DEQUANTIZE="DQ"),
        DataType=SimpleNamespace(HALF="half", FLOAT="float"),
    )
    fp32 = _fake_network(_layer("conv", "float"), _layer("gemm", "float"))
    fp16 = _fake_network(_layer("cast", "half"), _layer("conv", "half"), _layer("cast", "float"))
    int8 = _fake_network(_layer("Q", "int8"), _layer("DQ", "float"), _layer("conv", "float"))
    assert tb._graph_precision(trt, fp32) == "fp32"
    assert tb._graph_precision(trt, fp16) == "fp16"
    assert tb._graph_precision(trt, int8) == "int8"
    tb._check_precision("int8-trt", "int8", Path("model.int8.trt.onnx"))
    tb._check_precision("custom", "fp16", Path("m.onnx"))  # unknown families are not checked
    with pytest.raises(BuildError, match="FP32 graph"):
        tb._check_precision("fp16", "fp32", Path("model.onnx"))


# --- needs TensorRT and a GPU ------------------------------------------------------------------


class TinyNet(nn.Module):
    """Conv-BN-ReLU, pooling and a linear head: the layer kinds a real classifier uses."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def export_tiny_onnx(path: Path, size: int = 32) -> Path:
    """A tiny FP32 classifier as ONNX with a dynamic batch (example batch 2, not 1)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            model,
            (torch.randn(2, 3, size, size),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
        )
    return path


def test_tiny_onnx_has_a_dynamic_batch(tmp_path: Path) -> None:
    # Checks the engine tests' model here too, where those tests are skipped.
    import onnx

    from tlbuild.runtime.sessions import ort_session

    path = export_tiny_onnx(tmp_path / "model.onnx")
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    sess = ort_session(path)
    for n in (1, 8):
        out = sess.run(None, {"input": np.zeros((n, 3, 32, 32), np.float32)})[0]
        assert out.shape == (n, 5)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tb.EngineInfo, Path]:
    folder = tmp_path_factory.mktemp("trt")
    onnx_path = export_tiny_onnx(folder / "model.onnx")
    cache = folder / "cache" / "timing.cache"
    info = compile_engine(onnx_path, folder / "engines", "fp32", BatchProfile(1, 4, 8), 256, cache)
    return onnx_path, info, cache


class TestEngine:
    pytestmark = needs_tensorrt

    def test_engine_file_name_and_info(self, tiny_engine: tuple) -> None:
        _, info, _ = tiny_engine
        expected = engine_file_name("fp32", 1, 8, info.compute_capability, info.trt_version)
        assert info.path.name == expected and info.path.is_file()
        assert (info.min_batch, info.opt_batch, info.max_batch) == (1, 4, 8)
        assert info.path.stat().st_size > 0 and info.build_seconds > 0
        assert not list(info.path.parent.glob(".*.tmp*"))  # no temporary file left behind

    def test_timing_cache_is_written_and_reused(self, tiny_engine: tuple) -> None:
        onnx_path, info, cache = tiny_engine
        assert cache.is_file() and cache.stat().st_size > 0
        again = compile_engine(
            onnx_path, info.path.parent, "fp32", BatchProfile(1, 4, 8), 256, cache
        )
        assert again.path == info.path and cache.stat().st_size > 0

    def test_fp32_engine_matches_onnxruntime(self, tiny_engine: tuple) -> None:
        from tlbuild.runtime.sessions import ort_session

        onnx_path, info, _ = tiny_engine
        sess = ort_session(onnx_path)
        core = TensorRTEngine(info.path)
        assert (core.min_batch, core.opt_batch, core.max_batch) == (1, 4, 8)
        assert core.input_chw == (3, 32, 32)
        rng = np.random.default_rng(0)
        for n in (1, 3, 4, 8):
            x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
            ref = sess.run(None, {"input": x})[0]
            got = core.run(x)
            assert got.dtype == np.float32 and got.shape == ref.shape == (n, 5)
            np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)

    def test_batch_outside_the_profile_is_refused(self, tiny_engine: tuple) -> None:
        _, info, _ = tiny_engine
        core = TensorRTEngine(info.path)
        with pytest.raises(UsageError, match="outside .* profile 1..8"):
            core.run(np.zeros((9, 3, 32, 32), np.float32))
        with pytest.raises(UsageError, match="batches"):
            core.run(np.zeros((2, 3, 16, 16), np.float32))

    def test_precision_label_must_match_the_graph(self, tiny_engine: tuple) -> None:
        onnx_path, info, cache = tiny_engine
        with pytest.raises(BuildError, match="FP32 graph"):
            compile_engine(onnx_path, info.path.parent, "fp16", BatchProfile(1, 4, 8), 256, cache)

    def test_fixed_batch_onnx_is_refused(self, tiny_engine: tuple, tmp_path: Path) -> None:
        import onnx

        onnx_path, _, cache = tiny_engine
        m = onnx.load(str(onnx_path))
        for vi in list(m.graph.input) + list(m.graph.output):
            vi.type.tensor_type.shape.dim[0].dim_value = 2
        fixed = tmp_path / "fixed.onnx"
        onnx.save(m, str(fixed))
        with pytest.raises(BuildError, match="fixed batch of 2"):
            compile_engine(fixed, tmp_path, "fp32", BatchProfile(1, 4, 8), 256, cache)

    def test_unparsable_onnx_reports_parser_errors(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"\x08\x07garbage")
        with pytest.raises(BuildError, match="could not parse bad.onnx"):
            compile_engine(
                bad, tmp_path, "fp32", BatchProfile(1, 4, 8), 256, tmp_path / "timing.cache"
            )


class _FakeCudart:
    """cuda-python's runtime API over host memory: pointers index bytearrays."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's name
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self._next = 4096

    def cudaStreamCreate(self):  # noqa: ANN201, N802
        return (0, 7)

    def cudaMalloc(self, n: int):  # noqa: ANN201, N802
        ptr, self._next = self._next, self._next + n + 4096
        self.mem[ptr] = bytearray(n)
        return (0, ptr)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int):  # noqa: ANN201, N802
        import ctypes

        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.mem[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(self.mem[src][:n]), n)
        return (0,)

    def cudaStreamSynchronize(self, stream: int):  # noqa: ANN201, N802
        return (0,)

    def cudaFree(self, ptr: int):  # noqa: ANN201, N802
        self.mem.pop(ptr, None)
        return (0,)

    def cudaStreamDestroy(self, stream: int):  # noqa: ANN201, N802
        return (0,)


def _fake_tensorrt_module(cuda: _FakeCudart, features: bool = False) -> types.ModuleType:
    """Enough of `tensorrt` for TensorRTEngine: an engine whose logits are x[:, :5] summed
    (and, with `features`, a second output: the first two values of each image)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.26"  # type: ignore[attr-defined]
    trt.DataType = SimpleNamespace(FLOAT="float", HALF="half")  # type: ignore[attr-defined]
    trt.TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")  # type: ignore[attr-defined]

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING = 0, 1, 2

        def __init__(self) -> None:
            pass

    class Context:
        def __init__(self) -> None:
            self.shape = (4, 3, 4, 4)
            self.addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            return (self.shape[0], 5 if name == "logits" else 2)

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addr[name] = ptr

        def execute_async_v3(self, stream: int) -> bool:
            n = self.shape[0]
            x = np.frombuffer(cuda.mem[self.addr["input"]], np.float32, n * 48).reshape(n, 48)
            y = np.stack([x[:, i::5].sum(1) for i in range(5)], 1).astype(np.float32)
            cuda.mem[self.addr["logits"]][: y.nbytes] = y.tobytes()
            if features:
                f = np.ascontiguousarray(x[:, :2])
                cuda.mem[self.addr["features"]][: f.nbytes] = f.tobytes()
            return True

    class Engine:
        num_io_tensors = 3 if features else 2

        def get_tensor_name(self, i: int) -> str:
            return ("input", "logits", "features")[i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "input" else "out"

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
            return ((1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4))

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> Engine:
            return Engine()

    trt.ILogger = ILogger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    return trt


def test_engine_runner_moves_batches_through_cuda_python_without_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cuda = _FakeCudart()
    monkeypatch.setattr(rt, "import_trt", lambda: _fake_tensorrt_module(cuda))
    monkeypatch.setattr(rt, "cudart", lambda: cuda)
    engine_file = tmp_path / "model.fp32.b1-4.sm87.trt10.3.engine"
    engine_file.write_bytes(b"serialized")
    engine = TensorRTEngine(engine_file)
    assert (engine.min_batch, engine.max_batch, engine.input_chw) == (1, 4, (3, 4, 4))
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32)
    got = engine.run(x)
    flat = x.reshape(3, 48)
    want = np.stack([flat[:, i::5].sum(1) for i in range(5)], 1)
    assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(UsageError, match="outside .* profile 1..4"):
        engine.run(np.zeros((5, 3, 4, 4), np.float32))
    del engine
    assert cuda.mem == {}  # buffers freed


def test_engine_runner_returns_the_features_output_beside_the_logits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cuda = _FakeCudart()
    monkeypatch.setattr(rt, "import_trt", lambda: _fake_tensorrt_module(cuda, features=True))
    monkeypatch.setattr(rt, "cudart", lambda: cuda)
    engine_file = tmp_path / "model.fp16.b1-4.sm87.trt10.3.engine"
    engine_file.write_bytes(b"serialized")
    engine = TensorRTEngine(engine_file)
    assert engine.output_names == ["logits", "features"]
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)
    out = engine.run_all(x)
    flat = x.reshape(3, 48)
    np.testing.assert_allclose(out["features"], flat[:, :2], rtol=1e-6)
    np.testing.assert_allclose(engine.run(x), out["logits"])
    assert out["logits"].shape == (3, 5)
    del engine
    assert cuda.mem == {}  # every output's buffer freed


def test_one_tensorrt_logger_per_process_keeps_warnings_up_and_reports_since_a_mark() -> None:
    cuda = _FakeCudart()
    trt = _fake_tensorrt_module(cuda)
    trt.ILogger.INFO, trt.ILogger.VERBOSE = 3, 4  # type: ignore[attr-defined]
    logger = rt.make_logger(trt)
    assert rt.make_logger(trt) is logger  # every Builder and Runtime gets this one
    logger.log(trt.ILogger.ERROR, "an earlier engine's error")
    since = logger.mark()
    logger.log(trt.ILogger.INFO, "building layer 12")  # below the filter: dropped
    logger.log(trt.ILogger.WARNING, "weights out of FP16 range")
    assert rt.log_tail(logger, since) == "  weights out of FP16 range"
    logger.log(trt.ILogger.ERROR, "out of GPU memory")
    # Errors first, and only this engine's: not the earlier one.
    assert rt.log_tail(logger, since) == "  out of GPU memory"
    assert all("layer 12" not in m for _, m in logger.records)
