"""Shared fixtures: a tiny synthetic dataset and one tiny trained build reused across tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tlbuild.data.synth import synth_defects


@pytest.fixture(scope="session", autouse=True)
def _no_ci_or_tracker_of_the_caller() -> Iterator[None]:
    """A developer's $MLFLOW_TRACKING_URI, or the CI job's summary file, is not the tests' to
    write: every build here would otherwise log to them."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "GITHUB_STEP_SUMMARY"):
            mp.delenv(name, raising=False)
        yield


def write_recipe(path: Path, text: str) -> Path:
    """Write a recipe file and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


TINY_TRAIN = """
[train]
seed = 0
batch_size = 8
augment = {{ crop_scale = [0.8, 1.0], hflip = 0.5, rotation = 10, color_jitter = 0.1 }}
early_stopping = {{ patience = 5 }}
[[train.phases]]
name = "head"
epochs = {head}
lr = 3e-3
[[train.phases]]
name = "finetune"
epochs = {ft}
lr = 1e-3
unfreeze = 2
"""


def tiny_recipe(
    folder: Path, data: Path, name: str = "tiny", head: int = 1, ft: int = 1, extra: str = ""
) -> Path:
    """A fast recipe: 64 px Lite0 with bundled weights, one epoch per stage."""
    rest = f"""
[export]
parity_images = 8
[bench]
batch_sizes = [1, 4]
warmup_iters = 1
min_iters = 5
min_seconds = 0.0
max_seconds = 1.0
{TINY_TRAIN.format(head=head, ft=ft)}
{extra}
"""
    return small_recipe(folder, data, name, rest, size=64, data_extra='ok_class = "ok"')


def small_recipe(
    folder: Path, data: Path, name: str, rest: str = "", size: int = 48, data_extra: str = ""
) -> Path:
    """A recipe naming only the data (split 75/25) and the input size, plus `rest`."""
    text = f"""
name = "{name}"
output_dir = "out"
[data]
root = "{data}"
split = {{ val = 0.25, seed = 0 }}
{data_extra}
[model]
preprocess = {{ input_size = {size}, resize = "resize" }}
{rest}
"""
    return write_recipe(folder / f"{name}.toml", text)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images per class, 64 px: enough to exercise every stage in seconds."""
    root = tmp_path_factory.mktemp("data") / "defects"
    synth_defects(root, per_class=8, size=64, seed=1)
    return root


@pytest.fixture()
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_build(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full `run` of the tiny recipe; returns its export folder."""
    from tlbuild import runner
    from tlbuild.recipe import load_recipe

    folder = tmp_path_factory.mktemp("build")
    recipe = load_recipe(tiny_recipe(folder, tiny_data))
    runner.run(recipe, Console(quiet=True))
    return recipe.out_dir


def run_stage(name: str, recipe: Any, console: Console | None = None, resume: bool = False) -> Any:
    """Run one stage's body directly (no incremental record), returning its typed result."""
    from tlbuild.runner import call_stage

    return call_stage(name, recipe, console or Console(quiet=True), resume)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """A real full disk (ENOSPC) for tests: mounts a tmpfs of the given size in KiB (called
    again, resizes it); unmounted afterwards. Needs root (CI runs as root); skips elsewhere."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = False

    def mount(kib: int) -> Path:
        nonlocal mounted
        opts = f"remount,size={kib}k" if mounted else f"size={kib}k"
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no `mount` here; the disk-full tests mount a small tmpfs")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
        mounted = True
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
