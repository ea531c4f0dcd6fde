"""Errors a user can act on. The CLI turns them into one clear message and an exit code."""

from __future__ import annotations


class TlbuildError(Exception):
    """Base class: a problem the user can fix; never shown as a traceback."""

    exit_code = 1


class UsageError(TlbuildError):
    """A wrong recipe, argument or path (exit code 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """The recipe file is missing, not TOML, or fails validation."""


class BuildError(TlbuildError):
    """The build ran but its result is not good enough or could not be produced (exit code 1)."""

    exit_code = 1


class DataError(BuildError):
    """The dataset cannot be used as it is (an empty class, too few images, no images at all)."""
