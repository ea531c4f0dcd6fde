"""The recipe: a TOML file validated by pydantic, with paths resolved against its own folder."""

from __future__ import annotations

import json
import os
import re
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tlbuild.data.extensions import IMAGE_EXTENSIONS
from tlbuild.errors import RecipeError
from tlbuild.fileio import read_record_text


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `learning_rate` for `lr` must not be ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve a relative path against the recipe's folder (passed as validation context)."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p.resolve() if base is not None else p


class SplitConfig(_Section):
    """Fractions for a seeded, stratified split of a single `root` folder."""

    val: float = Field(0.2, gt=0.0, lt=1.0)
    test: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.val + self.test >= 0.9:
            raise ValueError(
                f"val + test = {self.val + self.test:.2f} leaves under 10% for training; "
                "use smaller fractions"
            )
        return self


class DataConfig(_Section):
    """Where the images are and how to split them."""

    root: Path | None = Field(None, description="one folder per class; split by `split` fractions")
    train: Path | None = Field(None, description="explicit training folder (one folder per class)")
    val: Path | None = Field(None, description="explicit validation folder")
    test: Path | None = Field(None, description="explicit test folder (optional)")
    split: SplitConfig = SplitConfig()
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    min_per_class: int = Field(2, ge=1, description="fewest usable training images per class")
    # What holding out cost FP32 on the accuracy suite's sets: docs/recipe.md.
    holdout: int | Literal["auto"] = Field(
        "auto",
        description="training images kept out of training for the INT8 search to decide on; "
        "auto: a tenth of the training split (32 to 256), none when that is under 32",
    )
    balance: Literal["none", "loss", "sampler"] = "none"
    ok_class: str | None = Field(None, description="the 'good part' class, for escape rates")
    workers: int | Literal["auto"] = "auto"
    cache: bool = Field(
        True,
        description="decode each image once per run and augment from memory (see data/cache.py)",
    )
    cache_ram_mib: int = Field(
        2048, ge=0, description="decoded images kept in memory; the rest go to a mapped file"
    )
    fingerprint: Literal["stat", "content"] = Field(
        "stat",
        description="how incremental builds see data changes: file sizes and modification "
        "times, or content hashes (slower; survives copies that reset times)",
    )
    duplicates: Literal["warn", "error", "off"] = Field(
        "warn",
        description="the same image twice (exact copy or near duplicate) across splits, "
        "classes or within one: list it, fail the build before training, or skip the check",
    )
    # benchmarks/duplicates_threshold.py, 4,000 distinct demo images (8M pairs): at 4 bits 5
    # false pairs, 82-98% of re-encoded, resized or brightened copies found; at 2: 1 pair,
    # 64-93%; at 6: 14 pairs, 87-100%; at 10: 234. Distances are even (32 set bits each).
    near_duplicate_distance: int = Field(
        4,
        ge=0,
        le=10,
        description="pHash bits (of 64) two images may differ by and count as near "
        "duplicates; 0: the same hash only",
    )

    _resolve_paths = field_validator("root", "train", "val", "test")(_resolve)

    @field_validator("holdout")
    @classmethod
    def _holdout_not_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError('holdout is a number of images (0: none) or "auto"')
        return v

    @field_validator("extensions")
    @classmethod
    def _dotted_lowercase(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in v)

    @model_validator(mode="after")
    def _one_layout(self) -> DataConfig:
        explicit = self.train is not None or self.val is not None
        if self.root is not None and explicit:
            raise ValueError("give either `root` (split by fractions) or `train` + `val`, not both")
        if self.root is None and not explicit:
            raise ValueError("give `root` (one folder per class) or `train` and `val` folders")
        if explicit and (self.train is None or self.val is None):
            raise ValueError("`train` and `val` go together; give both (or `root` instead)")
        if self.test is not None and self.root is not None:
            raise ValueError(
                "`test` is a folder for the explicit layout; with `root` use split.test"
            )
        for key in ("root", "train", "val", "test"):
            p = getattr(self, key)
            if p is not None and not p.is_dir():
                raise ValueError(f"`{key}` folder does not exist: {p}")
        return self


