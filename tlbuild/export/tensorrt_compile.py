"""Compile an ONNX variant into a TensorRT engine for this GPU (runtime/tensorrt.py runs it).

Precision is not chosen here: the network is strongly typed (always, on TensorRT 11), so the
ONNX graph decides it. An FP16 graph gives an FP16 engine, a Q/DQ graph an INT8 engine, and no
BuilderFlag precision flag or INT8 calibrator is used (TensorRT 11 removed them). The
`precision` argument only names the engine file and is checked against the graph.

An engine only runs on the GPU architecture and TensorRT version that built it, so both are in
its file name. `tensorrt` is imported inside functions: tlbuild runs without it everywhere else.

NVIDIA pages this module follows (Python API 10.x unless noted):
- Builder, create_network, NetworkDefinitionCreationFlag:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  and for 11.x
  https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html
- What 11.x removed (BuilderFlag.FP16/INT8, int8_calibrator, EXPLICIT_BATCH):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-patterns.html
- OnnxParser, ParserError:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
- IBuilderConfig (set_memory_pool_limit, create/set/get_timing_cache, add_optimization_profile):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
- IOptimizationProfile.set_shape:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
- ITimingCache.serialize, and how a timing cache is reused between builds:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
  https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/performance/builder-performance.html
- ILogger subclassing:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Logger.html
- Runtime, ICudaEngine, IExecutionContext (named I/O tensors, execute_async_v3):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-8x-to-10x-python-api-patterns.html
  and the sample samples/python/common_runtime.py in https://github.com/NVIDIA/TensorRT
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tlbuild.errors import BuildError, UsageError
from tlbuild.fileio import atomic_path
from tlbuild.runtime.tensorrt import (
    MIN_TRT_MAJOR,
    gpu_identity,
    import_trt,
    log_tail,
    make_logger,
    trt_version_xy,
)

_PRECISION_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_CC_RE = re.compile(r"^\d+\.\d+$")


@dataclass
class EngineInfo:
    """One built engine: where it is, what it accepts and what built it."""

    path: Path
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    trt_version: str  # exact (major.minor.patch.build): an engine loads only under it
    gpu_name: str
    compute_capability: str
    build_seconds: float
    workspace_mib: int
    tf32: bool = False  # TF32 math allowed (never for an FP32 engine: its gate is FP32 parity)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (path as a string)."""
        return {**asdict(self), "path": str(self.path)}


def _check_label(precision: str) -> None:
    if not _PRECISION_RE.match(precision):
        raise UsageError(f"engine precision '{precision}' may only use letters, digits, '-', '_'")


def engine_file_name(
    precision: str, min_batch: int, max_batch: int, compute_capability: str, trt_version: str
) -> str:
    """E.g. 'model.int8-trt.b1-32.sm87.trt10.3.engine': precision, batch range, GPU, TensorRT."""
    _check_label(precision)
    if not 1 <= min_batch <= max_batch:
        raise UsageError(f"engine batch range {min_batch}..{max_batch}: need 1 <= min <= max")
    if not _CC_RE.match(compute_capability):
        raise UsageError(f"compute capability '{compute_capability}' is not of the form '8.7'")
    sm = compute_capability.replace(".", "")
    return (
        f"model.{precision}.b{min_batch}-{max_batch}.sm{sm}.trt{trt_version_xy(trt_version)}.engine"
    )


def network_flags(flag_enum: Any, trt_major: int) -> int:
    """The create_network() flags that make the network strongly typed on this TensorRT.

    10.x: the STRONGLY_TYPED bit. 11.x: 0, because every network is strongly typed and the flag
    is deprecated and ignored. EXPLICIT_BATCH is never set: 10.x ignores it, 11.x removed it.
    """
    if trt_major >= 11:
        return 0
    strongly_typed = getattr(flag_enum, "STRONGLY_TYPED", None)
    if trt_major < MIN_TRT_MAJOR or strongly_typed is None:
        raise UsageError(
            f"TensorRT {trt_major}.x has no strongly typed networks; "
            f"install TensorRT {MIN_TRT_MAJOR} or newer"
        )
    return 1 << int(strongly_typed)


def _parser_errors(parser: Any) -> str:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        # node_name / node_operator exist in 10.x parsers; older bindings only have node().
        where = []
        for attr in ("node_operator", "node_name"):
            fn = getattr(err, attr, None)
            value = fn() if callable(fn) else None
            if value:
                where.append(str(value))
        suffix = f" (node {' '.join(where)})" if where else ""
        out.append(f"  {err.code()}: {err.desc()}{suffix}")
    return "\n".join(out)


def _parse_failure(parser: Any, logger: Any, onnx_path: Path, since: int = 0) -> str:
    # An unreadable file can fail before the parser records anything; the log still says why.
    details = _parser_errors(parser) if parser.num_errors else log_tail(logger, since)
    return f"TensorRT could not parse {onnx_path.name} ({parser.num_errors} error(s)):\n{details}"


def _graph_precision(trt: Any, network: Any) -> str:
    """'int8' if the parsed network has Q/DQ layers, 'fp16' if any tensor is FP16, else 'fp32'."""
    half = False
    qdq = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in qdq:
            return "int8"
        # In a strongly typed network every tensor's type is inferred at parse time.
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                half = True
    return "fp16" if half else "fp32"


def _check_precision(label: str, graph: str, onnx_path: Path) -> None:
    # Only labels of a known family are checked; anything else is the caller's own name.
    family = re.split(r"[-_]", label, maxsplit=1)[0].lower()
    if family in ("fp32", "fp16", "int8") and family != graph:
        raise BuildError(
            f"{onnx_path.name} is an {graph.upper()} graph but the engine was asked to be "
            f"'{label}': TensorRT takes precision from the ONNX graph, so pass the "
            f"{family.upper()} ONNX variant for it"
        )


