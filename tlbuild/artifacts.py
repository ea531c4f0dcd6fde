"""What each file of an export folder is: one table for quantize, engines, bench and classify."""

from __future__ import annotations

from dataclasses import dataclass

MODEL_PT = "model.pt"
MODEL_ONNX = "model.onnx"
LABELS_JSON = "labels.json"
TIMING_CACHE = "tensorrt.timing.cache"
DEVICE_BATCH = "device_batch.npz"  # validation images, labels and FP32 logits for a device
NOVELTY_NPZ = "novelty.npz"  # the novelty score (tlbuild/novelty/score.py)
SPLITS_JSON = "splits.json"
METRICS_JSON = "metrics.json"
HISTORY_CSV = "history.csv"
CURVES_PNG = "training_curves.png"
LR_FIND_PNG = "lr_find.png"
DUPLICATES_CSV = "duplicates.csv"  # duplicate image pairs found before training
CHECKPOINTS = "checkpoints"  # training's resume checkpoints and decode-cache spill file
# A stage's files before they are judged (quantize's candidate variants), under their own names
# so messages name them plainly; never shipped, and removed by the next build if left.
SCRATCH = ".scratch"
# What training writes; shipped and hashed in the manifest with the model.
TRAINING_FILES = (
    MODEL_PT,
    METRICS_JSON,
    HISTORY_CSV,
    SPLITS_JSON,
    CURVES_PNG,
    "confusion_val.png",
    "confusion_test.png",
    LR_FIND_PNG,
    DUPLICATES_CSV,
)


@dataclass(frozen=True)
class Int8Scheme:
    """How an INT8 variant is quantized for the runtime it targets, as data: quantize, the
    accuracy search and the form checks read this instead of branching on a variant's name."""

    activations: str  # "int8" (S8S8) or "uint8" (U8S8): the activation type
    symmetric: bool  # activation and weight zero points all 0
    int32_bias: bool  # bias quantized to int32 (TensorRT's explicit quantization takes none)
    reduce_range: bool  # follows quantize.reduce_range (7-bit weights for AVX2 without VNNI)
    float_parts_follow_trt_float: bool  # its float parts take quantize.trt_float's precision
    tensorrt_form: bool  # checked against the QDQ form TensorRT accepts before it ships


# TensorRT: symmetric S8S8, per-channel weights, no int32 bias, float parts FP16 by default:
# the settings NVIDIA ModelOpt passes to ONNX Runtime's quantizer.
TENSORRT_INT8 = Int8Scheme("int8", True, False, False, True, True)
# x86/ARM CPUs: U8 activations, S8 weights, int32 bias, reduce_range where VNNI is missing
# (ONNX Runtime's guidance, against saturation in the 16-bit sums of AVX2 kernels).
CPU_INT8 = Int8Scheme("uint8", False, True, True, False, False)


@dataclass(frozen=True)
class OnnxArtifact:
    """One ONNX precision variant: its file, precision and where ONNX Runtime runs it."""

    variant: str  # the recipe's name: fp32, fp16, int8_trt, int8_cpu
    file: str
    precision: str  # fp32, fp16 or int8
    provider: str  # load_predictor's name of the provider it is meant for
    engine_label: str | None  # the precision in its TensorRT engine's name; None: no engine
    simulate_qdq: bool  # gated with Q/DQ run as written (its target is TensorRT, not this CPU)
    not_here: str  # why bench skips it where its provider is missing
    int8: Int8Scheme | None = None  # how an INT8 variant is quantized; None for float ones

    @property
    def cpu_kernels(self) -> bool:
        """Checked on the CPU on any machine: INT8 for the CPU's own integer kernels (int8_cpu),
        whose arithmetic, 16-bit intermediate saturation included, is what it ships with."""
        return self.int8 is not None and not self.simulate_qdq

    @property
    def rejected_file(self) -> str:
        """The name a variant gets when the accuracy gate rejects it: never mistaken for one
        that ships."""
        return rejected_name(self.file)


ONNX_ARTIFACTS: dict[str, OnnxArtifact] = {
    a.variant: a
    for a in (
        OnnxArtifact("fp32", MODEL_ONNX, "fp32", "cpu", "fp32", False, ""),
        OnnxArtifact(
            "fp16",
            "model.fp16.onnx",
            "fp16",
            "cuda",
            "fp16",
            False,
            "needs a GPU execution provider (ONNX Runtime's CPU emulates FP16)",
        ),
        OnnxArtifact(
            "int8_trt",
            "model.int8.trt.onnx",
            "int8",
            "tensorrt",
            "int8-trt",
            True,
            "runs on TensorRT; its engine is benchmarked where TensorRT exists",
            TENSORRT_INT8,
        ),
        OnnxArtifact("int8_cpu", "model.int8.cpu.onnx", "int8", "cpu", None, False, "", CPU_INT8),
    )
}
# The variants quantize makes (everything but the FP32 original).
VARIANTS = {k: a for k, a in ONNX_ARTIFACTS.items() if k != "fp32"}
# Preference for CPU inference: INT8 for x86 first (1.5x FP32 here), then FP32.
CPU_ORDER = (ONNX_ARTIFACTS["int8_cpu"].file, MODEL_ONNX)


def rejected_name(file: str) -> str:
    """'model.int8.cpu.onnx' -> 'model.int8.cpu.rejected.onnx'."""
    return file.removesuffix(".onnx") + ".rejected.onnx"


# model.onnx behind a uint8 image input with the preprocessing in the graph (clients stage);
# each shipped variant has such a twin: model.int8.cpu.onnx -> model_image.int8.cpu.onnx.
MODEL_IMAGE_ONNX = "model_image.onnx"
CONFORMANCE = "conformance"  # the conformance kit's folder (clients stage)


def image_twin(file: str) -> str:
    """'model.int8.cpu.onnx' -> 'model_image.int8.cpu.onnx': its uint8-image-input twin."""
    return "model_image" + file.removeprefix("model")


def is_image_model(name: str) -> bool:
    """Whether `name` is an image-input twin (it takes decoded images, not tensors)."""
    return name.startswith("model_image.") and name.endswith(".onnx")


def twin_source(name: str) -> str:
    """'model_image.fp16.onnx' -> 'model.fp16.onnx': the artifact a twin wraps."""
    return "model" + name.removeprefix("model_image")


def onnx_artifact(name: str) -> OnnxArtifact | None:
    """The ONNX artifact `name` is, or (for an image model) the one it wraps."""
    source = twin_source(name) if is_image_model(name) else name
    return next((a for a in ONNX_ARTIFACTS.values() if a.file == source), None)


def precision_of(name: str) -> str:
    """The precision of an artifact file (an engine's is in its name: model.<label>.b...)."""
    if is_image_model(name):
        return precision_of(twin_source(name))
    for a in ONNX_ARTIFACTS.values():
        if name == a.file:
            return a.precision
    if name.endswith(".engine"):
        return name.split(".")[1]
    return "fp32"
