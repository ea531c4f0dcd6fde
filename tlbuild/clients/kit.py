"""The conformance kit: real validation images as files, what tlbuild makes of each at every step
(decoded pixels, resized pixels, the input tensor) and what each shipped artifact answers, with
the tolerances `tlbuild verify-client` holds a client to.

Beside the validation images as they are, the kit carries files made from them for the decode
steps a data set rarely exercises: an EXIF-rotated JPEG, a PNG with alpha, a 16-bit PNG and an
enlarged JPEG. It also records model.onnx's answers under the mistakes clients commonly make
(BGR order, EXIF ignored, alpha dropped, a resize without antialiasing, no normalisation), so
logits alone can say which step went wrong.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlbuild.artifacts import CONFORMANCE, SCRATCH, is_image_model
from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, normalize, resize_for_model, resized_size
from tlbuild.data.scan import Sample
from tlbuild.fileio import sha256_file, write_json, write_text
from tlbuild.runtime.base import Predictor, softmax

KIT_JSON = "kit.json"
KIT_FORMAT = "tlbuild.conformance/1"
KIT_FOLDERS = ("images", "decoded", "resized", "input")
LOSSY = (".jpg", ".jpeg", ".webp")
STEPS = ("decode", "resize", "normalise", "model")

# What a client may differ by, step by step. Decoding: a PNG is lossless, so exact; a JPEG
# decoder may round the colour conversion differently (OpenCV 5.1 and Pillow 11 gave identical
# pixels on the demo's 200 JPEGs), so 2 grey levels. The resize: ONNX Resize in the image models
# matched Pillow exactly on 98.3-99.99% of pixels and within 1 level on all but 0.0013% (max 5),
# so a client resize is held to 1 level on 99% of pixels. The tensor: float rounding. The model: the
# answer must be the same; the probability within 0.02 (what the image models measured at most
# against model.onnx on photographs, 300 crops).
TOLERANCES: dict[str, Any] = {
    "decode_lossless_max_levels": 0,
    "decode_lossy_max_levels": 2,
    "resize_within_1_level": 0.99,
    "resize_max_levels": 8,
    "tensor_max_abs": 1e-4,
    "probability_max_abs": 0.02,
    "same_label": True,
    "same_decision": True,
}


@dataclass(frozen=True)
class KitFile:
    """One file of the kit: its name, the validation image it comes from, and why it is in."""

    name: str
    source: Sample
    exercises: str  # what it tests, in a few words
    write: Callable[[Path], None]


def _copy(src: Path) -> Callable[[Path], None]:
    return lambda dst: shutil.copyfile(src, dst)


def _exif_rotated(src: Path) -> Callable[[Path], None]:
    """Stored turned a quarter left with orientation 6 (turn right to view): upright, it is the
    validation image again."""

    def write(dst: Path) -> None:
        img = load_rgb(src).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(dst, "JPEG", quality=92, exif=exif.tobytes())

    return write


def _alpha(src: Path) -> Callable[[Path], None]:
    """RGBA: a transparent border and a half-transparent band, the colours under them kept, so
    a client that drops alpha instead of compositing on white sees other pixels."""

    def write(dst: Path) -> None:
        rgb = np.asarray(load_rgb(src))
        h, w = rgb.shape[:2]
        a = np.full((h, w), 255, np.uint8)
        a[:, : max(1, w // 4)] = 128
        b = max(1, min(h, w) // 10)
        a[:b], a[-b:], a[:, :b], a[:, -b:] = 0, 0, 0, 0
        Image.fromarray(np.dstack([rgb, a]), "RGBA").save(dst, "PNG")

    return write


def _gray16(src: Path) -> Callable[[Path], None]:
    """16-bit greyscale with real low bytes (luminance in float, scaled to 0..65535), so a
    client that takes the high byte instead of value / 257 rounds some pixels the other way."""

    def write(dst: Path) -> None:
        rgb = np.asarray(load_rgb(src), np.float64)
        lum = rgb @ np.array([0.299, 0.587, 0.114]) / 255.0
        v = np.clip(np.round(lum * 65535.0), 0, 65535).astype(np.uint16)
        Image.fromarray(v).save(dst, "PNG")

    return write


def _larger_jpeg(src: Path) -> Callable[[Path], None]:
    """Enlarged 2.6x and re-encoded (4:2:0): a JPEG the resize step shrinks, whatever the
    data's own size."""

    def write(dst: Path) -> None:
        img = load_rgb(src)
        big = img.resize(
            (round(img.width * 2.6), round(img.height * 2.6)), Image.Resampling.BICUBIC
        )
        big.save(dst, "JPEG", quality=90, subsampling=2)

    return write


