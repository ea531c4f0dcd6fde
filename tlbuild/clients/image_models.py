"""The image-input twin of each shipped ONNX artifact (model_image*.onnx), each checked against
the artifact it wraps on validation images decoded as a client decodes them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tlbuild.artifacts import MODEL_ONNX, SPLITS_JSON, VARIANTS, onnx_artifact
from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample
from tlbuild.data.splits_file import read_split
from tlbuild.errors import TlbuildError, UsageError
from tlbuild.export.image_input import IMAGE_INPUT, image_input_model, supported
from tlbuild.fileio import atomic_path
from tlbuild.manifest import Manifest, read_manifest_if_any
from tlbuild.runtime.providers import CPU, Placement

INPUT = {
    "name": IMAGE_INPUT,
    "dtype": "uint8",
    "layout": "NHWC",
    "shape": ["batch", "height", "width", 3],
    "channel_order": "RGB",
    "decode": "upright (EXIF applied), alpha composited on white, 16-bit to 8-bit",
}


def exported(out: Path) -> tuple[Manifest, Preprocessing, list[Sample]]:
    """The export folder's manifest, its preprocessing and the validation split; a UsageError
    saying what to run where there is none."""
    manifest = read_manifest_if_any(out)
    if manifest is None or manifest.onnx is None:
        raise UsageError(f"no exported model in {out}; run `tlbuild run` first")
    val = read_split(out, "val", manifest.classes)
    if not val:
        raise UsageError(f"{out / SPLITS_JSON} lists no validation images; retrain")
    return manifest, Preprocessing.from_dict(manifest.preprocessing), val


def shipped(out: Path, manifest: Manifest) -> list[str]:
    """model.onnx and each accepted variant present."""
    found = [MODEL_ONNX]
    for key, a in VARIANTS.items():
        v = manifest.variants.get(key)
        if v is not None and v.status == "accepted" and (out / a.file).is_file():
            found.append(a.file)
    return found


def wrapped(out: Path, manifest: Manifest) -> list[str]:
    """The shipped artifacts that get an image model: all but those made for TensorRT, which
    builds no engine from one (its ONNX parser documents Resize without antialias) and whose
    Q/DQ ONNX Runtime runs as other integer kernels, so such a twin would match no runtime."""
    return [
        f for f in shipped(out, manifest) if (a := onnx_artifact(f)) and a.provider != "tensorrt"
    ]


def simulates_qdq(file: str) -> bool:
    """Checked with Q/DQ as written (int8_trt: its target is TensorRT, not this CPU)."""
    a = onnx_artifact(file)
    return a is not None and a.simulate_qdq


def resize_note(spec: Preprocessing) -> str:
    """What the graph does before the model, in one line (the manifest's record)."""
    crop = ", then the centre crop" if spec.resize == "center_crop" else ""
    return (
        "in the graph: ONNX Resize (antialias, opset 18 or later), "
        f"{spec.interpolation}, width then height with 8-bit rounding between, as Pillow{crop}"
    )


def make_image_model(
    src: Path,
    dst: Path,
    spec: Preprocessing,
    samples: Sequence[Sample],
    min_agreement: float,
    simulate_qdq: bool = False,
    on: Placement = CPU,
) -> dict[str, Any]:
    """Write `dst` (the twin) from `src` and check it: each sample decoded as a client would
    (upright 8-bit RGB at its own size) against `src` on tlbuild's own preprocessing. The
    manifest's record; no file is left where it falls short."""
    why = supported(spec)
    if why:
        dst.unlink(missing_ok=True)
        return {"file": None, "of": src.name, "why_not": why}
    figures: dict[str, Any] = {}
    try:
        with atomic_path(dst) as tmp:
            onnx.save(image_input_model(onnx.load(str(src)), spec), str(tmp))
            figures = _agreement(src, tmp, spec, samples, simulate_qdq, on)
            if figures["top1_agreement"] < min_agreement:
                raise _Rejected  # never under its name, not even for a moment
    except _Rejected:
        pass  # recorded below, with the figures
    except TlbuildError:  # a full disk: the user's to see
        raise
    except Exception as e:  # an optional extra: the build goes on without it, saying why
        dst.unlink(missing_ok=True)
        return {
            "file": None,
            "of": src.name,
            "why_not": f"it could not be made ({type(e).__name__}: {e})",
        }
    record: dict[str, Any] = {"file": dst.name, "of": src.name, "check": figures}
    if figures["top1_agreement"] < min_agreement:
        dst.unlink(missing_ok=True)  # an earlier one
        record["file"] = None
        record["why_not"] = (
            f"it gave {src.name}'s answer on {figures['top1_agreement']:.1%} of "
            f"{figures['images']} validation images, under clients.min_top1_agreement"
        )
    return record


class _Rejected(Exception):
    """The check fell short: the temporary file is not renamed."""


def _agreement(
    src: Path,
    candidate: Path,
    spec: Preprocessing,
    samples: Sequence[Sample],
    simulate_qdq: bool,
    on: Placement,
) -> dict[str, Any]:
    from tlbuild.data.images import load_rgb
    from tlbuild.data.preprocess import load_batch
    from tlbuild.runtime.backends import open_onnx
    from tlbuild.runtime.base import softmax

    reference = open_onnx(src, simulate_qdq=simulate_qdq, on=on)
    image = open_onnx(candidate, simulate_qdq=simulate_qdq, on=on)
    same, probs, logits = [], [], []
    for s in samples:  # one at a time: each image has its own size
        want = reference.logits(load_batch([s.path], spec))
        got = image.logits(np.asarray(load_rgb(s.path))[None])
        p, q = softmax(want)[0], softmax(got)[0]
        same.append(bool(p.argmax() == q.argmax()))
        probs.append(float(np.abs(p - q).max()))
        logits.append(float(np.abs(want - got).max()))
    n = len(samples)
    return {
        "images": n,
        "top1_agreement": round(sum(same) / n, 4) if n else 1.0,
        "mean_max_prob_diff": round(float(np.mean(probs)), 6) if n else 0.0,
        "max_prob_diff": round(max(probs), 6) if n else 0.0,
        "max_abs_logit_diff": round(max(logits), 6) if n else 0.0,
        "reference": f"{src.name} on tlbuild's preprocessing (Pillow resize)",
        "on": on.label,
    }
