"""Epoch time with and without the decode-once cache (data.cache), and whether results match.

    python benchmarks/decode_cache.py                # the suite's sets and demo-640
    python benchmarks/decode_cache.py textures demo-640

`demo-640` is the demo set rendered at 640x640 px (JPEG), trained at 160: files a camera would
write, where decoding and resizing cost more than at the suite's small sizes.
For each set, in this process: the time to build the cache, the time of one epoch of the
training data pipeline alone (decode + augment + normalise, batch 32) from files and from the
cache, and a 2-epoch `tlbuild train` from files and from the cache, with their per-epoch time
and whether the trained weights are identical (they must be where no image exceeds what
augmentation needs; see tlbuild/data/cache.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent / "accuracy"))

import datasets  # noqa: E402
from run import DATA_ROOT, SIZES  # noqa: E402

from tlbuild.data.cache import ImageCache, fill_cache, train_preparer  # noqa: E402
from tlbuild.data.dataset import ImageDataset, train_transform  # noqa: E402
from tlbuild.data.scan import scan_dataset  # noqa: E402
from tlbuild.models.factory import make_model  # noqa: E402
from tlbuild.recipe import load_recipe  # noqa: E402
from tlbuild.runner import call_stage  # noqa: E402


def _recipe(data: Path, size: int, work: Path, cache: bool) -> Path:
    path = work / f"{data.name}-{cache}.toml"
    path.write_text(
        f"""
name = "{data.name}-{"cache" if cache else "files"}"
output_dir = "{work}"
[data]
train = "{data / "train"}"
val = "{data / "val"}"
cache = {str(cache).lower()}
[model]
preprocess = {{ input_size = {size}, resize = "resize" }}
[[train.phases]]
name = "finetune"
epochs = 2
lr = 2e-3
unfreeze = "all"
body_lr_mult = 1.0
"""
    )
    return path


def _pipeline_epoch(ds: ImageDataset) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def _demo_640(out: Path) -> None:
    datasets.demo(out, per_class=100)  # builds 160 px; re-render the same images at 640
    import shutil

    from tlbuild.data.synth import synth_defects

    tmp = out / "_640"
    synth_defects(tmp, per_class=100, size=640, seed=0)
    for split in ("train", "val"):
        for f in (out / split).rglob("*.jpg"):
            shutil.copy(tmp / f.parent.name / f.name, f)
    shutil.rmtree(tmp)


def main(names: list[str]) -> None:
    datasets.BUILDERS["demo-640"] = _demo_640
    SIZES["demo-640"] = 160
    rows = []
    for name in names:
        data = datasets.build(name, DATA_ROOT)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            recipe = load_recipe(_recipe(data, SIZES[name], work, True))
            splits = scan_dataset(recipe.data)
            spec = make_model(recipe.model, len(splits.classes)).preprocessing
            tf = train_transform(spec, recipe.train.augment)
            cache = ImageCache(1 << 31)
            t0 = time.perf_counter()
            fill_cache(cache, [s.path for s in splits.train], train_preparer(spec, 0.8))
            cache.seal()
            fill_s = time.perf_counter() - t0
            files_s = _pipeline_epoch(ImageDataset(splits.train, tf))
            cached_s = _pipeline_epoch(ImageDataset(splits.train, tf, cache))
            weights, epoch_s = [], []
            for use_cache in (False, True):
                r = load_recipe(_recipe(data, SIZES[name], work, use_cache))
                out = call_stage("train", r, Console(quiet=True))
                epoch_s.append(sum(h["seconds"] for h in out.result.history) / 2)
                weights.append(out.result.model.state_dict())
            same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        rows.append((name, len(splits.train), fill_s, files_s, cached_s, *epoch_s, same))
        print(f"{name}: done", flush=True)
    print()
    print(
        "| set | train images | cache fill | data pipeline epoch, files | from cache | "
        "training epoch, files | from cache | same weights |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, n, fill_s, files_s, cached_s, ep_files, ep_cache, same in rows:
        print(
            f"| {name} | {n} | {fill_s:.1f} s | {files_s:.1f} s | {cached_s:.1f} s "
            f"({files_s / cached_s:.1f}x) | {ep_files:.1f} s | {ep_cache:.1f} s "
            f"({ep_files / ep_cache:.2f}x) | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or [*datasets.BUILDERS, "demo-640"])