def _input_chw(network: Any, onnx_path: Path) -> tuple[str, tuple[int, int, int]]:
    if network.num_inputs != 1:
        raise BuildError(
            f"{onnx_path.name} has {network.num_inputs} inputs; one NCHW image input expected"
        )
    inp = network.get_input(0)
    shape = tuple(int(d) for d in inp.shape)
    if len(shape) != 4:
        raise BuildError(f"{onnx_path.name} input '{inp.name}' has shape {shape}; NCHW expected")
    if shape[0] != -1:
        raise BuildError(
            f"{onnx_path.name} input '{inp.name}' has a fixed batch of {shape[0]}; "
            "export the ONNX model with a dynamic batch dimension"
        )
    if any(d <= 0 for d in shape[1:]):
        raise BuildError(f"{onnx_path.name} input '{inp.name}' has dynamic C/H/W {shape[1:]}")
    return inp.name, (shape[1], shape[2], shape[3])


def _no_tf32_for_fp32(trt: Any, config: Any, precision: str) -> bool:
    """Clear TF32 for an FP32 engine; whether TF32 stays allowed.

    TensorRT may run FP32 layers in TF32 (10-bit mantissa) on Ampere and newer, Orin included,
    by default; an engine called FP32 and gated on FP32 parity must not.
    """
    flag = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    if flag is None:  # a TensorRT without the flag: nothing to clear
        return False
    if re.split(r"[-_]", precision, maxsplit=1)[0].lower() == "fp32":
        config.clear_flag(flag)
        return False
    return bool(config.get_flag(flag))


def _load_timing_cache(config: Any, path: Path) -> Any:
    blob = path.read_bytes() if path.is_file() else b""
    # A cache from another GPU or TensorRT version (or a damaged file) is not an error: the
    # build just starts from an empty cache and the file is replaced afterwards.
    try:
        cache = config.create_timing_cache(blob)
    except Exception:
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(cache.serialize()))


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine's one optimization profile covers: min..max, tuned for opt."""

    min_batch: int
    opt_batch: int
    max_batch: int


def _check_request(
    onnx_path: Path, precision: str, batches: BatchProfile, workspace_mib: int
) -> None:
    """UsageError for an engine that cannot be asked for, before TensorRT is loaded."""
    min_batch, opt_batch, max_batch = batches.min_batch, batches.opt_batch, batches.max_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(
            f"engine batch sizes min={min_batch} opt={opt_batch} max={max_batch}: "
            "need 1 <= min <= opt <= max"
        )
    if workspace_mib < 1:
        raise UsageError(f"engine workspace_mib={workspace_mib}: need at least 1")
    if not onnx_path.is_file():
        raise UsageError(f"ONNX model not found: {onnx_path}")
    _check_label(precision)


def _parse_onnx(
    trt: Any, logger: Any, builder: Any, onnx_path: Path, trt_major: int
) -> tuple[Any, Any]:
    """The strongly typed network parsed from `onnx_path`, and its parser."""
    network = builder.create_network(network_flags(trt.NetworkDefinitionCreationFlag, trt_major))
    parser = trt.OnnxParser(network, logger)
    since = logger.mark()
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(_parse_failure(parser, logger, onnx_path, since))
    return network, parser


def _timed_build(builder: Any, network: Any, config: Any, timing_cache: Path) -> tuple[Any, float]:
    """The serialized engine (None if the build failed) and the seconds the build took."""
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    # Kernel timings measured before a failure are still valid, so keep them either way.
    _save_timing_cache(config, timing_cache)
    return serialized, seconds


def compile_engine(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    batches: BatchProfile,
    workspace_mib: int,
    timing_cache: Path,
) -> EngineInfo:
    """Build out_dir/engine_file_name(...) from `onnx_path` for the current GPU.

    One optimization profile covers `batches` (min..max, tuned for opt) on the single input,
    whose C, H, W come from the network. `timing_cache` is loaded if present and written back.
    """
    onnx_path, out_dir, timing_cache = Path(onnx_path), Path(out_dir), Path(timing_cache)
    _check_request(onnx_path, precision, batches, workspace_mib)
    min_batch, opt_batch, max_batch = batches.min_batch, batches.opt_batch, batches.max_batch
    trt = import_trt()
    trt_xy = trt_version_xy(trt.__version__)
    gpu_name, cc = gpu_identity()

    logger = make_logger(trt)
    since = logger.mark()  # this engine's messages only: the logger is the process's
    builder = trt.Builder(logger)
    # The parser is kept until the build: the network may refer to weights it holds.
    network, _parser = _parse_onnx(trt, logger, builder, onnx_path, int(trt_xy.split(".")[0]))
    input_name, (c, h, w) = _input_chw(network, onnx_path)
    _check_precision(precision, _graph_precision(trt, network), onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    tf32 = _no_tf32_for_fp32(trt, config, precision)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)
    _load_timing_cache(config, timing_cache)

    serialized, seconds = _timed_build(builder, network, config, timing_cache)
    if serialized is None:
        raise BuildError(
            f"TensorRT failed to build an engine from {onnx_path.name} "
            f"(batch {min_batch}..{max_batch}, workspace {workspace_mib} MiB):\n"
            f"{log_tail(logger, since)}"
        )

    path = out_dir / engine_file_name(precision, min_batch, max_batch, cc, trt_xy)
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return EngineInfo(
        path=path,
        precision=precision,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        trt_version=str(trt.__version__),
        gpu_name=gpu_name,
        compute_capability=cc,
        build_seconds=round(seconds, 3),
        workspace_mib=workspace_mib,
        tf32=tf32,
    )