class PreprocessConfig(_Section):
    """Overrides of the backbone's own preprocessing; unset keys come from its timm config."""

    input_size: int | tuple[int, int] | Literal["auto"] | None = Field(
        "auto",
        description='pixels (int or [h, w]); "auto": 3x the median image short side, 64 px to '
        "the backbone's own size (which is what images of 75 px and more get)",
    )
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: Literal["center_crop", "resize"] | None = Field(
        None,
        description="center_crop: scale the short side then crop the centre (ImageNet style); "
        "resize: scale the whole image to the input size (nothing cut off)",
    )
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("input_size")
    @classmethod
    def _positive(cls, v: int | tuple[int, int] | str | None) -> int | tuple[int, int] | str | None:
        if isinstance(v, str):
            return v
        sizes = (v,) if isinstance(v, int) else (v or ())
        if any(s < 32 or s > 2048 for s in sizes):
            raise ValueError("input_size must be between 32 and 2048 pixels")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero_std(
        cls, v: tuple[float, float, float] | None
    ) -> tuple[float, float, float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("std values must be positive")
        return v


class ModelConfig(_Section):
    """Which pretrained backbone, which weights, and the new head."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str = Field(
        "imagenet",
        description='"imagenet" (bundled or hub cache), "none", or a .pth/.safetensors path',
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    preprocess: PreprocessConfig = PreprocessConfig()

    @field_validator("weights")
    @classmethod
    def _weights_path(cls, v: str, info: ValidationInfo) -> str:
        if v in ("imagenet", "none"):
            return v
        p = _resolve(Path(v), info)
        assert p is not None
        if p.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
            raise ValueError('expected "imagenet", "none" or a .pth/.pt/.safetensors file path')
        if not p.is_file():
            raise ValueError(f"weights file does not exist: {p}")
        return str(p)


class PhaseConfig(_Section):
    """One fine-tuning phase: which layer groups train, for how long, at which rates."""

    name: str
    epochs: int = Field(ge=1, le=1000)
    lr: float | Literal["auto"] = Field(
        1e-3,
        description='learning rate of the new head, or "auto" (learning-rate range test)',
    )
    unfreeze: int | Literal["all"] = Field(
        0, description="body layer groups trained, counted from the top; 0 = body frozen"
    )
    body_lr_mult: float = Field(0.1, gt=0.0, le=1.0, description="body lr = lr * body_lr_mult")
    freeze_bn: bool = Field(
        False, description="keep BatchNorm statistics of unfrozen groups fixed as well"
    )

    @field_validator("lr")
    @classmethod
    def _lr_range(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0.0 < v < 10.0:
            raise ValueError('lr must be between 0 and 10 (exclusive), or "auto"')
        return v

    @field_validator("unfreeze")
    @classmethod
    def _non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError('unfreeze must be >= 0 or "all"')
        return v


class AugmentConfig(_Section):
    """Training-time augmentation; validation and export never augment."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.333)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="max degrees either way")
    color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="brightness/contrast/saturation")
    hue: float = Field(0.0, ge=0.0, le=0.5)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("expected [low, high] with 0 < low <= high")
        return v


class EarlyStoppingConfig(_Section):
    """Stop a phase when validation loss stops improving; the best weights are restored."""

    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


def _default_phases() -> tuple[PhaseConfig, ...]:
    # One phase, every layer at one rate: on real images the body has to move (docs/recipe.md,
    # "Why these defaults"); head-only epochs and a slowed body lost 7-26 points on held-out sets.
    return (PhaseConfig(name="finetune", epochs=6, lr=2e-3, unfreeze="all", body_lr_mult=1.0),)


