"""Torch datasets over scanned samples: augmented for training, plain preprocessing otherwise."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from tlbuild.data.cache import ImageCache
from tlbuild.data.images import load_rgb
from tlbuild.data.preprocess import Preprocessing, normalize, preprocess
from tlbuild.data.scan import Sample
from tlbuild.recipe import AugmentConfig


def train_transform(spec: Preprocessing, aug: AugmentConfig) -> Callable[[Image.Image], np.ndarray]:
    """Random crop/flip/rotate/colour on PIL, then the same normalisation as inference."""
    ops: list[torch.nn.Module] = [
        v2.RandomResizedCrop(
            spec.input_size,
            scale=aug.crop_scale,
            ratio=aug.crop_ratio,
            interpolation=v2.InterpolationMode(spec.interpolation),
            antialias=True,
        )
    ]
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        ops.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotation > 0:
        # Rotation leaves empty corners; fill them with the mean colour, which normalises to 0.
        fill = [round(m * 255) for m in spec.mean]
        ops.append(v2.RandomRotation(aug.rotation, fill=fill))
    if aug.color_jitter > 0 or aug.hue > 0:
        j = aug.color_jitter
        ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=aug.hue))
    return _Augment(v2.Compose(ops), spec)


class _Augment:
    # A class rather than a closure so DataLoader workers can pickle it under any start method.
    def __init__(self, pipeline: v2.Compose, spec: Preprocessing) -> None:
        self.pipeline, self.spec = pipeline, spec

    def __call__(self, img: Image.Image) -> np.ndarray:
        return normalize(self.pipeline(img), self.spec)


class EvalTransform:
    """Exactly the inference preprocessing."""

    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec

    def __call__(self, img: Image.Image) -> np.ndarray:
        return preprocess(img, self.spec)


class ImageDataset(Dataset):
    """Decodes a sample with `load_rgb` and applies a transform returning a CHW array.

    With `cache` (data/cache.py), sample i comes from the cache instead of the file.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], np.ndarray],
        cache: ImageCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        img = Image.fromarray(self.cache.get(i)) if self.cache is not None else load_rgb(s.path)
        return torch.from_numpy(self.transform(img)), s.label


class CachedEval:
    """The inference preprocessing for images the cache already resized: normalising only."""

    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec

    def __call__(self, img: Image.Image) -> np.ndarray:
        return normalize(img, self.spec)
