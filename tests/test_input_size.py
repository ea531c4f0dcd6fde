"""Input size that fits the data: the note at check/run time and input_size = "auto"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from tests.conftest import run_stage, write_recipe
from tlbuild.cli import app
from tlbuild.data.sizes import SizeSummary, auto_input_size, size_advice, summarize_sizes
from tlbuild.models.factory import make_model
from tlbuild.recipe import ModelConfig, PreprocessConfig, load_recipe


def _small_images(root: Path, side: int, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_auto_size_is_three_times_the_short_side_within_bounds() -> None:
    assert auto_input_size(SizeSummary(48, 48, 10), 224) == 160  # 144 rounded up to 32s
    assert auto_input_size(SizeSummary(30, 20, 10), 224) == 64  # never below 64
    assert auto_input_size(SizeSummary(640, 480, 10), 224) == 224  # never above the backbone's
    assert auto_input_size(None, 224) == 224
    assert size_advice(SizeSummary(48, 48, 10), (224, 224), 224) is not None
    assert size_advice(SizeSummary(100, 100, 10), (224, 224), 224) is None


def test_sizes_are_read_from_headers(tmp_path: Path) -> None:
    root = _small_images(tmp_path, 40)
    s = summarize_sizes(sorted(root.rglob("*.png")))
    assert s is not None and (s.width, s.height, s.sampled) == (44, 40, 12)
    pre = make_model(
        ModelConfig(weights="none", preprocess=PreprocessConfig(input_size="auto")), 2, s
    ).preprocessing
    assert pre.input_size == (128, 128)


def test_check_and_train_say_when_the_input_is_far_larger_than_the_images(tmp_path: Path) -> None:
    root = _small_images(tmp_path / "imgs", 24)
    fixed = write_recipe(
        tmp_path / "fixed.toml",
        '[data]\nroot = "imgs"\n[model]\npreprocess = { input_size = 224 }\n',
    )
    res = CliRunner().invoke(app, ["check", str(fixed)])
    assert res.exit_code == 0
    assert "images are about 28x24 px" in res.output and '"auto" would use 96 px' in res.output
    auto = write_recipe(  # "auto" is the default: this recipe does not name a size
        tmp_path / "auto.toml",
        f"""
output_dir = "out"
[data]
root = "{root}"
split = {{ val = 0.34 }}
[model]
preprocess = {{ resize = "resize" }}
[train]
batch_size = 4
[[train.phases]]
name = "all"
epochs = 1
unfreeze = "all"
""",
    )
    res = CliRunner().invoke(app, ["check", str(auto)])
    assert res.exit_code == 0 and 'input_size = "auto": 96 px' in res.output
    recipe = load_recipe(auto)
    console = Console(record=True, width=200)
    out = run_stage("train", recipe, console)
    assert "input 96x96" in console.export_text()
    assert "upsampled" not in console.export_text()
    assert out.metrics["val"]["images"] == 4