def kit_files(samples: Sequence[Sample], n: int) -> list[KitFile]:
    """`n` validation images as they are (every class, evenly spaced), then the four made ones
    (from the first few of them)."""
    from tlbuild.data.splits_file import evenly_spaced

    picked = evenly_spaced(list(samples), n)
    if not picked:
        return []
    files = [
        KitFile(
            f"{i:02d}_{_safe(s.path.stem)}{_safe(s.path.suffix.lower())}",
            s,
            "as shipped",
            _copy(s.path),
        )
        for i, s in enumerate(picked, 1)
    ]
    made = (
        ("exif_rotated.jpg", "EXIF orientation 6", _exif_rotated),
        ("alpha.png", "alpha: composite on white", _alpha),
        ("gray16.png", "16-bit greyscale: value / 257, rounded", _gray16),
        ("larger.jpg", "a JPEG (4:2:0) the resize shrinks", _larger_jpeg),
    )
    for j, (name, why, make) in enumerate(made):
        s = picked[j % len(picked)]
        files.append(KitFile(f"{len(files) + 1:02d}_{name}", s, why, make(s.path)))
    return files


def _safe(text: str) -> str:
    """ASCII letters, digits, '.', '_' and '-' only: a kit file name any client can open."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:40]


def _png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels, "RGB").save(path, "PNG")


def _bilinear_no_antialias(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR: half-pixel centres, two taps, no widening when shrinking."""

    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), x - lo

    y0, y1, fy = taps(rgb.shape[0], h)
    x0, x1, fx = taps(rgb.shape[1], w)
    f = rgb.astype(np.float64)
    rows = f[y0] * (1 - fy)[:, None, None] + f[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# The mistakes a client that only decodes (an image model's) can make; the others are in the
# resize and normalisation a client of model.onnx does itself.
DECODE_MISTAKES = (
    "BGR channel order (OpenCV's)",
    "EXIF orientation not applied",
    "alpha dropped, not composited on white",
)


def mistakes(path: Path, spec: Preprocessing) -> dict[str, np.ndarray]:
    """model.onnx's input tensor for `path` under each common client mistake (those that change
    anything for this file)."""
    h, w = spec.input_size
    right = np.asarray(load_rgb(path))
    with Image.open(path) as raw:
        raw.load()
        turned = raw.getexif().get(0x0112, 1) not in (None, 1)
        alpha = raw.mode in ("RGBA", "LA", "PA") or "transparency" in raw.info
        stored = None if raw.mode.startswith("I") else raw.convert("RGB")
    out: dict[str, np.ndarray] = {}

    def tensor(rgb: np.ndarray) -> np.ndarray:
        return normalize(resize_for_model(Image.fromarray(rgb), spec), spec)

    out[DECODE_MISTAKES[0]] = tensor(right[..., ::-1].copy())
    if stored is not None and turned:
        out[DECODE_MISTAKES[1]] = tensor(np.asarray(stored))
    elif stored is not None and alpha:
        out[DECODE_MISTAKES[2]] = tensor(np.asarray(stored))
    # Stretched to the size the recipe resizes to, then cut as resize_for_model cuts.
    new_w, new_h = resized_size(right.shape[1], right.shape[0], spec)
    stretched = _bilinear_no_antialias(right, new_h, new_w)
    top, left = (new_h - h) // 2, (new_w - w) // 2
    resized = np.ascontiguousarray(stretched[top : top + h, left : left + w])
    out["resize without antialiasing (cv2.resize INTER_LINEAR)"] = normalize(
        Image.fromarray(resized), spec
    )
    pixels = np.asarray(resize_for_model(Image.fromarray(right), spec), np.float32)
    out["no mean/std normalisation (pixels / 255)"] = pixels.transpose(2, 0, 1) / 255.0
    out["no scaling (pixels 0..255, normalised)"] = (
        pixels.transpose(2, 0, 1) - np.asarray(spec.mean, np.float32).reshape(3, 1, 1)
    ) / np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    return {k: v.astype(np.float32) for k, v in out.items()}


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


def make_kit(
    out: Path,
    spec: Preprocessing,
    samples: Sequence[Sample],
    n: int,
    classes: list[str],
    artifacts: dict[str, Predictor],
    decide: Callable[[np.ndarray, np.ndarray | None], dict[str, list[Any]]],
    rule: dict[str, Any],
) -> dict[str, Any]:
    """Write out/conformance/ (built beside it, renamed into place) and return its record.

    `artifacts`: each shipped ONNX artifact, open; `decide`: tlbuild classify's decision columns
    for logits and features, as its defaults give them; `rule`: its ok class and threshold."""
    final = out / CONFORMANCE
    files = kit_files(samples, n)
    # Made in .scratch/ (which the next build removes if this one is killed) and renamed in.
    (out / SCRATCH).mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{CONFORMANCE}-", dir=out / SCRATCH))
    try:
        for sub in KIT_FOLDERS:
            (tmp / sub).mkdir()
        images = [_kit_image(tmp, f, spec, classes, artifacts, decide) for f in files]
        reference = artifacts.get("model.onnx")
        kit = {
            "format": KIT_FORMAT,
            "classes": classes,
            "preprocessing": spec.to_dict(),
            "steps": list(STEPS),
            "tolerances": TOLERANCES,
            "artifacts": sorted(artifacts),
            "rule": rule,
            "images": images,
            "mistakes_from": None if reference is None else "model.onnx",
        }
        write_json(tmp / KIT_JSON, kit)
        write_text(tmp / "README.md", readme(kit))
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "folder": CONFORMANCE,
        "images": len(images),
        "artifacts": sorted(artifacts),
        "kit_sha256": sha256_file(final / KIT_JSON),
    }


