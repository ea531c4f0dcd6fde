"""The decode-once cache: exact where it says so, bounded memory, spill file cleaned up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from tests.conftest import run_stage, tiny_recipe
from tlbuild.data.cache import (
    ImageCache,
    eval_preparer,
    fill_cache,
    train_max_side,
    train_preparer,
)
from tlbuild.data.dataset import CachedEval, EvalTransform, ImageDataset, train_transform
from tlbuild.data.preprocess import Preprocessing
from tlbuild.data.scan import Sample
from tlbuild.recipe import AugmentConfig, load_recipe

SPEC = Preprocessing((64, 64), "bicubic", (0.5,) * 3, (0.5,) * 3, "resize", 0.875)


def _images(folder: Path, sizes: list[tuple[int, int]]) -> list[Sample]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(Sample(p, i % 2))
    return out


def _batches(ds: ImageDataset) -> list[torch.Tensor]:
    torch.manual_seed(7)
    return [ds[i][0] for i in range(len(ds))]


def test_cached_training_and_validation_inputs_are_identical_to_decoding(tmp_path: Path) -> None:
    samples = _images(tmp_path, [(40, 30), (64, 64), (100, 80), (31, 90)])
    aug = AugmentConfig(rotation=10, color_jitter=0.2)
    assert all(max(s) <= train_max_side(SPEC, aug.crop_scale[0]) for s in [(100, 80), (31, 90)])
    # ram_bytes=0: every image goes through the memory-mapped file, the harder path.
    for ram in (1 << 30, 0):
        train_cache, val_cache = ImageCache(ram, tmp_path), ImageCache(ram, tmp_path)
        fill_cache(train_cache, [s.path for s in samples], train_preparer(SPEC, 0.6))
        fill_cache(val_cache, [s.path for s in samples], eval_preparer(SPEC))
        train_cache.seal()
        val_cache.seal()
        assert (train_cache.spilled_bytes > 0) == (ram == 0)
        plain = _batches(ImageDataset(samples, train_transform(SPEC, aug)))
        cached = _batches(ImageDataset(samples, train_transform(SPEC, aug), train_cache))
        assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
        plain_val = _batches(ImageDataset(samples, EvalTransform(SPEC)))
        cached_val = _batches(ImageDataset(samples, CachedEval(SPEC), val_cache))
        assert all(torch.equal(a, b) for a, b in zip(plain_val, cached_val, strict=True))
        spill = train_cache._file
        train_cache.close()
        val_cache.close()
        assert spill is None or not spill.exists()


def test_images_larger_than_augmentation_needs_are_shrunk(tmp_path: Path) -> None:
    side = train_max_side(SPEC, 0.8)  # 2 * 64 / sqrt(0.8) = 144
    assert side == 144
    samples = _images(tmp_path, [(600, 400)])
    cache = ImageCache(1 << 30)
    fill_cache(cache, [samples[0].path], train_preparer(SPEC, 0.8))
    cache.seal()
    assert cache.get(0).shape == (144, 216, 3)  # short side 144, aspect kept


def test_training_with_and_without_the_cache_gives_the_same_weights(
    tiny_data: Path, tmp_path: Path
) -> None:
    weights = []
    for cache in ("true", "false"):
        path = tiny_recipe(tmp_path / cache, tiny_data, head=1, ft=1)
        text = path.read_text().replace('ok_class = "ok"', f'ok_class = "ok"\ncache = {cache}')
        path.write_text(text)
        recipe = load_recipe(path)
        assert recipe.data.cache is (cache == "true")
        run_stage("train", recipe, Console(quiet=True))
        weights.append(
            torch.load(recipe.out_dir / "model.pt", map_location="cpu", weights_only=True)[
                "state_dict"
            ]
        )
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
