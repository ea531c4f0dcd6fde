"""The TensorRT stage: compile accepted ONNX variants into engines and gate each one.

Works from an export folder alone (ONNX files + manifest), so `tlbuild build --on-device DIR`
runs on the target machine with no training data and no recipe. Where TensorRT or a GPU is
missing the stage is recorded as skipped with the reason; nothing else fails.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample
from tlbuild.errors import BuildError
from tlbuild.export.gate import variant_session
from tlbuild.export.manifest import update_manifest
from tlbuild.export.parity import load_batch
from tlbuild.export.quantize import VARIANT_FILES
from tlbuild.export.tensorrt_build import TensorRTPredictorCore, build_engine, tensorrt_status
from tlbuild.recipe import BuildConfig

ONNX_FOR = {
    "fp32": "model.onnx",
    "fp16": VARIANT_FILES["fp16"],
    "int8_trt": VARIANT_FILES["int8_trt"],
}
LABEL = {"fp32": "fp32", "fp16": "fp16", "int8_trt": "int8-trt"}
TIMING_CACHE = "tensorrt.timing.cache"


def _compare(
    engine: TensorRTPredictorCore, fp32: Path, images: np.ndarray, labels: np.ndarray | None
) -> dict[str, Any]:
    sess = variant_session(fp32, simulate_qdq=False)
    name = sess.get_inputs()[0].name
    ref, got = [], []
    step = engine.max_batch
    for i in range(0, len(images), step):
        x = images[i : i + step]
        if len(x) < engine.min_batch:
            break
        ref.append(sess.run(None, {name: x})[0])
        got.append(engine.run(x))
    r, g = np.concatenate(ref), np.concatenate(got)
    out: dict[str, Any] = {
        "images": len(r),
        "max_abs_logit_diff": float(np.abs(r - g).max()),
        "top1_agreement": float((r.argmax(1) == g.argmax(1)).mean()),
    }
    if labels is not None:
        lab = labels[: len(r)]
        out["fp32_accuracy"] = float((r.argmax(1) == lab).mean())
        out["accuracy"] = float((g.argmax(1) == lab).mean())
        out["drop_points"] = round((out["fp32_accuracy"] - out["accuracy"]) * 100, 4)
    return out


def build_stage(
    folder: Path,
    cfg: BuildConfig,
    console: Console,
    samples: Sequence[Sample] | None,
    max_drop: float,
) -> dict[str, Any]:
    """Build and gate engines for `cfg.variants` in `folder`; record them in its manifest.

    `samples` are the validation images (None on a device, which then compares against ONNX
    Runtime FP32 on seeded random inputs: parity only, no accuracy).
    """
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    ok, why = tensorrt_status()
    if not ok:
        console.print(f"[yellow]TensorRT build skipped:[/] {why}")
        section: dict[str, Any] = {"status": "skipped", "reason": why}
    else:
        spec = Preprocessing.from_dict(manifest["preprocessing"])
        if samples:
            images = load_batch([s.path for s in samples], spec)
            labels: np.ndarray | None = np.array([s.label for s in samples])
        else:
            h, w = spec.input_size
            images = np.random.default_rng(0).standard_normal((16, 3, h, w)).astype(np.float32)
            labels = None
        engines: dict[str, Any] = {}
        rejected = {
            v["file"] for v in manifest.get("variants", {}).values() if v["status"] != "accepted"
        }
        for variant in cfg.variants:
            src = folder / ONNX_FOR[variant]
            if not src.is_file() or src.name in rejected:
                engines[variant] = {"status": "skipped", "reason": f"no accepted {src.name}"}
                continue
            info = build_engine(
                src,
                folder,
                LABEL[variant],
                cfg.min_batch,
                cfg.opt_batch,
                cfg.max_batch,
                cfg.workspace_mib,
                folder / TIMING_CACHE,
            )
            check = _compare(
                TensorRTPredictorCore(info.path), folder / "model.onnx", images, labels
            )
            passed = check.get("drop_points", 0.0) <= max_drop and (
                variant != "fp32" or check["max_abs_logit_diff"] <= cfg.fp32_atol
            )
            engines[variant] = {
                **info.to_dict(),
                "path": info.path.name,
                **check,
                "status": "accepted" if passed else "rejected",
            }
            console.print(
                f"Engine {info.path.name}: agreement with ONNX FP32 {check['top1_agreement']:.1%}"
                + (
                    f", accuracy drop {check['drop_points']:+.2f} points"
                    if labels is not None
                    else ""
                )
                + ("" if passed else " [red]rejected[/]")
            )
            if not passed and cfg.on_fail == "error":
                raise BuildError(
                    f"TensorRT engine {info.path.name} fails the gate against ONNX Runtime FP32: "
                    f'{json.dumps(check)}; set build.on_fail = "reject" to continue without it'
                )
        section = {"status": "built", "engines": engines}
    manifest["engines"] = section
    names: list[str] = []
    if section["status"] == "built":
        names = [e["path"] for e in section["engines"].values() if "path" in e] + [TIMING_CACHE]
    update_manifest(folder, manifest, names)
    return section
