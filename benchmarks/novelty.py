"""Novelty suite: does the build's novelty score flag what a model was not built for?

    python benchmarks/novelty.py                   # demo, textures, scenes, faces
    python benchmarks/novelty.py demo scenes       # some sets
    python benchmarks/novelty.py --work /tmp/nov   # keep the builds there (default: a temp dir)

Offline, from images installed packages ship (benchmarks/accuracy/datasets.py builds the sets).
For each set it builds a model as a new user would (a recipe naming only the data folders and
the input size; stages train, export, quantize, novelty) and scores, with every shipped
artifact and with the other methods measured when the score was chosen:
- validation: the images the threshold was chosen on (false flags);
- camera faults, made from validation images: the build's own probe (dark, overexposed, out of
  focus, noisy, half covered, off centre) and kinds the build never probes (motion blur, low
  contrast, a colour cast, pixelation, a vignette, dropped lines, glare);
- other domains: scikit-image's photographs the set does not use, noise and flat frames, and
  the other sets' validation images;
- near novelty: a second model trained with one class held out, then shown that class's
  validation images: the share flagged, and (where the set has an ok class) the share passed
  as a good part (called ok and not flagged).
It prints AUROC against validation and the share flagged at the build's threshold (at a
threshold chosen the same way for the other methods), each variant's agreement with FP32's
flags, and classify's rows per second with the score and without it (alternated, same run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).parent / "accuracy"))

import datasets  # noqa: E402
from rich.console import Console  # noqa: E402

from tlbuild.artifacts import MODEL_ONNX  # noqa: E402
from tlbuild.data.images import load_rgb  # noqa: E402
from tlbuild.data.preprocess import Preprocessing, preprocess  # noqa: E402
from tlbuild.data.splits_file import read_split  # noqa: E402
from tlbuild.export.feature_graph import split_blocks  # noqa: E402
from tlbuild.manifest import read_manifest  # noqa: E402
from tlbuild.novelty.fit import shipped_variants  # noqa: E402
from tlbuild.novelty.probe import FAULTS  # noqa: E402
from tlbuild.novelty.score import NoveltyModel, conformal_threshold, ledoit_wolf  # noqa: E402
from tlbuild.recipe import load_recipe  # noqa: E402
from tlbuild.runner import call_stage  # noqa: E402

SIZES = {"textures": 128, "scenes": 128, "faces": 128, "demo": 160}
DATA_ROOT = Path(__file__).resolve().parents[1] / "data" / "bench-accuracy"
# The skimage photographs each set is cut from: not "other domains" for that set.
USED = {
    "textures": {"brick", "grass", "gravel", "cell", "moon"},
    "scenes": {"astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field"},
    "faces": set(),
    "demo": set(),
}
PHOTOS = [
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "text",
    "coins",
    "horse",
    "page",
    "clock",
    "immunohistochemistry",
    "hubble_deep_field",
    "moon",
    "brick",
    "grass",
    "gravel",
    "cell",
    "retina",
    "colorwheel",
    "logo",
    "microaneurysms",
    "eagle",
    "cat",
    "skin",
    "kidney",
]
HELD_OUT = {"demo": "scratch", "textures": None, "scenes": None}  # None: the last class
PER_GROUP = 40


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32)


def _img(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def _vignette(img: Image.Image, i: int) -> Image.Image:
    a = _arr(img)
    h, w = a.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((y - h / 2) / (h / 2), (x - w / 2) / (w / 2))
    return _img(a * np.clip(1.2 - r, 0.05, 1.0)[..., None])


def _glare(img: Image.Image, i: int) -> Image.Image:
    out = img.copy()
    w, h = out.size
    ImageDraw.Draw(out).ellipse((w * 0.2, h * 0.1, w * 0.7, h * 0.5), fill=(255, 255, 255))
    return out.filter(ImageFilter.GaussianBlur(0.01 * max(w, h)))


def _stripes(img: Image.Image, i: int) -> Image.Image:
    a = _arr(img).copy()
    a[::4] = 0  # every fourth row lost
    return _img(a)


EXTRA_FAULTS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "motion_blur": lambda im, i: im.filter(ImageFilter.BoxBlur(max(1, max(im.size) // 12))),
    "low_contrast": lambda im, i: _img((_arr(im) - 128) * 0.25 + 128),
    "colour_cast": lambda im, i: _img(_arr(im) * np.array([1.0, 0.45, 0.3])),
    "pixelated": lambda im, i: im.resize((max(1, im.size[0] // 10),) * 2).resize(im.size),
    "vignette": _vignette,
    "dropped_lines": _stripes,
    "glare": _glare,
}


def _other_domains(name: str, others: list[Path], rng: np.random.Generator) -> list[Image.Image]:
    import skimage.data as sd

    out: list[Image.Image] = []
    for n in PHOTOS:
        if n in USED[name] or not hasattr(sd, n):
            continue
        try:
            a = np.asarray(getattr(sd, n)())
        except Exception:  # a data file the installed scikit-image lacks
            continue
        if a.dtype != np.uint8:
            a = a.astype(np.float64)
            a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
        if a.ndim == 3 and a.shape[-1] == 4:
            a = a[..., :3]
        if a.ndim == 3 and a.shape[0] < 10:
            continue
        out.append(Image.fromarray(a).convert("RGB"))
    for v in (0, 64, 128, 255):
        out.append(Image.new("RGB", (128, 128), (v, v, v)))
    for _ in range(6):
        out.append(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)))
    out += [load_rgb(p) for p in others]
    return out


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an outside image scores above an inside one), ties halved (Mann-Whitney)."""
    both = np.r_[inside, outside]
    ranks = np.empty(len(both))
    order = np.argsort(both, kind="stable")
    ranks[order] = np.arange(1, len(both) + 1)
    for v in np.unique(both):  # average ranks of ties
        same = both == v
        ranks[same] = ranks[same].mean()
    r = ranks[len(inside) :].sum() - len(outside) * (len(outside) + 1) / 2
    return float(r / (len(inside) * len(outside)))