def _swap_in(new: Path, final: Path) -> None:
    """Put the finished kit in place of an earlier one: two renames, the old one removed last
    (between them the folder is briefly absent; a build killed then makes it again)."""
    old = new.with_name(new.name + "-old")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _kit_image(
    tmp: Path,
    f: KitFile,
    spec: Preprocessing,
    classes: list[str],
    artifacts: dict[str, Predictor],
    decide: Callable[[np.ndarray, np.ndarray | None], dict[str, list[Any]]],
) -> dict[str, Any]:
    path = tmp / "images" / f.name
    f.write(path)
    stem = Path(f.name).stem
    decoded = np.asarray(load_rgb(path))
    resized = np.asarray(resize_for_model(Image.fromarray(decoded), spec))
    tensor = normalize(Image.fromarray(resized), spec)[None]
    _png(tmp / "decoded" / f"{stem}.png", decoded)
    _png(tmp / "resized" / f"{stem}.png", resized)
    buf = io.BytesIO()
    np.save(buf, tensor)
    (tmp / "input" / f"{stem}.npy").write_bytes(buf.getvalue())
    expected: dict[str, Any] = {}
    for name, p in sorted(artifacts.items()):
        x = decoded[None] if is_image_model(name) else tensor
        logits, features = p.logits_and_features(x)
        cols = decide(logits, features)
        expected[name] = {
            "logits": _rounded(logits[0]),
            "probabilities": _rounded(softmax(logits)[0]),
            **{k: v[0] for k, v in cols.items() if k in _DECISION_COLUMNS},
        }
    record: dict[str, Any] = {
        "file": f"images/{f.name}",
        "exercises": f.exercises,
        "made_from": f"validation image {f.source.path.name} ({classes[f.source.label]})",
        "true_label": classes[f.source.label],
        # Lossy formats may decode a level apart in another library; lossless ones may not.
        "format": "lossy" if f.name.lower().endswith(LOSSY) else "lossless",
        "decoded": {"file": f"decoded/{stem}.png", "shape": list(decoded.shape)},
        "resized": {"file": f"resized/{stem}.png", "shape": list(resized.shape)},
        "input": {"file": f"input/{stem}.npy", "shape": list(tensor.shape)},
        "expected": expected,
    }
    reference = artifacts.get("model.onnx")
    if reference is not None:
        record["mistakes"] = {
            why: _rounded(softmax(reference.logits(t[None]))[0])
            for why, t in mistakes(path, spec).items()
        }
    return record


