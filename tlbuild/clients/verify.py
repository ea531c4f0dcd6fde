"""`tlbuild verify-client RESULTS.csv`: a client's outputs on the conformance kit against
tlbuild's, row by row, naming the first step that differs (decode, resize, normalise, model)."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlbuild.artifacts import is_image_model
from tlbuild.clients.kit import DECODE_MISTAKES, KIT_FORMAT, KIT_JSON
from tlbuild.errors import UsageError
from tlbuild.fileio import NotRegularFileError, open_regular, plain_name
from tlbuild.runtime.base import softmax


@dataclass
class RowVerdict:
    """One CSV row: which kit image and artifact, the step that differs (None: conforms)."""

    line: int
    image: str
    artifact: str
    step: str | None = None
    why: str = ""
    checked: list[str] = field(default_factory=list)  # the steps compared

    @property
    def ok(self) -> bool:
        """Whether the row conforms: its answers were compared, and nothing differed."""
        return self.step is None and "model" in self.checked


@dataclass
class Report:
    """Every row's verdict, and the kit rows no result covered."""

    rows: list[RowVerdict]
    unchecked: list[str]  # "image on artifact" the CSV's artifacts have but it has no row for

    @property
    def ok(self) -> bool:
        """Whether every row conforms and none is missing: a client that skips a file it
        cannot read has not passed on it."""
        return all(r.ok for r in self.rows) and not self.unchecked


def read_kit(kit: Path) -> dict[str, Any]:
    """kit.json of a conformance kit folder (or an export folder holding one)."""
    for folder in (kit, kit / "conformance"):
        if (folder / KIT_JSON).is_file():
            try:
                data = json.loads((folder / KIT_JSON).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read {folder / KIT_JSON}: {e}") from None
            _check_kit(data, folder / KIT_JSON)
            data["_folder"] = folder
            return data
    raise UsageError(
        f"no conformance kit at {kit}: name an export folder's conformance/ "
        "(made by `tlbuild run` with clients.kit_images above 0)"
    )


def _check_kit(data: Any, where: Path) -> None:
    """A kit.json tlbuild wrote, or a UsageError saying it is damaged."""
    ok = (
        isinstance(data, dict)
        and data.get("format") == KIT_FORMAT
        and isinstance(data.get("classes"), list)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("artifacts"), list)
        and isinstance(data.get("tolerances"), dict)
        and isinstance(data.get("preprocessing"), dict)
        and all(
            isinstance(r, dict)
            and isinstance(r.get("file"), str)
            and isinstance(r.get("expected"), dict)
            and all(
                len(e.get("probabilities", ())) == len(data["classes"])
                for e in r["expected"].values()
            )
            for r in data["images"]
        )
    )
    if not ok:
        raise UsageError(f"{where} is damaged or not a kit of this tlbuild; rebuild the export")


def _load_pixels(path: Path) -> np.ndarray:
    """A client's pixel dump as uint8; a float or 16-bit dump is a difference in itself."""
    if path.suffix.lower() == ".npy":
        pixels = np.load(path, allow_pickle=False)
        if not isinstance(pixels, np.ndarray):
            raise _Differs(f"{path.name} is not one array; save the pixels with np.save")
    else:
        with Image.open(path) as img:
            if img.mode == "P":  # a palette PNG holds its colours in the palette
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            pixels = np.asarray(img)
    if pixels.dtype != np.uint8:
        raise _Differs(
            f"{path.name} holds {pixels.dtype} values; the pixels at this step are 8-bit (uint8)"
        )
    return pixels


def _load_tensor(path: Path, shape: list[int]) -> np.ndarray:
    if path.suffix.lower() == ".bin":
        want = 4 * math.prod(shape)
        size = path.stat().st_size
        if size != want:
            guess = " (float64?)" if size == 2 * want else ""
            raise _Differs(
                f"{path.name} holds {size} bytes; the input is {want} bytes of float32 "
                f"{tuple(shape)}{guess}"
            )
        return np.fromfile(path, dtype="<f4").reshape(shape)
    tensor = np.load(path, allow_pickle=False)
    if not isinstance(tensor, np.ndarray):
        raise _Differs(f"{path.name} is not one array (an .npz?); save the tensor with np.save")
    return tensor.astype(np.float32)


class _Differs(Exception):
    """This step differs; the message says how."""


