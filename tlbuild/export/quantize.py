"""Precision variants of model.onnx: FP16, INT8 QDQ for TensorRT, INT8 QDQ for x86 CPUs.

Precision lives in the ONNX graph: TensorRT 10 strongly typed and TensorRT 11 networks
take their precision from it, so these files are what gets compiled and shipped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from tlbuild.artifacts import Int8Scheme, OnnxArtifact
from tlbuild.errors import BuildError, DiskFullError
from tlbuild.export.calibration import Calibration, cache_supported
from tlbuild.export.feature_graph import feature_only_nodes
from tlbuild.fileio import atomic_path

# Free space under which a library's failure to write a model is taken for a full disk.
_LOW_DISK = 64 * 2**20


def cpu_has_vnni() -> bool:
    """True when this x86 CPU has an 8-bit dot-product instruction (AVX512-VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # onnxruntime.quantization logs advice through the root logger and warns freely.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def make_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and compute inside, FP32 input and output (keep_io_types)."""
    from onnxconverter_common import float16

    try:
        with _quiet():
            model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    except Exception as e:  # a library failure: say which file and what to try
        raise BuildError(
            f"could not convert {src.name} to FP16 ({type(e).__name__}: {e}); leave fp16 out "
            "of quantize.variants, or report the backbone"
        ) from e
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))


