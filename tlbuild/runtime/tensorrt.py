"""Run a serialized TensorRT engine on the current CUDA GPU, and say whether TensorRT is here.

`tensorrt` is imported inside functions: tlbuild runs without it everywhere else. Engines are
compiled by tlbuild/export/tensorrt_compile.py; the NVIDIA pages both follow are listed there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.errors import BuildError, UsageError

# TensorRT 10 is the first with strongly typed networks and the named I/O tensor API.
MIN_TRT_MAJOR = 10

_VERSION_RE = re.compile(r"^\d+(\.\d+)*")


def trt_version_xy(version: str) -> str:
    """'10.3.0.26' -> '10.3': builds are tied to the minor version, not the patch."""
    m = _VERSION_RE.match(version.strip())
    if not m:
        raise UsageError(f"TensorRT version '{version}' is not of the form X.Y[.Z]")
    parts = m.group(0).split(".")
    return ".".join((parts + ["0"])[:2])


def installed_trt_version() -> str | None:
    """tensorrt.__version__ here, or None where TensorRT is not importable."""
    try:
        import tensorrt
    except Exception:  # not installed, or its CUDA libraries are missing
        return None
    return str(tensorrt.__version__)


def check_engine_version(name: str, built_with: str | None) -> None:
    """Refuse, before deserializing, an engine another TensorRT version built.

    An engine loads only under the exact version that serialized it. Folders from before the
    exact version was recorded carry major.minor only; those are compared on what they have.
    """
    here = installed_trt_version()
    if not built_with or here is None:
        return
    parts = built_with.split(".")
    if here.split(".")[: len(parts)] != parts:
        raise UsageError(
            f"{name} was built with TensorRT {built_with} and this machine has {here}; an "
            "engine loads only under the exact version that built it. Run "
            "`tlbuild build --on-device DIR` here to build engines for it"
        )


def cudart() -> Any:
    """cuda-python's CUDA runtime bindings (no PyTorch needed on a device)."""
    try:
        from cuda.bindings import runtime  # cuda-python 12.6 and newer
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise UsageError(
                "TensorRT engines need cuda-python for GPU memory: pip install cuda-python"
            ) from None
    return runtime


