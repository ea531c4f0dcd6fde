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


def gpu_identity() -> tuple[str, str]:
    # The GPU TensorRT builds for and runs on is the current CUDA device.
    import torch

    dev = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(dev)
    return torch.cuda.get_device_name(dev), f"{major}.{minor}"


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
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {xy} is installed but no CUDA GPU is visible via torch.cuda"
    name, cc = gpu_identity()
    return True, f"TensorRT {xy} on {name} (sm_{cc.replace('.', '')})"


def import_trt() -> Any:
    ok, reason = tensorrt_status()
    if not ok:
        raise UsageError(f"TensorRT engines cannot be built or run here: {reason}")
    import tensorrt as trt

    return trt


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors and warnings so failures can be reported in full."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            # The docs require the explicit base __init__ call for Python loggers.
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(msg)

    return CapturingLogger()


def log_tail(logger: Any, limit: int = 20) -> str:
    lines = logger.errors[-limit:] or logger.warnings[-limit:]
    return "\n".join(f"  {m}" for m in lines) if lines else "  (TensorRT logged no error)"


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if dtype not in table:
        raise BuildError(f"engine I/O type {dtype} is not supported; FP32 or FP16 I/O expected")
    return table[dtype]


class TensorRTEngine:
    """Load an engine file and run float32 NCHW batches through it on the current CUDA GPU.

    Device memory is torch CUDA tensors; work is queued on a private stream because TensorRT
    warns that execute_async_v3 on the default stream costs extra synchronisation.
    """

    def __init__(self, engine_path: Path) -> None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise UsageError(f"TensorRT engine not found: {engine_path}")
        trt = import_trt()
        import torch

        self._trt = trt
        self.path = engine_path
        self.device = torch.device("cuda", torch.cuda.current_device())
        # The logger, runtime and engine must outlive the execution context.
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self._engine is None:
                raise BuildError(
                    f"TensorRT could not load {engine_path.name}; an engine only runs with the "
                    f"TensorRT version and GPU type that built it:\n{log_tail(self._logger)}"
                )
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BuildError(
                    f"no execution context for {engine_path.name} (out of GPU memory?)"
                )
            self._stream = torch.cuda.Stream(self.device)

        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BuildError(
                f"{engine_path.name} has inputs {inputs} and outputs {outputs}; "
                "one image input and one logits output expected"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self._in_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.input_name))
        self._out_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.output_name))
        # Profile 0 is the only one compile_engine creates: (min, opt, max) input shapes.
        lo, opt, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        self.input_chw = tuple(int(d) for d in hi[1:])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32, [N, classes]) for a float32 NCHW batch within the engine's range."""
        import torch

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
        ctx = self._context
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(self.device, dtype=self._in_dtype, non_blocking=False).contiguous()
            if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
                raise BuildError(f"TensorRT rejected input shape {tuple(x.shape)}")
            out_shape = tuple(ctx.get_tensor_shape(self.output_name))
            y = torch.empty(out_shape, dtype=self._out_dtype, device=self.device)
            ctx.set_tensor_address(self.input_name, x.data_ptr())
            ctx.set_tensor_address(self.output_name, y.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BuildError(f"TensorRT inference failed:\n{log_tail(self._logger)}")
            stream.synchronize()
            return y.float().cpu().numpy()

    __call__ = run
