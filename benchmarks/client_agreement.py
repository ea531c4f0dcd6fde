"""How often a client outside tlbuild gives `tlbuild classify`'s answers.

    python benchmarks/client_agreement.py                  # demo camera frames + every real set
    python benchmarks/client_agreement.py camera textures  # some sets
    python benchmarks/client_agreement.py --no-node        # without the Node client

Needs `pip install opencv-python-headless`; the Node client needs node and npm (its packages,
onnxruntime-node and sharp, are installed into benchmarks/clients/node_modules on first use).

For each set a full `tlbuild run` builds an export folder (the default recipe: the sets of the
accuracy suite at 128 px; the demo recipe for `camera`), then every image of the set is
classified by:
- `tlbuild classify` as a user runs it (defaults: the fastest artifact here, a full decode), with
  `--no-exact-decode` (large JPEGs decoded at a reduced DCT scale), and with
  `--artifact model.onnx`: the references;
- OpenCV (a stand-in for C++) decoding only, feeding the uint8 twin of each reference's artifact;
- OpenCV resizing itself (INTER_CUBIC, INTER_LINEAR, INTER_AREA) into the float model.onnx;
- Node: sharp decoding only into the uint8 models, and sharp resizing (cubic) into model.onnx.
It prints, per set and client, the answers that differ from each reference and the mean and
largest difference in the top probability, and writes them to client_agreement.json.

`camera` is the issue's case: 2,000 frames of 640x480 JPEG (the demo's synthetic surfaces drawn
at 640 px with a new seed, never seen by the model, cropped to 4:3), against the demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "accuracy"))

import datasets  # noqa: E402

NODE_DIR = ROOT / "benchmarks" / "clients"
SETS = ("camera", "textures", "scenes", "faces")


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def tlbuild(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tlbuild", *args], check=True, stdout=subprocess.DEVNULL)


def camera_frames(out: Path, n: int) -> list[Path]:
    """`n` 640x480 JPEG frames of the demo's surfaces, a seed the demo model never saw."""
    from PIL import Image

    from tlbuild.data.synth import synth_defects

    done = sorted((out / "frames").rglob("*.jpg"))
    if len(done) == n:  # made by an earlier run in the same --work folder
        return done
    raw = out / "raw"
    synth_defects(raw, per_class=n // 4, size=640, seed=12345)
    frames = []
    for f in sorted(raw.rglob("*.jpg")):
        dst = out / "frames" / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as img:
            img.crop((0, 80, 640, 560)).save(dst, "JPEG", quality=90)
        frames.append(dst)
    shutil.rmtree(raw)
    return frames


def build(name: str, work: Path) -> tuple[Path, list[Path]]:
    """An export folder for the set and the images to classify."""
    from rich.console import Console

    from tlbuild import runner
    from tlbuild.recipe import load_recipe

    if name == "camera":
        data = ROOT / "data" / "demo"
        if not data.exists():
            tlbuild("data", "synth-defects", str(data), "--per-class", "150")
        recipe_text = (ROOT / "recipes" / "defects.toml").read_text()
        recipe_text = recipe_text.replace('root = "../data/demo"', f'root = "{data}"')
        recipe_text = recipe_text.replace(
            'name = "defects"', f'name = "defects"\noutput_dir = "{work}"'
        )
        images = camera_frames(work / "camera", 2000)
    else:
        data = datasets.build(name, ROOT / "data" / "bench-accuracy")
        recipe_text = datasets.default_recipe(name, data, work, 128)
        images = sorted(p for p in data.rglob("*.png") if p.is_file())
    path = work / f"{name}.toml"
    path.write_text(recipe_text)
    recipe = load_recipe(path)
    if "output_dir" not in recipe_text:
        raise SystemExit("the recipe must name output_dir")
    runner.run(recipe, Console(quiet=True))
    return recipe.out_dir, images


def classify_rows(folder: Path, images: list[Path], work: Path, *extra: str) -> dict:
    """path -> (label index, probabilities, artifact) from `tlbuild classify`."""
    import pandas as pd

    listing = work / "images.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    out = work / f"classify-{len(list(work.glob('classify-*')))}.parquet"
    tlbuild("classify", str(listing), "--model", str(folder), "--out", str(out),
            "--novelty", "off", "--topk", "99", *extra)  # fmt: skip
    df = pd.read_parquet(out)
    classes = json.loads((folder / "labels.json").read_text())
    rows = {}
    for r in df.itertuples():
        if r.error is not None and r.error == r.error:  # NaN: no error
            raise SystemExit(f"tlbuild classify could not read {r.path}: {r.error}")
        probs = np.zeros(len(classes))
        labels, scores = r.topk_labels, r.topk_scores
        if isinstance(labels, str):  # list columns may come back as their JSON text
            labels, scores = json.loads(labels), json.loads(scores)
        for lab, s in zip(labels, scores, strict=True):
            probs[classes.index(lab)] = s
        rows[r.path] = (classes.index(r.label), probs, r.artifact)
    return rows


def opencv_clients(folder: Path, images: list[Path], artifacts: list[str]) -> dict:
    """client name -> path -> probabilities, for OpenCV decoding (and resizing) in Python."""
    import cv2
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    h, w = pre["input_size"]
    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

    twins = {a: session("model_image" + a.removeprefix("model")) for a in artifacts}
    fp32 = session("model.onnx")
    fp32_in = fp32.get_inputs()[0].name
    out: dict[str, dict[str, np.ndarray]] = {}
    for p in images:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)  # applies EXIF orientation; grey to 3
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        for a, s in twins.items():
            logits = s.run(None, {"image": rgb[None]})[0][0]
            out.setdefault(f"OpenCV decode, uint8 {a}", {})[str(p)] = softmax(logits)
        for flag in ("INTER_CUBIC", "INTER_LINEAR", "INTER_AREA"):
            r = cv2.resize(rgb, (w, h), interpolation=getattr(cv2, flag))
            x = ((r.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None]
            logits = fp32.run(None, {fp32_in: x.astype(np.float32)})[0][0]
            out.setdefault(f"OpenCV {flag}, float model.onnx", {})[str(p)] = softmax(logits)
    return out


def node_clients(folder: Path, images: list[Path], work: Path) -> dict:
    """client name -> path -> probabilities, from node_client.mjs (sharp + onnxruntime-node)."""
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"}
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=NODE_DIR, env=env,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    listing = work / "node_images.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    result = work / "node.jsonl"
    subprocess.run(["node", str(NODE_DIR / "node_client.mjs"), str(folder), str(listing),
                    str(result)], check=True)  # fmt: skip
    out: dict[str, dict[str, np.ndarray]] = {}
    for line in result.read_text().splitlines():
        row = json.loads(line)
        path = row.pop("path")
        for name, logits in row.items():
            label = (
                "Node sharp resize (cubic), float model.onnx"
                if "+" in name
                else f"Node sharp decode, uint8 {name}"
            )
            out.setdefault(label, {})[path] = softmax(np.asarray(logits, np.float64))
    return out


def compare(reference: dict, client: dict) -> dict:
    """Answers that differ and top-probability differences of `client` against `reference`."""
    differ, diffs = 0, []
    for path, (label, probs, _) in reference.items():
        q = client[path]
        differ += int(q.argmax() != label)
        diffs.append(abs(float(q[label]) - float(probs[label])))
    n = len(reference)
    return {
        "images": n,
        "differ": differ,
        "agreement": round(1 - differ / n, 5),
        "mean_prob_diff": float(np.mean(diffs)),
        "max_prob_diff": float(np.max(diffs)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="*", default=list(SETS))
    ap.add_argument("--no-node", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("client_agreement.json"))
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep each set's build and images here (a rerun reuses them); default: a "
        "temporary folder, removed",
    )
    args = ap.parse_args()
    node = not args.no_node and shutil.which("node") and shutil.which("npm")
    results = {}
    for name in args.sets:
        if args.work is None:
            work = Path(tempfile.mkdtemp(prefix=f"client-{name}-"))
        else:
            work = (args.work / name).resolve()
            work.mkdir(parents=True, exist_ok=True)
            for old in work.glob("classify-*"):
                old.unlink()
        try:
            folder, images = build(name, work)
            refs = {
                "tlbuild classify (defaults)": classify_rows(folder, images, work),
                "tlbuild classify --no-exact-decode": classify_rows(
                    folder, images, work, "--no-exact-decode"
                ),
                "tlbuild classify --artifact model.onnx": classify_rows(
                    folder, images, work, "--artifact", "model.onnx"
                ),
            }
            artifacts = sorted({next(iter(r.values()))[2] for r in refs.values()})
            clients = opencv_clients(folder, images, artifacts)
            if node:
                clients.update(node_clients(folder, images, work))
            results[name] = {
                ref: {c: compare(rows, probs) for c, probs in clients.items()}
                for ref, rows in refs.items()
            }
            results[name]["_artifacts"] = artifacts
            _print(name, len(images), results[name])
        finally:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


def _print(name: str, n: int, result: dict) -> None:
    print(f"\n## {name}: {n} images; default classify runs {result['_artifacts']}")
    for ref, rows in result.items():
        if ref.startswith("_"):
            continue
        print(f"against {ref}:")
        print(f"  {'client':58s} {'differ':>8s} {'agree':>8s} {'mean dp':>9s} {'max dp':>8s}")
        for c, r in rows.items():
            print(f"  {c:58s} {r['differ']:>8d} {r['agreement']:>8.2%} "
                  f"{r['mean_prob_diff']:>9.2e} {r['max_prob_diff']:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