def float_node_names(model_path: Path, keep_float: list[str]) -> list[str]:
    """The nodes INT8 leaves in float: `keep_float` entries ('first_conv', 'classifier' or node
    names) resolved to node names, and the nodes only the features output needs."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    names = {n.name for n in graph.node}
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    heads = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    out: list[str] = []
    for entry in keep_float:
        if entry == "first_conv":
            out += convs[:1]
        elif entry == "classifier":
            out += heads[-1:]
        elif entry in names:
            out.append(entry)
        else:
            raise BuildError(
                f"quantize.keep_float: no node named '{entry}' in {model_path.name}; use "
                "'first_conv', 'classifier' or a node name from the ONNX graph"
            )
    return out + feature_only_nodes(graph, graph.output[0].name)


@dataclass(frozen=True)
class Int8Settings:
    """The [quantize] settings one INT8 variant is made with (reduce_range resolved for this
    machine)."""

    method: str  # calibration: minmax, entropy or percentile
    keep_float: tuple[str, ...] = ()
    reduce_range: bool = False
    percentile: float = 99.999
    trt_float: str = "fp16"


@dataclass(frozen=True)
class Int8Job:
    """One INT8 variant to make: from which model into which file, with which calibration (the
    model's, collected once), for which artifact (its Int8Scheme), with which settings."""

    src: Path
    dst: Path
    calibration: Calibration
    artifact: OnnxArtifact
    settings: Int8Settings


def _extra_options(scheme: Int8Scheme, cfg: Int8Settings) -> dict[str, object]:
    """quantize_static's extra_options for this scheme and these settings."""
    extra: dict[str, object] = {}
    if cfg.method == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    if scheme.symmetric:
        extra.update(ActivationSymmetric=True, WeightSymmetric=True)
    if not scheme.int32_bias:
        extra.update(QuantizeBias=False, QDQDisableWeightAdjustForInt32Bias=True)
    return extra


def _apply_trt_float_fp16(tmp: Path, dst: Path) -> None:
    """quantize.trt_float = "fp16" on `tmp`; a failure names `dst` and the setting to change."""
    try:
        _float_parts_to_fp16(tmp)
    except Exception as e:
        raise BuildError(
            f"could not make the float parts of {dst.name} FP16 "
            f'({type(e).__name__}: {e}); set quantize.trt_float = "fp32"'
        ) from e


def make_int8(job: Int8Job) -> None:
    """Static QDQ quantization of `job.src` into `job.dst` in the artifact's Int8Scheme, from
    the ranges `job.calibration` collected (once per method, whatever the variant or trial)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    dst, calibration, cfg = job.dst, job.calibration, job.settings
    scheme = job.artifact.int8
    assert scheme is not None, f"{job.artifact.variant} is not an INT8 variant"
    method = cfg.method
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    kwargs = {
        "activation_type": QuantType.QInt8 if scheme.activations == "int8" else QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "reduce_range": cfg.reduce_range and scheme.reduce_range,
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "extra_options": _extra_options(scheme, cfg),
    }
    with atomic_path(dst) as tmp, _quiet():
        try:
            kwargs["nodes_to_exclude"] = float_node_names(job.src, list(cfg.keep_float))
            kwargs["calibrate_method"] = methods[method]
            quantize_static(str(job.src), str(tmp), **_ranges_or_images(job), **kwargs)
            if scheme.float_parts_follow_trt_float and cfg.trt_float == "fp16":
                _apply_trt_float_fp16(tmp, dst)
        except BuildError:
            raise
        except MemoryError:
            raise BuildError(
                f"out of memory calibrating {dst.name} with {len(calibration.images)} images "
                f"({method}); lower quantize.calibration_images"
            ) from None
        except Exception as e:  # a library failure: say which variant and what to try
            # ONNX Runtime's writers can leave a truncated model on a full disk and fail only
            # when it is read back ("wire format was corrupt"): name the disk, not the method.
            if shutil.disk_usage(dst.parent).free < _LOW_DISK:
                raise DiskFullError(dst.parent) from e
            raise BuildError(
                f"onnxruntime could not quantize {dst.name} ({method} calibration, "
                f"{len(calibration.images)} images): {type(e).__name__}: {e}. Try another "
                "quantize.calibration_method, or report the backbone"
            ) from e


def _ranges_or_images(job: Int8Job) -> dict[str, Any]:
    """quantize_static's calibration arguments: the shared ranges where this onnxruntime reads
    a calibration cache, else the images to calibrate on in this call (older releases)."""
    cal, cfg = job.calibration, job.settings
    if cache_supported():
        return {
            "calibration_data_reader": None,
            "calibration_cache_path": str(cal.ranges(cfg.method, cfg.percentile)),
        }
    name = onnx.load(str(job.src), load_external_data=False).graph.input[0].name
    return {"calibration_data_reader": _Batches(name, cal.images)}


def _calibration_batch(n: int, most: int = 16) -> int:
    """The largest batch size up to `most` that splits `n` images into equal batches: older
    histogram calibrators stack every batch into one array, which fails on a short last one."""
    return max(d for d in range(1, min(most, n) + 1) if n % d == 0)


class _Batches:
    """A CalibrationDataReader over every calibration image, in equal batches (older
    onnxruntime releases, which calibrate inside each quantize_static call)."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        b = _calibration_batch(len(images))
        self._it = iter([{input_name: images[i : i + b]} for i in range(0, len(images), b)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # part of the reader protocol; one pass is all it needs
        pass


def weight_channel_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a weight: 1 for ConvTranspose ([C_in, C_out/g, kH, kW]) and
    for Gemm without transB ([K, N]); 0 for Conv and Gemm with transB = 1."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 0


def _float_parts_to_fp16(path: Path) -> None:
    """Float tensors and Q/DQ scales of a QDQ graph to FP16 (input and output stay FP32).

    FP16 scales on QuantizeLinear/DequantizeLinear need opset 19, so the graph's default
    opset is raised to 19 where it is lower; none of its other ops changed meaning there.
    """
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, 19)
    onnx.save(model, str(path))


def trt_qdq_problems(path: Path) -> list[str]:
    """Every way `path` departs from the QDQ form TensorRT accepts (empty list: conforms).

    Checked: int8 activations and weights, all zero points exactly 0 (symmetric), Conv, Gemm
    and ConvTranspose weights quantized per output channel on that op's channel axis (one scale
    per channel), no int32 bias.
    """
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems: list[str] = []
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return ["no QuantizeLinear/DequantizeLinear nodes: the model is not quantized"]
    for n in qdq:
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        zp = inits.get(zp_name) if zp_name else None
        if zp is None:
            problems.append(f"{n.name}: no constant zero point (defaults to uint8)")
            continue
        if zp.dtype != np.int8:
            problems.append(f"{n.name}: zero point is {zp.dtype}, not int8")
        if np.any(zp != 0):
            problems.append(f"{n.name}: non-zero zero point (asymmetric)")
        weight = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if weight is None:
            continue
        if weight.dtype == np.int32:
            problems.append(f"{n.name}: int32 bias; TensorRT wants float bias")
            continue
        for user in consumers.get(n.output[0], []):
            if (
                user.op_type not in ("Conv", "Gemm", "ConvTranspose")
                or user.input[1] != n.output[0]
            ):
                continue
            want = weight_channel_axis(user)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            scale = inits.get(n.input[1])
            channels = weight.shape[want]
            if scale is None or scale.ndim != 1 or scale.size != channels or axis != want:
                problems.append(
                    f"{n.name}: weights of {user.name} not per-channel on axis {want} "
                    f"(axis {axis}, {0 if scale is None else scale.size} scale(s), "
                    f"{channels} channels)"
                )
    return problems