def cuda_call(result: Any) -> Any:
    """Unwrap a cuda-python call's (error, value...) tuple, raising on an error code."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BuildError(f"CUDA runtime call failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest) or None


def cuda_device_count() -> int:
    """Visible CUDA GPUs (0 where the driver or cuda-python is missing)."""
    return _cuda_devices()[0]


def _cuda_devices() -> tuple[int, str]:
    try:
        return int(cuda_call(cudart().cudaGetDeviceCount())), ""
    except Exception as e:  # e.g. cudaErrorInsufficientDriver: cuda-python newer than the driver
        return 0, str(e)


def _cuda_version(value: int) -> str:
    """12060 -> '12.6' (CUDA's encoding: 1000 * major + 10 * minor)."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def cuda_mismatch() -> str | None:
    """A sentence when the driver supports an older CUDA than cuda-python's runtime needs (its
    usual cause of 'no GPU': cuda-python 13 on a CUDA 12 driver such as JetPack 6's), else None."""
    try:
        rt = cudart()
        driver = int(cuda_call(rt.cudaDriverGetVersion()))
        runtime = int(cuda_call(rt.cudaRuntimeGetVersion()))
    except Exception:  # no driver at all, or bindings too old to ask
        return None
    if driver == 0:
        return "no NVIDIA driver is loaded"
    # Within one major, CUDA's minor-version compatibility lets a newer runtime run.
    if runtime // 1000 > driver // 1000:
        major = driver // 1000
        return (
            f"the driver supports CUDA {_cuda_version(driver)} but cuda-python's runtime is CUDA "
            f"{_cuda_version(runtime)}: install the cuda-python of the driver's CUDA major "
            f"('cuda-python>={major},<{major + 1}'), or a newer driver"
        )
    return None


def gpu_identity() -> tuple[str, str]:
    """(name, 'major.minor') of the current CUDA device, the one TensorRT builds for."""
    rt = cudart()
    props = cuda_call(rt.cudaGetDeviceProperties(cuda_call(rt.cudaGetDevice())))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return str(name).rstrip("\x00").strip(), f"{props.major}.{props.minor}"


def tensorrt_status() -> tuple[bool, str]:
    """(True, 'TensorRT X.Y on <GPU> (sm_XY)') where engines can be built, else (False, why)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer itself fails to load
        return False, (
            f"python package 'tensorrt' is not importable ({type(e).__name__}: {e}); "
            "install it from NVIDIA's index on the target machine"
        )
    version = getattr(trt, "__version__", "0")
    try:
        xy = trt_version_xy(version)
    except UsageError:
        return False, f"cannot read the TensorRT version from tensorrt.__version__ = {version!r}"
    if int(xy.split(".")[0]) < MIN_TRT_MAJOR:
        return False, f"TensorRT {xy} is installed; tlbuild needs TensorRT {MIN_TRT_MAJOR} or newer"
    if cuda_device_count() == 0:
        mismatch = cuda_mismatch()
        if mismatch:
            return False, f"TensorRT {xy} is installed but no CUDA GPU is usable: {mismatch}"
        why = _cuda_devices()[1] or "no device"
        return False, (
            f"TensorRT {xy} is installed but no CUDA GPU is visible through cuda-python ({why}); "
            "install the cuda-python of the device's CUDA major, e.g. 'cuda-python>=12,<13' "
            "for CUDA 12"
        )
    name, cc = gpu_identity()
    return True, f"TensorRT {xy} on {name} (sm_{cc.replace('.', '')})"


def import_trt() -> Any:
    ok, reason = tensorrt_status()
    if not ok:
        raise UsageError(f"TensorRT engines cannot be built or run here: {reason}")
    import tensorrt as trt

    return trt


# TensorRT treats the logger as a per-process singleton: every Builder and Runtime must be
# given the same one (NVIDIA's ILogger reference). One per `tensorrt` module, made on first use.
_LOGGERS: dict[int, Any] = {}


def make_logger(trt: Any) -> Any:
    """The process's TensorRT logger: keeps errors and warnings (INFO and VERBOSE are dropped),
    each numbered, so an operation reports only what was logged since it began (mark())."""
    key = id(trt)
    if key not in _LOGGERS:
        _LOGGERS[key] = _capturing_logger(trt)
    return _LOGGERS[key]


def _capturing_logger(trt: Any) -> Any:
    import threading

    warning = int(trt.ILogger.WARNING)
    errors = {int(trt.ILogger.INTERNAL_ERROR), int(trt.ILogger.ERROR)}

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            # The docs require the explicit base __init__ call for Python loggers.
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()  # TensorRT requires a thread-safe logger
            self.records: list[tuple[bool, str]] = []  # (is an error, message)

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level > warning:  # INFO, VERBOSE: not kept
                return
            with self._lock:
                self.records.append((level in errors, msg))

        def mark(self) -> int:
            """Where the next message will go: pass it to log_tail to see only what follows."""
            with self._lock:
                return len(self.records)

    return CapturingLogger()


def log_tail(logger: Any, since: int = 0, limit: int = 20) -> str:
    """The errors logged since `since` (else the warnings), one indented line each."""
    recent = logger.records[since:]
    lines = [m for err, m in recent if err][-limit:] or [m for _, m in recent][-limit:]
    return "\n".join(f"  {m}" for m in lines) if lines else "  (TensorRT logged no error)"


def _np_dtype(trt: Any, dtype: Any) -> Any:
    table = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}
    if dtype not in table:
        raise BuildError(f"engine I/O type {dtype} is not supported; FP32 or FP16 I/O expected")
    return table[dtype]


class TensorRTEngine:
    """Load an engine file and run float32 NCHW batches through it on the current CUDA GPU.

    GPU memory through cuda-python (no PyTorch): input and output buffers sized for the
    profile's largest batch, allocated once; work is queued on a private stream because
    TensorRT warns that execute_async_v3 on the default stream costs extra synchronisation.
    """

    def __init__(self, engine_path: Path) -> None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise UsageError(f"TensorRT engine not found: {engine_path}")
        trt = import_trt()
        self._rt = cudart()
        self.path = engine_path
        # The logger, runtime and engine must outlive the execution context.
        self._logger = make_logger(trt)
        since = self._logger.mark()
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BuildError(
                f"TensorRT could not load {engine_path.name}; an engine only runs with the "
                f"TensorRT version and GPU type that built it:\n{log_tail(self._logger, since)}"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BuildError(f"no execution context for {engine_path.name} (out of GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # The logits, and the novelty features where the model has them (export/features.py).
        if len(inputs) != 1 or not 1 <= len(outputs) <= 2:
            raise BuildError(
                f"{engine_path.name} has inputs {inputs} and outputs {outputs}; "
                "one image input and a logits output (and features) expected"
            )
        self.input_name = inputs[0]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        self.output_names = [self.output_name] + [n for n in outputs if n != self.output_name]
        self._in_dtype = _np_dtype(trt, self._engine.get_tensor_dtype(self.input_name))
        self._out_dtypes = {
            n: _np_dtype(trt, self._engine.get_tensor_dtype(n)) for n in self.output_names
        }
        # Profile 0 is the only one compile_engine creates: (min, opt, max) input shapes.
        lo, opt, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        self.input_chw = tuple(int(d) for d in hi[1:])
        self._context.set_input_shape(self.input_name, (self.max_batch, *self.input_chw))
        self._stream = cuda_call(self._rt.cudaStreamCreate())
        in_bytes = (
            int(np.prod((self.max_batch, *self.input_chw))) * np.dtype(self._in_dtype).itemsize
        )
        self._d_in = cuda_call(self._rt.cudaMalloc(in_bytes))
        self._d_outs: dict[str, int] = {}
        for n in self.output_names:
            largest = tuple(int(d) for d in self._context.get_tensor_shape(n))
            size = int(np.prod(largest)) * np.dtype(self._out_dtypes[n]).itemsize
            self._d_outs[n] = cuda_call(self._rt.cudaMalloc(size))

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output (float32) for a float32 NCHW batch within the engine's range."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_chw:
            raise UsageError(
                f"{self.path.name} takes [N, {', '.join(map(str, self.input_chw))}] batches, "
                f"got shape {list(batch.shape)}"
            )
        n = batch.shape[0]
        if not self.min_batch <= n <= self.max_batch:
            raise UsageError(
                f"batch of {n} is outside {self.path.name}'s profile "
                f"{self.min_batch}..{self.max_batch}; split the batch or rebuild the engine"
            )
        rt, ctx = self._rt, self._context
        x = np.ascontiguousarray(batch, dtype=self._in_dtype)
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
            raise BuildError(f"TensorRT rejected input shape {tuple(x.shape)}")
        ys = {
            name: np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._out_dtypes[name])
            for name in self.output_names
        }
        h2d, d2h = (
            rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        cuda_call(rt.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
        ctx.set_tensor_address(self.input_name, int(self._d_in))
        for name, ptr in self._d_outs.items():
            ctx.set_tensor_address(name, int(ptr))
        since = self._logger.mark()
        if not ctx.execute_async_v3(int(self._stream)):
            raise BuildError(
                f"TensorRT inference failed on {self.path.name}:\n{log_tail(self._logger, since)}"
            )
        for name, y in ys.items():
            cuda_call(
                rt.cudaMemcpyAsync(y.ctypes.data, self._d_outs[name], y.nbytes, d2h, self._stream)
            )
        cuda_call(rt.cudaStreamSynchronize(self._stream))
        return {name: y.astype(np.float32) for name, y in ys.items()}

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32, [N, classes]) for a float32 NCHW batch within the engine's range."""
        return self.run_all(batch)[self.output_name]

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        buffers = [getattr(self, "_d_in", None), *getattr(self, "_d_outs", {}).values()]
        for ptr in buffers:
            if ptr is not None:
                rt.cudaFree(ptr)
        if getattr(self, "_stream", None) is not None:
            rt.cudaStreamDestroy(self._stream)

    __call__ = run