class TrainConfig(_Section):
    """Fine-tuning in phases: optimizer, schedule, regularisation, phases."""

    seed: int = 0
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where training runs, and the checks after it (ONNX Runtime's CUDA "
        "provider on that GPU where it starts, else the CPU)",
    )
    batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="images per optimizer step over all processes; with N processes "
        "(torchrun, --nproc-per-node N) each trains on batch_size / N",
    )
    optimizer: Literal["adamw", "sgd", "rmsprop"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(0.01, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.5, ge=0.0)
    head_init: Literal["probe", "random"] = Field(
        "random",
        description="probe: fit the new head on frozen pretrained features before the first "
        "phase (LP-FT); random: small random weights",
    )
    lr_find_steps: int = Field(
        100, ge=10, le=2000, description='optimizer steps of the range test for lr = "auto"'
    )
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels-last memory format (CPU and CUDA)")
    augment: AugmentConfig = AugmentConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    phases: tuple[PhaseConfig, ...] = Field(
        default_factory=_default_phases,
        min_length=1,
        # `stages`: the key's name before "stage" came to mean a build stage only.
        validation_alias=AliasChoices("phases", "stages"),
    )

    @model_validator(mode="before")
    @classmethod
    def _one_phases_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "phases" in data and "stages" in data:
            raise ValueError(
                "both [[train.phases]] and [[train.stages]] are given; [[train.stages]] is the "
                "older name of [[train.phases]]: keep one"
            )
        return data

    @field_validator("phases")
    @classmethod
    def _unique_names(cls, v: tuple[PhaseConfig, ...]) -> tuple[PhaseConfig, ...]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"phase names must be unique; repeated: {', '.join(dup)}")
        return v

    def stable_json(self) -> dict[str, Any]:
        """The settings as JSON with `phases` under its older name, `stages`: what checkpoint
        fingerprints and cv fold keys hash, so those written before the rename stay valid."""
        value = json.loads(self.model_dump_json())
        value["stages"] = value.pop("phases")
        return value


class ExportConfig(_Section):
    """ONNX export and its parity check against PyTorch."""

    # The dynamo exporter writes opset 18 or newer; an older request would silently be ignored.
    opset: int = Field(18, ge=18, le=23)
    parity_images: int = Field(64, ge=1, description="validation images compared with PyTorch")
    parity_atol: float = Field(1e-3, gt=0.0, description="max allowed |logit difference|")
    min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0)
    device_images: int = Field(
        200,
        ge=0,
        description="validation images shipped preprocessed (FP16) in device_batch.npz, so "
        "`build --on-device` gates engines on real data; 0: none",
    )


class QuantizeConfig(_Section):
    """FP16 and INT8 variants of model.onnx, calibrated and accuracy-gated."""

    variants: tuple[Literal["fp16", "int8_trt", "int8_cpu"], ...] = ("fp16", "int8_trt", "int8_cpu")
    # Measured (benchmarks/calibration_images.py, nested draws, percentile): at 128 images the
    # median range width is within 0.8% of 480-512 images' on the demo and three real sets, and
    # INT8 answers match theirs to within the noise of reordering the same images; at 64 one
    # set still moved 2.1%. Calibration time is linear in it: 300 -> 128 saves ~9 s per method.
    calibration_images: int = Field(128, ge=1, description="drawn seeded, stratified from train")
    # Measured on the real-image sets (benchmarks/int8_accuracy.py): minmax lost 1.25 points on
    # scenes (rejected), percentile 0.00, and no set lost more than 1 point with percentile.
    calibration_method: Literal["minmax", "entropy", "percentile"] = "percentile"
    percentile: float = Field(99.999, gt=90.0, le=100.0, description="for the percentile method")
    keep_float: tuple[str, ...] = Field(
        ("first_conv", "classifier"),
        description="nodes left in float: 'first_conv', 'classifier' or ONNX node names",
    )
    max_drop: float = Field(1.0, ge=0.0, le=100.0, description="accuracy points below FP32")
    # Not gated by default: on the accuracy suite's real sets every INT8 method measured (ORT,
    # NNCF with bias correction, per-layer ranges, a distilled QAT) changed 1.5-5% of answers,
    # nearly all FP32 near-ties that flip both ways at no accuracy lost; a default of 1% would
    # ship no INT8 there. Set it where answers must match the validated FP32 model.
    max_changed: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="percent of validation answers a variant may change against FP32; unset: "
        "not gated",
    )
    # "reject" by default: a variant that misses is kept out of the shipped files and the build
    # goes on to bench and report; a build fails on it only when the recipe says INT8 is
    # required (on_fail = "error", or a [gates] max_int8_drop).
    on_fail: Literal["error", "reject"] = Field(
        "reject",
        description="a variant over max_drop is marked rejected (the build goes on), or fails "
        "the build",
    )
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights for int8_cpu; auto: on when the CPU lacks VNNI"
    )
    trt_float: Literal["fp16", "fp32"] = Field(
        "fp16", description="int8_trt: precision of what stays in float (ModelOpt's default fp16)"
    )
    search_budget: int = Field(
        8,
        ge=0,
        le=64,
        description="INT8 trials (quantize + evaluate) when the first misses max_drop; 0: none",
    )
    search_images: int = Field(
        256, ge=16, description="most images the INT8 search decides on (data.holdout)"
    )
    seed: int = 0


