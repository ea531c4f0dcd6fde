"""How close the image models' in-graph resize is to Pillow's, pixel by pixel.

    python benchmarks/image_model_pixels.py

Runs the preprocessing graph of tlbuild/export/image_input.py (resize or resize-and-crop, before
scaling) in ONNX Runtime and compares its 8-bit pixels with Pillow's `Image.resize` (what every
tlbuild check and `tlbuild classify` use) on:
- 60 crops (180-640 px) of scikit-image's colour photographs, shrunk to 160 px, bicubic and
  bilinear, resize and centre crop;
- the accuracy suite's textures (32 px greyscale patches) enlarged to 128 px: an exact 4x
  upscale, where rounding half up or half to even decides;
- 40 frames of 640x480 (the demo's surfaces drawn at 640 px), shrunk to 160 px.
Prints the share of identical pixels, the share more than one grey level off, and the largest
difference.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "accuracy"))

import datasets  # noqa: E402

from tlbuild.data.preprocess import Preprocessing, resize_for_model  # noqa: E402
from tlbuild.export.image_input import IMAGE_INPUT, resize_model  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def graph(spec: Preprocessing) -> ort.InferenceSession:
    """The image model's resize alone: uint8 NHWC in, 8-bit levels (float, NCHW) out."""
    model = resize_model(spec)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def compare(images: list[np.ndarray], spec: Preprocessing) -> tuple[float, float, int]:
    s = graph(spec)
    same, off, worst = [], [], 0
    for a in images:
        want = np.asarray(resize_for_model(Image.fromarray(a), spec)).astype(int)
        got = s.run(None, {IMAGE_INPUT: np.ascontiguousarray(a)[None]})[0][0]
        d = np.abs(want - got.transpose(1, 2, 0).astype(int))
        same.append((d == 0).mean())
        off.append((d > 1).mean())
        worst = max(worst, int(d.max()))
    return float(np.mean(same)), float(np.mean(off)), worst


def photos() -> list[np.ndarray]:
    import skimage.data

    rng = np.random.default_rng(0)
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = np.asarray(getattr(skimage.data, name)())
        for _ in range(15):
            big_h, big_w = img.shape[:2]
            h, w = int(rng.integers(180, min(640, big_h))), int(rng.integers(180, min(640, big_w)))
            y, x = int(rng.integers(0, big_h - h + 1)), int(rng.integers(0, big_w - w + 1))
            out.append(img[y : y + h, x : x + w])
    return out


def frames(n: int = 40) -> list[np.ndarray]:
    from tlbuild.data.synth import synth_defects

    with tempfile.TemporaryDirectory() as tmp:
        synth_defects(Path(tmp), per_class=n // 4, size=640, seed=12345)
        return [
            np.asarray(Image.open(p).convert("RGB"))[80:560]
            for p in sorted(Path(tmp).rglob("*.jpg"))
        ]


def _line(label: str, row: tuple[float, float, int]) -> None:
    print(f"{label:44s} {row[0]:>10.4%} {row[1]:>9.4%} {row[2]:>4d}")


def main() -> None:
    print(f"{'images':44s} {'identical':>10s} {'>1 level':>9s} {'max':>4s}")
    shots = photos()
    for interp in ("bicubic", "bilinear"):
        for mode in ("resize", "center_crop"):
            spec = Preprocessing((160, 160), interp, MEAN, STD, mode, 0.875)  # type: ignore[arg-type]
            _line(f"60 photo crops, {interp}, {mode}", compare(shots, spec))
    textures = datasets.build("textures", ROOT / "data" / "bench-accuracy")
    patches = [
        np.asarray(Image.open(p).convert("RGB")) for p in sorted(textures.rglob("*.png"))[:200]
    ]
    spec = Preprocessing((128, 128), "bicubic", MEAN, STD, "resize", 0.875)
    _line("200 textures 32 px to 128, bicubic", compare(patches, spec))
    spec = Preprocessing((160, 160), "bicubic", MEAN, STD, "resize", 0.875)
    _line("40 frames 640x480 to 160, bicubic", compare(frames(), spec))


if __name__ == "__main__":
    main()
