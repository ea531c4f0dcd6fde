"""The one way tlbuild opens an ONNX Runtime session. Code outside tlbuild/runtime/ runs ONNX
models through OnnxPredictor (load_predictor, open_onnx), never through a session."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnxruntime as ort

from tlbuild.errors import UsageError
from tlbuild.runtime.providers import ORT_PROVIDERS, session_providers, start_session


@dataclass(frozen=True)
class OrtOptions:
    """How a session runs (ort_session); an OnnxPredictor holds one."""

    provider: str = "cpu"
    device_id: int = 0  # the GPU, for cuda and tensorrt
    threads: int | None = None
    spinning: bool = True
    simulate_qdq: bool = False
    profile_prefix: str | None = None
    tensorrt: dict[str, str] | None = None
    # ONNX Runtime's CPU arena keeps each session's largest buffers for the process's life.
    # Checks that hold several sessions at once turn it off (open_onnx): the quantize stage
    # at 224 px peaked at 1.58 GB instead of 2.10, with Q/DQ simulation no slower.
    memory_arena: bool = True


def ort_session(
    path: Path, options: OrtOptions | None = None, **given: Any
) -> ort.InferenceSession:
    """A session on `options.provider` (cpu, cuda, tensorrt), refused unless that provider is
    active; keyword arguments override single fields of `options`.

    With `simulate_qdq`, graph optimizations are off, so ONNX Runtime executes every
    QuantizeLinear and DequantizeLinear node by the ONNX definition (scale, round half to even,
    saturate) and the float op between them: the arithmetic TensorRT's explicit quantization
    promises, not the CPU's fused U8S8 kernels with their 16-bit intermediate saturation
    (tests/test_quantize.py checks this against a NumPy implementation of Q/DQ).
    `tensorrt`: the TensorRT provider's options (tensorrt_options), when the caller has them.
    """
    o = replace(options or OrtOptions(), **given)
    provider, tensorrt = o.provider, o.tensorrt
    if provider not in ORT_PROVIDERS:
        raise UsageError(f"unknown provider '{provider}'; use one of {', '.join(ORT_PROVIDERS)}")
    wanted = ORT_PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise UsageError(
            f"{wanted} is not available in this onnxruntime build "
            f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu for "
            "CUDA/TensorRT, or use provider 'cpu'"
        )
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = o.memory_arena
    if o.threads:
        so.intra_op_num_threads = o.threads
    if not o.spinning:
        # Idle ORT threads otherwise busy-wait, taking cores from work that overlaps
        # inference (decoding in `tlbuild classify`).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if o.simulate_qdq:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if o.profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = o.profile_prefix
    if provider == "tensorrt" and tensorrt is None:
        tensorrt = tensorrt_options(Path(path))
    providers = session_providers(provider, o.device_id, tensorrt)
    # ORT falls back to the CPU when a GPU provider fails to start; say so instead.
    session, problem = start_session(str(path), so, providers)
    if problem:
        raise UsageError(f"{Path(path).name}: {problem}")
    return session


def tensorrt_options(
    path: Path,
    model_input: tuple[str, list[Any]] | None = None,
    sha256: str | None = None,
    batches: tuple[int, int, int] = (1, 8, 64),
) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options: engine and timing caches beside the model (a
    Jetson otherwise rebuilds the engine, minutes, at every start), one optimization profile for
    the batch range (min, opt, max), FP16 kernels for FP16 and INT8 graphs.

    The cache folder is named for the model's sha256 and the ORT and TensorRT versions, which
    ORT's documentation says invalidate a cached engine. No onnx import: a device has none.
    `model_input` (name, shape) and `sha256` come from the manifest where the caller has it;
    otherwise the model is opened on the CPU and hashed here, a second load at every start.
    """
    from tlbuild.artifacts import precision_of
    from tlbuild.fileio import sha256_file
    from tlbuild.runtime.tensorrt import installed_trt_version

    if model_input is None:
        probe = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0]
        model_input = (probe.name, list(probe.shape))
    name, shape = model_input
    chw = "x".join(str(d) for d in shape[1:])
    lo, opt, hi = (f"{name}:{b}x{chw}" for b in batches)
    key = f"{(sha256 or sha256_file(path))[:16]}-ort{ort.__version__}-trt{installed_trt_version()}"
    cache = path.parent / "ort_tensorrt_cache" / key
    try:
        cache.mkdir(parents=True, exist_ok=True)
        cached = "True"
    except OSError:  # a read-only export folder: it still runs, building at each start
        cached = "False"
    precision = precision_of(path.name)
    return {
        "trt_engine_cache_enable": cached,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": cached,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": lo,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": hi,
        # A Q/DQ graph carries its own scales (explicit quantization); no calibration table.
        "trt_int8_enable": "True" if precision == "int8" else "False",
        "trt_fp16_enable": "True" if precision in ("fp16", "int8") else "False",
    }