class EnginesConfig(_Section):
    """TensorRT engines compiled from the accepted ONNX variants (where TensorRT exists)."""

    variants: tuple[Literal["fp32", "fp16", "int8_trt"], ...] = ("fp16", "int8_trt")
    min_batch: int = Field(1, ge=1, le=4096)
    opt_batch: int = Field(8, ge=1, le=4096)
    max_batch: int = Field(32, ge=1, le=4096)
    workspace_mib: int = Field(2048, ge=64, le=1 << 20)
    fp32_atol: float = Field(1e-2, gt=0.0, description="max |logit diff| of an FP32 engine")
    on_fail: Literal["error", "reject"] = "error"

    @model_validator(mode="after")
    def _batch_order(self) -> EnginesConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need min_batch <= opt_batch <= max_batch")
        return self


# Artifact names a gate may name: model.pt, model[.variant].onnx, or a glob over them / engines.
_ARTIFACT_PATTERN = re.compile(r"^model[A-Za-z0-9_.*?\[\]-]*\.(pt|onnx|engine|\*)$|^\*$")


class BenchConfig(_Section):
    """Latency / throughput / accuracy of every artifact this machine can run."""

    batch_sizes: tuple[int, ...] = Field((1, 8, 32), min_length=1)
    warmup_iters: int = Field(3, ge=0, le=10_000, description="untimed runs before measuring")
    min_iters: int = Field(10, ge=5, le=100_000, description="timed runs at least")
    min_seconds: float = Field(
        0.0, ge=0.0, le=3600.0, description="and timed for at least this long"
    )
    # Then timing stops once p50 and p99 are known to these (half-widths of their 95%
    # distribution-free intervals), or at max_seconds. A p99 can be bounded only from about
    # 380 calls, so slow configurations end at the cap; their rows say so (`stopped`).
    p50_precision_pct: float = Field(
        2.0, gt=0.0, le=100.0, description="p50 known to within this percent (95%)"
    )
    p99_precision_pct: float = Field(
        10.0, gt=0.0, le=100.0, description="p99 known to within this percent (95%)"
    )
    max_seconds: float = Field(
        1.0, gt=0.0, le=3600.0, description="per artifact and batch size, at most (the cap)"
    )
    threads: int = Field(0, ge=0, description="CPU threads for torch / ONNX Runtime; 0 = all")
    accuracy: bool = Field(True, description="measure each artifact on the validation split")
    timer_check: bool = Field(
        True, description="compare the timer with ONNX Runtime's own profiler (ORT artifacts)"
    )

    @field_validator("batch_sizes")
    @classmethod
    def _positive_sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= b <= 4096 for b in v):
            raise ValueError("batch sizes must be between 1 and 4096")
        return tuple(sorted(set(v)))


class ExplainConfig(_Section):
    """Grad-CAM heat maps of validation images in report.md: misclassified first, per class."""

    max_images: int = Field(
        16, ge=0, le=1000, description="heat maps per class at most; 0 turns them off"
    )
    correct_per_class: int = Field(
        4, ge=0, description="of those, correctly classified images shown for comparison"
    )


