"""How far apart pHashes of distinct images and of copies are: the data.near_duplicate_distance
default.

    python benchmarks/duplicates_threshold.py            # demo 4 x 1,000 + the accuracy suite
    python benchmarks/duplicates_threshold.py --per-class 150

Hashes come from the decode the dataset scan makes (JPEG at reduced scale), as in a build.
Prints, per set, the pairs of distinct images within 0..10 bits (false near duplicates) and, for
copies of a sample of images (resized, re-encoded, brightened, cropped, ...), the share found at
each threshold. "same surface, other defect" pairs the demo's background with and without a
defect drawn on it: different images a fixed camera would also take.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).parent / "accuracy"))

import datasets  # noqa: E402
from run import DATA_ROOT  # noqa: E402

from tlbuild.data import synth  # noqa: E402
from tlbuild.data.duplicates import phash, popcount  # noqa: E402
from tlbuild.data.images import decode  # noqa: E402

THRESHOLDS = range(0, 11)
SCAN_DRAFT = (64, 64)  # what scan.find_unreadable decodes at


def _hash_bytes(data: bytes) -> int:
    return phash(decode("copy", lambda w, h: SCAN_DRAFT, data=data).image)


def _hash_file(path: Path) -> int:
    return phash(decode(path, lambda w, h: SCAN_DRAFT).image)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _crop(img: Image.Image, share: float) -> Image.Image:
    dx, dy = round(img.width * share / 2), round(img.height * share / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


# A copy someone could make of a file, as bytes in the format it would be saved in.
COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "re-encoded JPEG q=75": lambda im: _encode(im, "JPEG", quality=75),
    "re-encoded JPEG q=40": lambda im: _encode(im, "JPEG", quality=40),
    "saved as PNG": lambda im: _encode(im, "PNG"),
    "resized to 50%": lambda im: _encode(im.resize((im.width // 2, im.height // 2)), "JPEG"),
    "resized to 200%": lambda im: _encode(im.resize((im.width * 2, im.height * 2)), "JPEG"),
    "brightened 10%": lambda im: _encode(ImageEnhance.Brightness(im).enhance(1.1), "JPEG"),
    "brightened 25%": lambda im: _encode(ImageEnhance.Brightness(im).enhance(1.25), "JPEG"),
    "contrast +20%": lambda im: _encode(ImageEnhance.Contrast(im).enhance(1.2), "JPEG"),
    "blurred (radius 1)": lambda im: _encode(im.filter(ImageFilter.GaussianBlur(1)), "JPEG"),
    "cropped 5% off": lambda im: _encode(_crop(im, 0.05), "JPEG"),
    "cropped 10% off": lambda im: _encode(_crop(im, 0.10), "JPEG"),
    "mirrored": lambda im: _encode(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"),
}


def _distinct_pairs(hashes: np.ndarray) -> np.ndarray:
    """Pairs of the set per distance 0..64 (all pairs: these sets are small)."""
    d = popcount(hashes[:, None] ^ hashes[None, :])
    return np.bincount(d[np.triu_indices(len(hashes), 1)], minlength=65)


def _row(name: str, n: int, hist: np.ndarray) -> str:
    cum = np.cumsum(hist)
    cells = " ".join(f"{cum[t]:>6}" for t in THRESHOLDS)
    return f"{name:<34} {n:>6} {cells}"


def _surface_pairs(per_class: int, size: int) -> list[int]:
    """Distance between the same rendered surface without and with each defect."""
    out = []
    for i in range(per_class):
        for ci in range(1, len(synth.CLASSES)):
            imgs = []
            for defect in (None, synth._DEFECTS[synth.CLASSES[ci]]):
                bg = np.random.default_rng([0, 1000, i])
                z = float(np.exp(bg.uniform(np.log(0.75), np.log(1.35))))
                img = synth._background(bg, size, z)
                synth._benign(bg, img, size)
                if defect is not None:
                    defect(np.random.default_rng([0, ci, i]), img, size, z)
                rgb = Image.fromarray(synth._camera(bg, img, size), "RGB")
                imgs.append(_hash_bytes(_encode(rgb, "JPEG", quality=92)))
            out.append(bin(imgs[0] ^ imgs[1]).count("1"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=1000, help="demo images per class")
    ap.add_argument("--sample", type=int, default=200, help="images copied per set")
    args = ap.parse_args()

    sets: dict[str, list[Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        synth.synth_defects(demo, per_class=args.per_class, size=160, seed=7)
        sets[f"demo, 160 px ({args.per_class}/class)"] = sorted(demo.rglob("*.jpg"))
        for name in ("faces", "textures", "scenes"):
            folder = datasets.build(name, DATA_ROOT)
            sets[f"{name} (suite)"] = sorted(folder.rglob("*.png"))

        header = f"{'pairs within t bits, distinct images':<34} {'images':>6} " + " ".join(
            f"{'t=' + str(t):>6}" for t in THRESHOLDS
        )
        print(header)
        # Copies of the demo's 160 px photographs apart from the suite's 25-40 px patches,
        # which leave pHash's 32 px thumbnail little to work with.
        copies: dict[str, dict[str, list[int]]] = {"demo": {}, "suite": {}}
        for name, files in sets.items():
            hashes = np.array([_hash_file(p) for p in files], np.uint64)
            print(_row(name, len(files), _distinct_pairs(hashes)), flush=True)
            rng = np.random.default_rng(0)
            group = copies["demo" if name.startswith("demo") else "suite"]
            for i in rng.choice(len(files), min(args.sample, len(files)), replace=False):
                with Image.open(files[i]) as im:
                    rgb = im.convert("RGB")
                for label, make in COPIES.items():
                    d = bin(int(hashes[i]) ^ _hash_bytes(make(rgb))).count("1")
                    group.setdefault(label, []).append(d)
        surface = _surface_pairs(min(args.per_class, 100), 160)
        print("  (faces: distinct photographs; textures/scenes: random crops of six or five")
        print("   photographs each, so overlapping crops, true near duplicates, exist there)")

    for group, found in copies.items():
        print()
        print(
            f"{'copies found at t, ' + group:<34} {'median':>6} "
            + " ".join(f"{'t=' + str(t):>6}" for t in THRESHOLDS)
        )
        rows = list(found.items())
        if group == "demo":
            rows.append(("same surface, other defect", surface))
        for label, dists in rows:
            d = np.array(dists)
            cells = " ".join(f"{(d <= t).mean():>6.0%}" for t in THRESHOLDS)
            print(f"{label:<34} {np.median(d):>6.0f} {cells}")


if __name__ == "__main__":
    main()