def _pixels_step(
    got: np.ndarray, want: np.ndarray, max_levels: int, within_1: float | None = None
) -> None:
    """Compare pixels, saying what a shape or a channel order gets wrong."""
    if got.ndim == 2:
        raise _Differs(f"1 channel {got.shape}: expand greyscale to RGB (3 equal channels)")
    if got.shape != want.shape:
        if got.ndim == 3 and got.shape[2] == 4 and got.shape[:2] == want.shape[:2]:
            raise _Differs("4 channels: composite the alpha on white and keep RGB")
        if got.shape[:2] == want.shape[1::-1]:
            raise _Differs(
                f"{got.shape[1]}x{got.shape[0]} where tlbuild's is {want.shape[1]}x"
                f"{want.shape[0]}: the EXIF orientation was not applied"
            )
        raise _Differs(f"shape {got.shape}, tlbuild's is {want.shape}")
    d = np.abs(got.astype(np.int32) - want.astype(np.int32))
    share_1 = float((d <= 1).mean())
    if d.max() <= max_levels and (within_1 is None or share_1 >= within_1):
        return
    swapped = np.abs(got[..., ::-1].astype(np.int32) - want.astype(np.int32))
    if swapped.max() <= max(max_levels, 1) and swapped.mean() < d.mean():
        raise _Differs("the channels are in BGR order (OpenCV's); tlbuild's are RGB")
    if _turned(got, want, max(max_levels, 1)):
        raise _Differs("turned or mirrored against tlbuild's: the EXIF orientation was not applied")
    raise _Differs(
        f"up to {int(d.max())} grey levels off (mean {d.mean():.2f}); {1 - share_1:.2%} of "
        f"values more than 1 level off (allowed: {max_levels} levels"
        + (f", {1 - within_1:.0%} of values past 1 level)" if within_1 is not None else ")")
    )


def _turned(got: np.ndarray, want: np.ndarray, levels: int) -> bool:
    """Whether `got` is `want` turned by quarter turns or mirrored (a square image's EXIF)."""
    for k in range(4):
        turned = [np.rot90(want[:, ::-1], k)] + ([np.rot90(want, k)] if k else [])
        for image in turned:
            same_shape = image.shape == got.shape
            if same_shape and np.abs(image.astype(np.int32) - got.astype(np.int32)).max() <= levels:
                return True
    return False


