"""What `tlbuild check` verifies beyond the recipe's own validation, without writing anything:
that the backbone exists and that the export folder can be made where the recipe puts it."""

from __future__ import annotations

import os
from pathlib import Path

from tlbuild.errors import RecipeError, UsageError
from tlbuild.recipe import Recipe


def _folder_problem(out: Path) -> str | None:
    """Why `out` cannot be the export folder, or None; creates nothing."""
    if out.exists() and not out.is_dir():
        return f"the export folder {out} is a file, not a folder; set output_dir or name"
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"cannot make the export folder {out}: {existing} is a file; set output_dir"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write to {existing} to make the export folder {out}; set output_dir"
    return None


def check_recipe(recipe: Recipe) -> None:
    """A RecipeError listing what would make `tlbuild run` fail before training starts."""
    from tlbuild.models.factory import check_backbone

    problems = []
    try:
        check_backbone(recipe.model.backbone)
    except UsageError as e:
        problems.append(str(e))
    if (why := _folder_problem(recipe.out_dir)) is not None:
        problems.append(why)
    if problems:
        raise RecipeError(f"{recipe.source}: " + "; ".join(p.rstrip(".") for p in problems))