class NoveltyConfig(_Section):
    """The novelty score (how unlike the training images an image is) and its threshold."""

    # Split-conformal on the validation split: at most this share of new images like the
    # validation ones is flagged (in expectation). 2%, measured (benchmarks/novelty.py): at 1%
    # the threshold sits at validation's few most unusual images, and on textures it flagged
    # 10% of out-of-focus and 75% of dark frames against 90% and 100% at 2% (validation
    # flagged: 0.5% and 1.5%); with fewer than 99 validation images 1% is their largest score.
    target: float | Literal["off"] = Field(
        0.02, description='share of validation-like images flagged for review; "off": no score'
    )
    min_faults_flagged: float | None = Field(
        None, ge=0.0, le=1.0, description="gate: share of the camera-fault probe flagged"
    )
    # Reported always, gated on request: a validation split of 100 images puts 99% at one
    # image, so a default gate would fail small builds on a single score near the threshold.
    min_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="gate: share of images each variant flags as FP32 does"
    )
    fit_images: int = Field(2000, ge=16, description="training images the score is fitted on")
    probe_images: int = Field(
        32, ge=1, description="validation images each camera fault of the probe is made from"
    )
    seed: int = 0

    @field_validator("target")
    @classmethod
    def _target_range(cls, v: float | str) -> float | str:
        if v != "off" and not 0.0 < float(v) < 0.5:
            raise ValueError('expected a share between 0 and 0.5 (e.g. 0.01), or "off"')
        return v


class DecisionConfig(_Section):
    """The operating point: a threshold on p(ok) chosen on the validation split for one target."""

    max_escape_rate: float | None = Field(
        None, ge=0.0, lt=1.0, description="defective parts accepted as ok, over all defective"
    )
    max_false_reject_rate: float | None = Field(
        None, ge=0.0, lt=1.0, description="ok parts rejected, over all ok parts"
    )
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="of the Wilson intervals")
    # The threshold is chosen on the point estimate by default: with the ~100 defective images
    # of a typical validation split, even 0 escapes has a 95% upper bound of 3.7%, so requiring
    # the bound would make any tight target unreachable. The bound is reported (and gated on
    # request) so that a reviewer sees how much the split can vouch for.
    require_upper_bound: bool = Field(
        False, description="the Wilson upper bound, not the point estimate, must meet the target"
    )

    @model_validator(mode="after")
    def _one_target(self) -> DecisionConfig:
        if (self.max_escape_rate is None) == (self.max_false_reject_rate is None):
            raise ValueError(
                "give exactly one target: max_escape_rate (e.g. 0.005) or "
                "max_false_reject_rate (e.g. 0.02)"
            )
        return self


class ClientsConfig(_Section):
    """What a client outside tlbuild (C++, C#, Node, DeepStream) gets to give tlbuild's answers."""

    image_models: bool = Field(
        True,
        description="beside each shipped ONNX artifact, its model_image twin: uint8 RGB at the "
        "camera's own size in, the resize, scale and normalisation inside the graph",
    )
    kit_images: int = Field(
        8,
        ge=0,
        le=200,
        description="validation images in the conformance kit (conformance/), plus four made "
        "from them (EXIF-rotated, alpha, 16-bit, an enlarged JPEG); 0: no kit",
    )
    min_top1_agreement: float = Field(
        0.99,
        ge=0.0,
        le=1.0,
        description="an image model ships only where it gives its artifact's answer on at least "
        "this share of validation images decoded at their own size",
    )
    check_images: int = Field(
        64, ge=1, description="validation images each image model is checked on"
    )


class TrackConfig(_Section):
    """Experiment tracking: a build that ran any stage is logged as one MLflow run."""

    mlflow: str | None = Field(
        None,
        description='the tracking server, e.g. "http://mlflow:5000"; unset: $MLFLOW_TRACKING_URI; '
        "neither: no tracking (needs pip install 'tlbuild[mlflow]')",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; default: the recipe's name"
    )
    required: bool = Field(
        False,
        description="an unreachable tracker fails the build; by default it is one warning and "
        "the next build logs the run",
    )
    registered_model: str | None = Field(
        None,
        description="register the shipped model.onnx (with its manifest) under this name in "
        "MLflow's model registry",
    )

    def uri(self, environ: dict[str, str]) -> str | None:
        """The tracking URI in effect: this section's, else $MLFLOW_TRACKING_URI, else None."""
        return self.mlflow or environ.get("MLFLOW_TRACKING_URI") or None