def _tensor_step(got: np.ndarray, want: np.ndarray, spec: dict[str, Any], tol: float) -> None:
    if got.ndim == 3:
        got = got[None]
    if got.shape != want.shape:
        if got.shape == (want.shape[0], want.shape[2], want.shape[3], want.shape[1]):
            raise _Differs(f"layout NHWC {got.shape}; the model takes NCHW {want.shape}")
        raise _Differs(f"shape {got.shape}, the model takes {want.shape}")
    d = np.abs(got - want)
    if float(d.max()) <= tol:
        return
    mean = np.asarray(spec["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, 3, 1, 1)
    pixels = want * std + mean  # 0..1
    for why, other in (
        ("not normalised by mean and std (pixels / 255 only)", pixels),
        ("not scaled to 0..1 before mean and std (pixels 0..255)", (pixels * 255 - mean) / std),
        ("the channels are in BGR order", want[:, ::-1]),
    ):
        if float(np.abs(got - other).max()) <= max(tol, 1e-3):
            raise _Differs(why)
    raise _Differs(f"up to {float(d.max()):.3g} off (mean {float(d.mean()):.3g}; allowed {tol:g})")


def _model_step(
    row: dict[str, str], expected: dict[str, Any], kit: dict[str, Any], mistakes: dict[str, Any]
) -> None:
    want = np.asarray(expected["probabilities"], np.float32)
    tol = float(kit["tolerances"]["probability_max_abs"])
    if (row.get("logits") or "").strip():
        with np.errstate(all="ignore"):  # overflowing logits are judged below, not warned of
            probs = softmax(_floats(row["logits"], "logits")[None])[0]
    elif (row.get("probabilities") or "").strip():
        probs = _floats(row["probabilities"], "probabilities")
    else:
        raise _Differs("the row has neither logits nor probabilities")
    if probs.shape != want.shape:
        raise _Differs(f"{probs.size} scores, the model has {want.size} classes")
    if not np.isfinite(probs).all():
        raise _Differs("its scores are not all finite numbers (NaN or infinite)")
    classes = kit["classes"]
    label = classes[int(probs.argmax())]
    given = (row.get("label") or "").strip()
    diff = float(np.abs(probs - want).max())
    problems = []
    if label != expected["label"]:
        problems.append(f"answers {label} where tlbuild answers {expected['label']}")
    if given and given != label:
        problems.append(f"its label column says {given} but its scores' top class is {label}")
    problems += _decision_problems(row, probs, expected, kit.get("rule") or {}, classes)
    if not diff <= tol:
        problems.append(f"a probability {diff:.3g} off (allowed {tol:g})")
    if not problems:
        return
    guess = _nearest_mistake(probs, want, mistakes)
    raise _Differs(
        "; ".join(problems) + (f"; its scores match a client with {guess}" if guess else "")
    )


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _decision_problems(
    row: dict[str, str],
    probs: np.ndarray,
    expected: dict[str, Any],
    rule: dict[str, Any],
    classes: list[str],
) -> list[str]:
    """The ok/defective decision the client's scores make under the kit's rule (and the one its
    `defective` column states), against tlbuild's. An image tlbuild flags as novel is defective
    whatever its scores; the scores alone cannot say so, so only a stated decision is judged."""
    ok_class, want = rule.get("ok_class"), expected.get("defective")
    if ok_class is None or want is None:
        return []
    out = []
    stated = (row.get("defective") or "").strip().lower()
    if stated:
        if stated not in _TRUE + _FALSE:
            raise _Differs(f"its defective column says {stated!r}; write true or false")
        said = stated in _TRUE
        if said != want:
            out.append(f"its defective column says {said}, tlbuild decides {want}")
    if expected.get("novel"):
        return out
    ok = classes.index(ok_class)
    p_ok, threshold = float(probs[ok]), rule.get("threshold")
    decided = p_ok < threshold if threshold is not None else int(probs.argmax()) != ok
    if bool(decided) != want:
        rule_text = f"p({ok_class}) {p_ok:.3f}" + (
            f" against the threshold {threshold:g}" if threshold is not None else ""
        )
        out.append(f"its scores decide defective={bool(decided)} ({rule_text}), tlbuild {want}")
    return out


def _nearest_mistake(probs: np.ndarray, want: np.ndarray, mistakes: dict[str, Any]) -> str:
    """The common mistake whose scores are much nearer the client's than tlbuild's are."""
    right = float(np.abs(probs - want).sum())
    best, name = right, ""
    for why, p in mistakes.items():
        d = float(np.abs(probs - np.asarray(p, np.float32)).sum())
        if d < best:
            best, name = d, why
    return name if name and best < 0.5 * right else ""


def _floats(text: str, column: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.replace(",", " ").replace(";", " ").split()]
    except ValueError:
        raise _Differs(f"column {column}: {text[:60]!r} is not a list of numbers") from None
    with np.errstate(over="ignore"):
        return np.asarray(values, np.float32)


def _find_image(kit: dict[str, Any], name: str) -> dict[str, Any] | None:
    base = Path(name.strip()).name
    return next((r for r in kit["images"] if Path(r["file"]).name == base), None)


def verify(results: Path, kit_path: Path) -> Report:
    """Check every row of `results` (CSV) against the kit; a UsageError for a malformed file."""
    kit = read_kit(kit_path)
    folder: Path = kit["_folder"]
    try:
        # utf-8-sig: C#'s Encoding.UTF8 and Excel start the file with a byte-order mark.
        # Only a regular file: a named pipe given as the results must not hang the check.
        with io.TextIOWrapper(open_regular(results), encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows, lines = [], []
            for row in reader:  # the file's line, blank lines and quoted newlines counted
                rows.append(row)
                lines.append(reader.line_num)
    except FileNotFoundError:
        raise UsageError(f"no results file at {results}") from None
    except NotRegularFileError as e:
        raise UsageError(f"{results}: {e.reason}; name the CSV file itself") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"cannot read {results}: {e}") from None
    if not rows:
        raise UsageError(f"{results} has no rows; see {folder / 'README.md'} for its columns")
    missing = {"image", "artifact"} - set(rows[0])
    if missing or not ({"logits", "probabilities"} & set(rows[0])):
        raise UsageError(
            f"{results} needs columns image, artifact and logits (or probabilities); it has "
            f"{', '.join(str(c) for c in rows[0]) or 'none'}"
        )
    verdicts = []
    seen: set[tuple[str, str]] = set()
    for line, row in zip(lines, rows, strict=True):
        v = _verify_row(line, row, kit, folder, results.parent)
        verdicts.append(v)
        seen.add((v.image, v.artifact))
    artifacts = sorted({v.artifact for v in verdicts} & set(kit["artifacts"]))
    unchecked = [
        f"{Path(r['file']).name} on {a}"
        for a in artifacts
        for r in kit["images"]
        if (Path(r["file"]).name, a) not in seen
    ]
    return Report(verdicts, unchecked)


def _verify_row(
    line: int, row: dict[str, str], kit: dict[str, Any], folder: Path, base: Path
) -> RowVerdict:
    # A Windows client writes backslashes (Path.Combine): the same paths.
    image = (row.get("image") or "").strip().replace("\\", "/")
    artifact = (row.get("artifact") or "").strip()
    v = RowVerdict(line, Path(image).name, artifact)
    record = _find_image(kit, image)
    if record is None:
        v.step, v.why = "input", f"{image!r} is not an image of the kit"
        return v
    expected = record["expected"].get(artifact)
    if expected is None:
        v.step = "input"
        v.why = f"{artifact!r} is not in the kit; it has {', '.join(kit['artifacts'])}"
        return v
    tol = kit["tolerances"]
    lossy = record.get("format") == "lossy"
    decode_levels = tol["decode_lossy_max_levels"] if lossy else tol["decode_lossless_max_levels"]
    mistakes = record.get("mistakes") or {}
    if is_image_model(artifact):  # it only decodes: a resize or normalisation is not its own
        mistakes = {k: p for k, p in mistakes.items() if k in DECODE_MISTAKES}

    def dump(column: str) -> Path | None:
        text = (row.get(column) or "").strip().replace("\\", "/")
        if not text:
            return None
        path = Path(text) if Path(text).is_absolute() else base / text
        if not path.is_file():
            raise _Differs(f"its {column} file {path} is not there")
        return path

    spec = kit["preprocessing"]
    try:
        v.step = "decode"
        decoded = None
        if path := dump("decoded"):
            decoded = _load_pixels(path)
            _pixels_step(decoded, _kit_pixels(folder, record, "decoded"), decode_levels)
            v.checked.append("decode")
        # Each step is judged on the client's own pixels from the step before, where it
        # dumped them: a decode within tolerance must not fail the resize.
        v.step = "resize"
        resized = None
        if path := dump("resized"):
            want = (
                _kit_pixels(folder, record, "resized")
                if decoded is None
                else _resized(decoded, spec)
            )
            resized = _load_pixels(path)
            _pixels_step(resized, want, tol["resize_max_levels"], tol["resize_within_1_level"])
            v.checked.append("resize")
        v.step = "normalise"
        if path := dump("input"):
            if resized is None:
                resized = (
                    _kit_pixels(folder, record, "resized")
                    if decoded is None
                    else _resized(decoded, spec)
                )
            got = _load_tensor(path, record["input"]["shape"])
            _tensor_step(got, _normalised(resized, spec), spec, tol["tensor_max_abs"])
            v.checked.append("normalise")
        v.step = "model"
        _model_step(row, expected, kit, mistakes)
        v.checked.append("model")
        v.step = None
    except _Differs as e:
        v.why = str(e)
    except UsageError:  # the kit itself: not the client's to answer for
        raise
    except Exception as e:  # a dump no reader could use: this row's difference, said
        v.why = f"cannot read its dump ({type(e).__name__}: {e})"
    return v


def _resized(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """tlbuild's resize (and crop) of decoded RGB pixels."""
    from tlbuild.data.preprocess import Preprocessing, resize_for_model

    return np.asarray(resize_for_model(Image.fromarray(pixels), Preprocessing.from_dict(spec)))


def _normalised(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """tlbuild's tensor for RGB pixels of the input size (its own fused form)."""
    from tlbuild.data.preprocess import Preprocessing, normalize

    return normalize(Image.fromarray(pixels), Preprocessing.from_dict(spec))[None]


def _kit_pixels(folder: Path, record: dict[str, Any], step: str) -> np.ndarray:
    name = str(record[step]["file"])
    if not all(plain_name(part) for part in name.split("/")):  # an edited kit.json
        raise UsageError(f"{folder / KIT_JSON} names {name!r}, not a file of the kit")
    with Image.open(folder / name) as img:
        return np.asarray(img.convert("RGB"))
