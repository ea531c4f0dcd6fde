"""The conformance stage: the kit (conformance/) that `tlbuild verify-client` checks a client
outside tlbuild against: real validation images, what tlbuild makes of each at every step, and
each shipped ONNX artifact's answers. After the decision stage: the kit records the decision
`tlbuild classify` makes, which needs the decision and novelty thresholds."""

from __future__ import annotations

from typing import Any

from tlbuild.artifacts import CONFORMANCE, MODEL_ONNX, NOVELTY_NPZ, SPLITS_JSON, VARIANTS
from tlbuild.clients.image_models import exported, shipped, simulates_qdq
from tlbuild.clients.kit import KIT_FOLDERS, KIT_JSON, make_kit
from tlbuild.manifest import write_section
from tlbuild.recipe import Recipe
from tlbuild.runtime.backends import OnnxPredictor, open_onnx
from tlbuild.stages.base import Stage, StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    """Write conformance/ and record it in the manifest."""
    from tlbuild.classify.run import default_decider

    cfg, out = ctx.recipe.clients, ctx.out
    manifest, spec, val = exported(out)
    twins = [r["file"] for r in manifest.image_models.values() if r.get("file")]
    # On the CPU, as a client's reference: a GPU's FP16 and TensorRT's INT8 differ from it
    # within the kit's probability tolerance (int8_trt with Q/DQ run as written).
    opened: dict[str, OnnxPredictor] = {
        file: open_onnx(out / file, simulate_qdq=simulates_qdq(file))
        for file in [*shipped(out, manifest), *twins]
        if (out / file).is_file()
    }
    decider = default_decider(out, manifest)
    rule = {
        "ok_class": None if decider.ok is None else manifest.classes[decider.ok],
        "threshold": decider.threshold,
        "novelty_threshold": None if decider.novelty is None else decider.novelty.threshold,
    }
    kit = make_kit(out, spec, val, cfg.kit_images, manifest.classes, opened, decider.decide, rule)
    write_section(out, "conformance", {"conformance": kit}, [])
    ctx.console.print(
        f"Conformance kit: {kit['images']} images with tlbuild's decoded pixels, resized pixels "
        f"and input tensor, and {len(opened)} artifacts' answers, in {out / CONFORMANCE}"
    )
    return kit


def summarise(kit: dict[str, Any]) -> str:
    """The kit's size."""
    return f"{kit['images']} images, {len(kit['artifacts'])} artifacts"


def _disabled(recipe: Recipe) -> str | None:
    return "clients.kit_images = 0" if recipe.clients.kit_images == 0 else None


STAGE = Stage(
    name="conformance",
    sections=("clients",),
    inputs=(
        SPLITS_JSON,
        MODEL_ONNX,
        NOVELTY_NPZ,
        "model_image*.onnx",
        *(a.file for a in VARIANTS.values()),
    ),  # fmt: skip
    # Only the kit's own files: anything a user leaves in the folder is not hashed as its output
    # (it still goes when the kit is replaced, as the kit's README says).
    outputs=(
        f"{CONFORMANCE}/{KIT_JSON}",
        f"{CONFORMANCE}/README.md",
        *(f"{CONFORMANCE}/{sub}/*" for sub in KIT_FOLDERS),
    ),
    run=run,
    summarise=summarise,
    disabled=_disabled,
    upstream=("train", "export", "quantize", "image_models", "novelty", "decision"),
)
