"""Real-image data sets for the accuracy suite, built offline from images installed packages ship.

Each set is written as `train/<class>/*.png` and `val/<class>/*.png`. Where patches are cut
from a few large photographs, training and validation patches come from disjoint regions of
each photograph (training from the top 70% of its rows, validation from the bottom 30%), so
no validation pixel was ever seen in training: the score measures generalisation, not recall
of overlapping crops. Every set is deterministic under its seed.

Sources (all real photographs or scans, none generated):
- textures: scikit-image's `brick`, `grass`, `gravel` (greyscale surface photographs, 512 px),
  `cell` (a microscope image) and `moon` (the lunar surface): "which surface is this", 32 px
  patches with exposure drift and sensor noise.
- scenes: scikit-image's colour photographs `astronaut`, `coffee`, `chelsea`, `rocket`,
  `retina` and `hubble_deep_field`: small colour patches, "which scene is this patch from",
  like set B's small colour images.
- faces: scikit-image's `lfw_subset` (100 greyscale 25 px crops of faces from Labeled Faces in
  the Wild and 100 non-face crops of natural images), degraded as a poor camera would (lower
  resolution, exposure drift, noise), split seeded 75/25.
- demo: tlbuild's own synthetic surface-defect set (`tlbuild data synth-defects`), for reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_ROWS = 0.7  # share of each photograph's rows that training patches come from


def _skimage_image(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def _patches(
    img: np.ndarray,
    n: int,
    rows: tuple[float, float],
    size: int,
    window: tuple[int, int],
    rng: np.random.Generator,
) -> list[Image.Image]:
    """`n` square crops of random side in `window`, inside the row band, resized to `size`."""
    h, w = img.shape[:2]
    r0, r1 = int(rows[0] * h), int(rows[1] * h)
    out = []
    for _ in range(n):
        side = int(rng.integers(window[0], min(window[1], r1 - r0, w) + 1))
        y = int(rng.integers(r0, r1 - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side])
        crop = crop.rotate(90 * int(rng.integers(4)))  # surfaces have no up
        out.append(_camera(crop.resize((size, size), Image.Resampling.BICUBIC), rng))
    return out


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a line camera adds: exposure, contrast and gamma drift, sensor noise."""
    x = np.asarray(img, np.float32) / 255.0
    x = (x - x.mean()) * rng.uniform(0.6, 1.4) + x.mean() + rng.uniform(-0.15, 0.15)
    x = np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
    x = x + rng.normal(0, rng.uniform(0.0, 0.06), x.shape)
    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))


def _patch_set(
    out: Path,
    sources: dict[str, str],
    per_class: tuple[int, int],
    size: int,
    window: tuple[int, int],
    seed: int,
) -> None:
    for ci, (cls, name) in enumerate(sorted(sources.items())):
        img = _skimage_image(name)
        for si, (split, rows) in enumerate(
            (("train", (0.0, TRAIN_ROWS)), ("val", (TRAIN_ROWS, 1.0)))
        ):
            rng = np.random.default_rng([seed, ci, si])
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, patch in enumerate(_patches(img, per_class[si], rows, size, window, rng)):
                patch.save(folder / f"{cls}_{i:04d}.png")


def textures(out: Path, per_class: tuple[int, int] = (100, 40), seed: int = 0) -> None:
    """5 greyscale surface classes, 32 px patches of 16-64 px windows, camera drift."""
    sources = {
        "brick": "brick",
        "cells": "cell",
        "grass": "grass",
        "gravel": "gravel",
        "moon": "moon",
    }
    _patch_set(out, sources, per_class, 32, (16, 64), seed)


def scenes(out: Path, per_class: tuple[int, int] = (100, 40), seed: int = 0) -> None:
    """6 colour scene classes, 40 px patches of 16-96 px windows, camera drift."""
    sources = {
        "astronaut": "astronaut",
        "cat": "chelsea",
        "coffee": "coffee",
        "hubble": "hubble_deep_field",
        "retina": "retina",
        "rocket": "rocket",
    }
    _patch_set(out, sources, per_class, 40, (16, 96), seed)


def faces(out: Path, seed: int = 0) -> None:
    """Face / not-face, 25 px greyscale (scikit-image's LFW subset: 100 of each), each seen by
    a poor camera: resolution down to 10-25 px, exposure and contrast drift, sensor noise."""
    import skimage.data

    images = np.asarray(skimage.data.lfw_subset())
    labels = ["face"] * 100 + ["other"] * 100
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    for rank, i in enumerate(order):
        split = "val" if rank % 4 == 0 else "train"
        folder = out / split / labels[i]
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((images[i] * 255).round().astype(np.uint8))
        low = int(rng.integers(10, 26))
        img = img.resize((low, low), Image.Resampling.BOX).resize(
            (25, 25), Image.Resampling.BILINEAR
        )
        _camera(img, rng).save(folder / f"{i:03d}.png")


def demo(out: Path, per_class: int = 120, seed: int = 0) -> None:
    """tlbuild's synthetic defect set, 160 px, split 80/20 into train/ and val/."""
    import shutil

    from tlbuild.data.synth import synth_defects

    tmp = out / "_all"
    synth_defects(tmp, per_class=per_class, size=160, seed=seed)
    for cls_dir in sorted(tmp.iterdir()):
        files = sorted(cls_dir.iterdir())
        for i, f in enumerate(files):
            split = "val" if i % 5 == 0 else "train"
            (out / split / cls_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), out / split / cls_dir.name / f.name)
    shutil.rmtree(tmp)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "textures": textures,
    "scenes": scenes,
    "faces": faces,
    "demo": demo,
}


def build(name: str, root: Path) -> Path:
    """The set's folder under `root`, built if it is not there yet (a marker file says done)."""
    folder = root / name
    if not (folder / ".complete").is_file():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        BUILDERS[name](folder)
        (folder / ".complete").write_text("ok\n")
    return folder


def default_recipe(name: str, data: Path, work: Path, size: int | str) -> str:
    """A recipe naming only a built set's data folders and the input size: what a new user
    writes, and what the suite's benchmarks train with."""
    size_toml = json.dumps(size) if size == "auto" else size
    return f"""
name = "{name}"
output_dir = "{work}"
[data]
train = "{data / "train"}"
val = "{data / "val"}"
[model]
preprocess = {{ input_size = {size_toml}, resize = "resize" }}
"""
