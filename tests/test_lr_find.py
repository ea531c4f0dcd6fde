"""lr = "auto": the range test's rule, that it leaves the model untouched, and end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from tests.conftest import run_stage, small_recipe
from tlbuild.recipe import load_recipe
from tlbuild.train.lr_find import RangeTest, lr_range_test, valley


def test_valley_picks_a_rate_on_the_falling_slope_before_the_minimum() -> None:
    lrs = list(np.logspace(-6, 0, 61))
    # Flat, then falling from 1e-4 to a minimum at 1e-2, then blowing up.
    losses = [2.0 if lr < 1e-4 else 2.0 - np.log10(lr / 1e-4) * 0.8 for lr in lrs]
    losses = [
        loss if lr <= 1e-2 else 0.4 + (np.log10(lr / 1e-2)) * 5
        for lr, loss in zip(lrs, losses, strict=True)
    ]
    chosen = valley(lrs, losses)
    assert 1e-4 < chosen < 1e-2


def _toy() -> tuple[nn.Module, torch.utils.data.DataLoader]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(96, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    gen = torch.Generator()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen
    )
    return model, loader


def _find(model: nn.Module, loader: torch.utils.data.DataLoader):  # noqa: ANN202
    def step(opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    groups = [{"params": list(model.parameters()), "lr": 1.0}]
    test = RangeTest(phase="s", steps=60, seed=3)
    return lr_range_test(model, groups, lambda g: torch.optim.AdamW(g), loader, step, test)


def test_range_test_restores_the_model_and_is_deterministic() -> None:
    model, loader = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    first = _find(model, loader)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers too
    assert torch.equal(rng_before, torch.get_rng_state())
    second = _find(model, loader)
    assert first.chosen == second.chosen and first.losses == second.losses
    assert 1e-6 <= first.chosen <= 1.0 and first.steps <= 60
    assert first.lrs == sorted(first.lrs)


@pytest.mark.slow
def test_auto_lr_is_chosen_printed_recorded_and_plotted(tiny_data: Path, tmp_path: Path) -> None:
    rest = """
[export]
parity_images = 4
[train]
batch_size = 8
lr_find_steps = 12
[[train.phases]]
name = "all"
epochs = 1
lr = "auto"
unfreeze = "all"
"""
    recipe = load_recipe(small_recipe(tmp_path, tiny_data, "auto", rest))
    console = Console(record=True, width=200)
    out = run_stage("train", recipe, console)
    found = out.result.lr_find
    assert len(found) == 1 and found[0]["stage"] == "all" and found[0]["steps"] <= 12
    chosen = found[0]["chosen"]
    assert f"lr = {chosen:.3g}" in console.export_text()
    assert out.result.history[0]["stage_lr"] == chosen
    assert out.result.history[0]["lr_head"] <= chosen  # the schedule scales the found rate
    assert (recipe.out_dir / "lr_find.png").stat().st_size > 1000
    assert (
        json.loads((recipe.out_dir / "metrics.json").read_text())["lr_find"][0]["chosen"] == chosen
    )
    run_stage("export", recipe, Console(quiet=True))
    manifest = json.loads((recipe.out_dir / "manifest.json").read_text())
    assert manifest["training"]["lr_find"][0]["chosen"] == chosen
    assert "lr_find.png" in manifest["artifacts"]