class Alternatives:
    """The methods the build's score was chosen over, fitted on the same training features."""

    def __init__(self, train_f: np.ndarray, train_l: np.ndarray, layout: list[dict]) -> None:
        pre = split_blocks(train_f, layout)[0].astype(np.float64)
        self.layout = layout
        self.mean, cov = ledoit_wolf(pre)
        self.precision = np.linalg.inv(cov + np.eye(len(cov)) * 1e-9)
        self.bank = pre / np.maximum(np.linalg.norm(pre, axis=1, keepdims=True), 1e-12)

    def scores(self, f: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        pre = split_blocks(f, self.layout)[0].astype(np.float64)
        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        d = pre - self.mean
        unit = pre / np.maximum(np.linalg.norm(pre, axis=1, keepdims=True), 1e-12)
        sims = np.sort(unit @ self.bank.T, 1)
        return {
            "max softmax": -p.max(1),
            "energy": -(logits.max(1) + np.log(np.exp(z).sum(1))),
            "Gaussian, pre-logits": np.einsum("nd,de,ne->n", d, self.precision, d),
            "10-NN, pre-logits": -sims[:, -min(10, sims.shape[1])],
        }


def _run(predictor, images: list[Image.Image], spec: Preprocessing):  # noqa: ANN001, ANN202
    logits, feats = [], []
    for i in range(0, len(images), 32):
        x = np.stack([preprocess(im, spec) for im in images[i : i + 32]])
        lo, fe = predictor.logits_and_features(x)
        logits.append(lo), feats.append(fe)
    return np.concatenate(logits), np.concatenate(feats)


def _build(name: str, data: Path, work: Path, size: int) -> Path:
    """Train, export, quantize and fit the novelty score, each only when its file is missing."""
    text = datasets.default_recipe(name, data, work, size)
    if (data / "train" / "ok").is_dir():
        text = text.replace("[model]", 'ok_class = "ok"\n[model]')
    path = work / f"{name}.toml"
    path.write_text(text)
    recipe = load_recipe(path)
    out = recipe.out_dir
    # Each stage once: a later run of the suite refits only what is missing (delete
    # novelty.npz to refit the score alone).
    made = {
        "train": out / "model.pt",
        "export": out / "model.onnx",
        "quantize": out / "model.fp16.onnx",
        "novelty": out / "novelty.npz",
    }
    for stage, file in made.items():
        if not file.is_file():
            call_stage(stage, recipe, Console(quiet=True))
    return out


def _held_out_copy(data: Path, work: Path, cls: str) -> Path:
    out = work / "data" / f"{data.name}-without-{cls}"
    if not out.exists():
        for split in ("train", "val"):
            for c in (data / split).iterdir():
                if c.name != cls:
                    shutil.copytree(c, out / split / c.name)
    return out


def evaluate(name: str, work: Path, all_sets: list[str]) -> dict:
    """Build the set's model and score every group; the figures as a dict."""
    data = datasets.build(name, DATA_ROOT)
    folder = _build(name, data, work, SIZES[name])
    man = read_manifest(folder)
    spec = Preprocessing.from_dict(man.preprocessing)
    layout = man.onnx.features["layout"]
    model = NoveltyModel.load(folder / "novelty.npz")
    rng = np.random.default_rng(0)
    val = read_split(folder, "val", man.classes)
    val_imgs = [load_rgb(s.path) for s in val]
    sub = [val_imgs[i] for i in np.linspace(0, len(val_imgs) - 1, PER_GROUP).astype(int)]
    groups: dict[str, list[Image.Image]] = {}
    for kind, faults in (("probe", FAULTS), ("unprobed", EXTRA_FAULTS)):
        for fname, fault in faults.items():
            groups[f"{kind}:{fname}"] = [fault(im, i) for i, im in enumerate(sub)]
    others = []
    for other in all_sets:
        if other != name:
            o = datasets.build(other, DATA_ROOT) / "val"
            files = sorted(p for c in o.iterdir() for p in c.iterdir())
            others += [files[i] for i in np.linspace(0, len(files) - 1, 15).astype(int)]
    groups["other domains"] = _other_domains(name, others, rng)

    predictors = shipped_variants(folder, man)
    fp32 = predictors[MODEL_ONNX]
    train = read_split(folder, "train", man.classes)
    train_imgs = [load_rgb(s.path) for s in train[:: max(1, len(train) // 600)]]
    tl, tf = _run(fp32, train_imgs, spec)
    alt = Alternatives(tf, tl, layout)
    result: dict = {"set": name, "threshold": model.threshold, "methods": {}, "artifacts": {}}
    vl, vf = _run(fp32, val_imgs, spec)
    outs = {g: _run(fp32, imgs, spec) for g, imgs in groups.items()}
    # The other methods get a threshold chosen as the build chooses its own: the same target.
    target = float(man.novelty.target) if man.novelty else 0.02
    methods = {"tlbuild (shipped)": lambda f, lo: model.scores(f)}
    for k in alt.scores(vf[:1], vl[:1]):
        methods[k] = lambda f, lo, k=k: alt.scores(f, lo)[k]
    for mname, fn in methods.items():
        v = fn(vf, vl)
        t = model.threshold if mname.startswith("tlbuild") else conformal_threshold(v, target)[0]
        row = {"val_flagged": float((v > t).mean())}
        for g, (lo, fe) in outs.items():
            s = fn(fe, lo)
            row[g] = (_auroc(v, s), float((s > t).mean()))
        result["methods"][mname] = row
    # Every shipped variant: its flags against FP32's on validation and every group.
    ref = np.concatenate([model.scores(vf)] + [model.scores(fe) for _, fe in outs.values()])
    for aname, p in predictors.items():
        if aname == MODEL_ONNX:
            continue
        mine = [_run(p, val_imgs, spec)[1]] + [_run(p, imgs, spec)[1] for imgs in groups.values()]
        flags = np.concatenate([model.scores(f) for f in mine]) > model.threshold
        result["artifacts"][aname] = float((flags == (ref > model.threshold)).mean())
    result["near"] = _near_novelty(name, data, work)
    result["throughput"] = _throughput(folder, val, work)
    return result


def _near_novelty(name: str, data: Path, work: Path) -> dict | None:
    if name not in HELD_OUT:
        return None
    classes = sorted(c.name for c in (data / "train").iterdir())
    cls = HELD_OUT[name] or classes[-1]
    folder = _build(f"{name}-without-{cls}", _held_out_copy(data, work, cls), work, SIZES[name])
    man = read_manifest(folder)
    spec = Preprocessing.from_dict(man.preprocessing)
    model = NoveltyModel.load(folder / "novelty.npz")
    imgs = [load_rgb(p) for p in sorted((data / "val" / cls).iterdir())]
    logits, f = _run(shipped_variants(folder, man)[MODEL_ONNX], imgs, spec)
    flagged = model.scores(f) > model.threshold
    out = {"class": cls, "images": len(imgs), "flagged": float(flagged.mean())}
    if "ok" in man.classes:
        called_ok = logits.argmax(1) == man.classes.index("ok")
        out["passed_as_good"] = float((called_ok & ~flagged).mean())
        out["called_ok_without_the_score"] = float(called_ok.mean())
    return out


def _throughput(folder: Path, val: list, work: Path) -> dict:
    from tlbuild.classify.run import ClassifyOptions, classify

    src = work / f"throughput-{folder.name}"
    if not src.exists():
        src.mkdir()
        for i in range(400):
            shutil.copy(val[i % len(val)].path, src / f"{i:04d}{val[i % len(val)].path.suffix}")
    rates: dict[str, list[float]] = {"auto": [], "off": []}
    for _ in range(3):
        for mode in ("off", "auto"):
            out = work / f"t-{folder.name}-{mode}.parquet"
            opts = ClassifyOptions(artifact=MODEL_ONNX, novelty=mode, overwrite=True)
            s = classify([str(src)], folder, out, opts)
            rates[mode].append(s.rate)
    return {k: float(np.median(v)) for k, v in rates.items()}


def _print(r: dict) -> None:
    print(f"\n== {r['set']}: threshold {r['threshold']:.3g}")
    groups = [g for g in next(iter(r["methods"].values())) if g != "val_flagged"]
    print("AUROC against validation / share flagged at the threshold")
    print(f"{'method':22s} {'val flagged':>11s} " + " ".join(f"{g[-14:]:>14s}" for g in groups))
    for m, row in r["methods"].items():
        cells = " ".join(f"{row[g][0]:.2f} / {row[g][1]:4.0%}".rjust(14) for g in groups)
        print(f"{m:22s} {row['val_flagged']:11.1%} {cells}")
    for a, agree in r["artifacts"].items():
        print(f"  {a}: flags as FP32 on {agree:.1%} of all images above")
    if r["near"]:
        n = r["near"]
        line = (
            f"  near novelty ('{n['class']}' held out, {n['images']} images): "
            f"flagged {n['flagged']:.0%}"
        )
        if "passed_as_good" in n:
            line += (
                f", passed as good {n['passed_as_good']:.0%} (called ok without the score: "
                f"{n['called_ok_without_the_score']:.0%})"
            )
        print(line)
    t = r["throughput"]
    print(
        f"  classify rows/s (model.onnx): {t['off']:.0f} without the score, {t['auto']:.0f} with "
        f"({t['auto'] / t['off']:.2f}x)"
    )


def main() -> None:
    """Build, score and print every set asked for."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("sets", nargs="*", default=list(SIZES))
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tlbuild-novelty-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.sets:
        t0 = time.perf_counter()
        r = evaluate(name, work, list(SIZES))
        r["seconds"] = time.perf_counter() - t0
        _print(r)
        results.append(r)
        (work / "novelty_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