_DECISION_COLUMNS = ("label", "score", "ok_score", "defective", "decided_by", "novel")


def readme(kit: dict[str, Any]) -> str:
    """The kit's own instructions, with this model's numbers."""
    p = kit["preprocessing"]
    t = kit["tolerances"]
    names = "\n".join(f"- `{a}`" for a in kit["artifacts"])
    return f"""# Conformance kit

Check that your client (C++, C#, Node, a DeepStream pipeline...) gives tlbuild's answers.
Each file under `images/` comes with what tlbuild makes of it at every step:

- decode: `decoded/NAME.png`, upright (EXIF applied) 8-bit RGB; alpha composited on white;
  16-bit divided by 257, rounded.
- resize: `resized/NAME.png`, {p["interpolation"]} ({p["resize"]}) to
  {p["input_size"][1]}x{p["input_size"][0]} with Pillow's antialiased filter.
- normalise: `input/NAME.npy`, float32 NCHW `(1, 3, {p["input_size"][0]}, {p["input_size"][1]})`:
  (pixel / 255 - mean) / std, mean {p["mean"]}, std {p["std"]}.
- model: `kit.json`'s `expected`: logits, probabilities and `tlbuild classify`'s decision for
  each artifact.

The artifacts:
{names}

A `model_image*.onnx` takes the decoded image itself (uint8 RGB NHWC, `[1, height, width, 3]`)
and does the resize and normalisation in the graph: a client only decodes. The others take
`input/NAME.npy`'s tensor.

## Check a client

Run your client on every file under `images/` and write `RESULTS.csv`, one row per image and
artifact:

```
image,artifact,logits,decoded,resized,input
images/01_x.jpg,model_image.onnx,"1.25 -0.5 3.0",dump/01_x.decoded.png,,
```

`logits` (space-separated, in class order {kit["classes"]}) or `probabilities` is required;
`label` may be given too. `decoded`, `resized` and `input` are optional dumps of your pixels
(PNG, or `.npy`) and tensor (`.npy`, or raw little-endian float32 `.bin`), relative to the CSV.
Then:

```
tlbuild verify-client RESULTS.csv --kit conformance/
```

It names, for each image that differs, the first step that differs (decode, resize, normalise,
model) and by how much; without dumps it compares the answers with those of common mistakes
(BGR order, EXIF ignored, alpha dropped, a resize without antialiasing, no normalisation).

Write `RESULTS.csv` and the dumps outside this folder: the next build replaces it whole.
Every (image, artifact) pair of the artifacts your CSV names must have a row.

Tolerances: decoded pixels equal for lossless files (PNG), within
{t["decode_lossy_max_levels"]} grey levels for JPEG (decoders may round the colour conversion
differently); resized pixels within 1 level on {t["resize_within_1_level"]:.0%} of pixels,
compared with the resize of your own decoded pixels where you dumped them; the tensor within
{t["tensor_max_abs"]:g}; the same label and decision (the rule: {_rule_text(kit["rule"])}), and
every probability within {t["probability_max_abs"]:g}.

The expected values are those of a full decode, what `tlbuild classify` does by default (not
with `--no-exact-decode`).
`model.int8.trt.onnx`'s values are ONNX Runtime's with Q/DQ run as written (what TensorRT
computes): ONNX Runtime's CPU provider fuses them into integer kernels and answers otherwise, so
a CPU client runs `model.int8.cpu.onnx` or its twin.
"""


def _rule_text(rule: dict[str, Any]) -> str:
    if rule.get("ok_class") is None:
        return "the top class; no ok class"
    if rule.get("threshold") is None:
        return f"defective when the top class is not {rule['ok_class']}"
    return f"defective when p({rule['ok_class']}) < {rule['threshold']:g}"
