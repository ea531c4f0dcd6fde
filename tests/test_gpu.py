"""The CUDA training path (AMP, channels-last). Runs only where a CUDA GPU is visible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.conftest import tiny_recipe
from tlbuild import runner
from tlbuild.recipe import load_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible"),
]


def test_cuda_training_with_amp_and_channels_last_exports_a_matching_onnx(
    tiny_data: Path, tmp_path: Path
) -> None:
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_data, name="gpu"))
    assert recipe.train.device == "auto" and recipe.train.amp and recipe.train.channels_last
    runner.run(recipe, Console(quiet=True))
    metrics = json.loads((recipe.out_dir / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda")
    manifest = json.loads((recipe.out_dir / "manifest.json").read_text())
    assert manifest["onnx"]["parity"]["passed"]  # CUDA-trained weights export and match on CPU