class GatesConfig(_Section):
    """Thresholds that make `tlbuild run` exit 1; every gate is listed in the report."""

    min_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="validation accuracy of every benchmarked artifact"
    )
    min_macro_f1: float | None = Field(None, ge=0.0, le=1.0)
    max_escape_rate: float | None = Field(None, ge=0.0, le=1.0, description="needs ok_class")
    max_false_reject_rate: float | None = Field(None, ge=0.0, le=1.0, description="needs ok_class")
    max_int8_drop: float | None = Field(
        None, ge=0.0, description="accuracy points an INT8 variant may lose against FP32"
    )
    max_p99_ms: dict[str, dict[int, float]] = Field(
        default_factory=dict,
        description='per artifact (name or glob) and batch size, e.g. {"model.onnx" = {1 = 20}}',
    )
    min_throughput: dict[str, dict[int, float]] = Field(
        default_factory=dict, description="images/s, per artifact and batch size"
    )

    @field_validator("max_p99_ms", "min_throughput")
    @classmethod
    def _artifact_names(cls, v: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
        for name, per_batch in v.items():
            if not _ARTIFACT_PATTERN.match(name):
                raise ValueError(
                    f"'{name}' is not an artifact name (model.pt, model.onnx, "
                    "model.int8.cpu.onnx, a TensorRT *.engine, or a glob such as 'model.*.onnx')"
                )
            for batch, value in per_batch.items():
                if batch < 1 or value <= 0:
                    raise ValueError(f"'{name}': batch sizes and limits must be positive")
        return v


class Recipe(_Section):
    """A whole recipe."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: Path | None = Field(
        None, description="exports root; default ./exports under the current directory"
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    # The TOML section keeps the name users know from `tlbuild build`.
    build: EnginesConfig = EnginesConfig()
    bench: BenchConfig = BenchConfig()
    explain: ExplainConfig = ExplainConfig()
    novelty: NoveltyConfig = NoveltyConfig()
    decision: DecisionConfig | None = None  # no [decision]: the argmax rule
    gates: GatesConfig = GatesConfig()
    clients: ClientsConfig = ClientsConfig()
    track: TrackConfig = TrackConfig()

    _resolve_out = field_validator("output_dir")(_resolve)

    @field_validator("decision")
    @classmethod
    def _decision_needs_ok_class(
        cls, v: DecisionConfig | None, info: ValidationInfo
    ) -> DecisionConfig | None:
        data = info.data.get("data")
        if v is not None and data is not None and not data.ok_class:
            raise ValueError(
                "[decision] sets a threshold on p(ok class) and needs data.ok_class: name the "
                'good-part class in [data] (ok_class = "ok")'
            )
        return v

    # The file it was read from: recorded in the manifest so that `tlbuild bench DIR` and
    # `tlbuild build --on-device DIR` use the recipe as it is now when it is at hand.
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The TOML file this recipe was loaded from (None when built in code)."""
        return self._source

    @model_validator(mode="after")
    def _ok_class_known(self) -> Recipe:
        # Class names only exist on disk, so this is checked again at scan time; here we only
        # stop the obvious typo early when the layout is a plain root.
        if self.data.ok_class and self.data.root is not None:
            classes = {p.name for p in self.data.root.iterdir() if p.is_dir()}
            if classes and self.data.ok_class not in classes:
                raise ValueError(
                    f"data.ok_class = {self.data.ok_class!r} is not a class folder under "
                    f"{self.data.root} (found: {', '.join(sorted(classes))})"
                )
        return self

    @model_validator(mode="after")
    def _gate_batches_benchmarked(self) -> Recipe:
        for key in ("max_p99_ms", "min_throughput"):
            for name, per_batch in getattr(self.gates, key).items():
                missing = sorted(set(per_batch) - set(self.bench.batch_sizes))
                if missing:
                    raise ValueError(
                        f"gates.{key}['{name}'] names batch size {missing[0]}, which bench does "
                        f"not measure; add it to bench.batch_sizes {list(self.bench.batch_sizes)}"
                    )
        if (
            self.gates.max_escape_rate is not None or self.gates.max_false_reject_rate is not None
        ) and not self.data.ok_class:
            raise ValueError("gates.max_escape_rate / max_false_reject_rate need data.ok_class")
        return self

    @property
    def out_dir(self) -> Path:
        """The folder this recipe's artifacts go to."""
        root = self.output_dir if self.output_dir is not None else Path.cwd() / "exports"
        return root / self.name

    def to_jsonable(self) -> dict[str, Any]:
        """The fully resolved recipe as plain JSON types."""
        return json.loads(self.model_dump_json())


def _format_errors(path: Path, err: ValidationError) -> str:
    errors: list[Any] = []
    unions: dict[tuple[Any, ...], list[str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        # Union members show up as path parts like "int" or "literal['auto']": fold them into
        # one entry per key that says which forms were accepted.
        cut = next((i for i, p in enumerate(loc) if isinstance(p, str) and _is_union_tag(p)), None)
        if cut is None:
            errors.append(dict(e))
            continue
        key = loc[:cut]
        if key not in unions:
            unions[key] = []
            errors.append({**e, "loc": key, "type": "union", "msg": ""})
        tag = str(loc[cut])
        if tag not in unions[key]:
            unions[key].append(tag)
    for e in errors:
        if e["type"] == "union":
            e["msg"] = "expected " + " or ".join(unions[tuple(e["loc"])])
    # A failed item also fails its container's length check; report only the innermost.
    locs = [tuple(e["loc"]) for e in errors]
    errors = [
        e
        for e in errors
        if not any(len(o) > len(e["loc"]) and o[: len(e["loc"])] == tuple(e["loc"]) for o in locs)
    ]
    lines = [f"{path}: {len(errors)} problem(s) in the recipe:"]
    for e in errors:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `tlbuild check --help` names the reference)"
        if e["type"] == "missing":
            lines.append(f"  - {loc}: required key is missing")
            continue
        given = e.get("input")
        shown = json.dumps(given, default=str) if not isinstance(given, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {loc}: {msg} (given: {shown})")
    return "\n".join(lines)


def _is_union_tag(part: str) -> bool:
    return part in ("int", "float", "str", "bool", "none") or "[" in part


def load_recipe(path: Path | str) -> Recipe:
    """Read, validate and resolve a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    if path.is_dir():
        tomls = sorted(p.name for p in path.glob("*.toml"))[:5]
        hint = f" ({', '.join(tomls)})" if tomls else ""
        raise RecipeError(f"{path} is a folder; name the recipe's .toml file in it{hint}")
    if not path.exists():
        raise RecipeError(f"recipe not found: {path}")
    try:
        text = read_record_text(path)
        raw = tomllib.loads(text)
    except OSError as e:
        why = getattr(e, "reason", None) or e.strerror or e
        raise RecipeError(f"{path}: cannot read it ({why})") from None
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    # The file name may hold spaces or accents; the export folder name gets a safe form of it.
    raw.setdefault("name", re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "recipe")
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": path.resolve().parent})
        recipe._source = path.resolve()
    except ValidationError as e:
        raise RecipeError(_format_errors(path, e)) from None
    _note_old_phases_key(path, raw, text)
    return recipe


_OLD_PHASES_KEY = re.compile(r"^\s*(\[\[\s*train\s*\.\s*stages\s*\]\]|stages\s*=)")


def _note_old_phases_key(path: Path, raw: dict[str, Any], text: str) -> None:
    """A notice, not an error, for `[[train.stages]]`: the older name of `[[train.phases]]`."""
    train = raw.get("train")
    # Under torchrun every process reads the recipe; rank 0 alone says so.
    if not isinstance(train, dict) or "stages" not in train or os.environ.get("RANK", "0") != "0":
        return
    lines = text.splitlines()
    line = next((i for i, s in enumerate(lines, 1) if _OLD_PHASES_KEY.match(s)), 1)
    # Shown as "<recipe>:<line>: FutureWarning: ..." with that line of the recipe under it.
    warnings.warn_explicit(
        "[[train.stages]] is now [[train.phases]] (a stage is a step of the build); "
        "the old name still works",
        FutureWarning,
        str(path),
        line,
    )
