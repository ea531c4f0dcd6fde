"""[bench] settings and validation images for an export folder benchmarked without a recipe
(`tlbuild bench DIR`, e.g. on a device)."""

from __future__ import annotations

from pathlib import Path

from tlbuild.artifacts import SPLITS_JSON
from tlbuild.data.scan import Sample
from tlbuild.data.splits_file import read_split
from tlbuild.manifest import read_manifest, recipe_here, recorded_settings
from tlbuild.recipe import BenchConfig, GatesConfig


def settings_for_folder(folder: Path) -> tuple[BenchConfig, str]:
    """[bench] for an export folder given without a recipe (`tlbuild bench DIR`).

    The recipe it was built from, as it is now, when that file is here and still writes to this
    folder; else the settings the bench stage recorded at home; else the defaults.
    """
    manifest = read_manifest(folder)
    recipe = recipe_here(folder, manifest)
    if recipe is not None:
        return recipe.bench, f"from {recipe.source}"
    recorded = manifest.bench.settings if manifest.bench is not None else {}
    # Folders exported before each stage recorded its own settings carry the whole recipe.
    recorded = recorded or manifest.recipe.get("bench", {})
    if recorded:
        cfg = recorded_settings(BenchConfig, recorded, folder, "bench.settings")
        return cfg, "as recorded in manifest.json"
    return BenchConfig(), "defaults (manifest.json records no [bench] settings)"


def gates_for_folder(folder: Path) -> GatesConfig:
    """[gates] for an export folder given without a recipe: the recipe's as it is now when it is
    here, else those the report stage recorded, else none."""
    manifest = read_manifest(folder)
    recipe = recipe_here(folder, manifest)
    if recipe is not None:
        return recipe.gates
    recorded = manifest.gates.get("settings")
    if recorded:
        return recorded_settings(GatesConfig, recorded, folder, "gates.settings")
    return GatesConfig()


def validation_if_here(folder: Path) -> list[Sample] | None:
    """The recorded validation split, if splits.json is here (on a device it usually is not)."""
    if not (folder / SPLITS_JSON).is_file():
        return None
    return read_split(folder, "val", read_manifest(folder).classes)
