"""Errors a user can act on. The CLI turns them into one clear message and an exit code."""

from __future__ import annotations

import errno
import os


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


class DiskFullError(BuildError):
    """A write failed because its file system is full (or over quota)."""

    def __init__(self, path: object) -> None:
        super().__init__(f"no space left on the device holding {path}; free some space there")
        self.path = path


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and all(cause is not c for c in seen):
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return seen


def disk_full(e: BaseException) -> str | None:
    """The one-line message for an error caused by a full disk anywhere in its chain, else None.

    Libraries wrap ENOSPC in their own errors (torch, onnx, fastparquet): the chain is searched
    for the errno (and its file name) first; only where none carries it, for the C library's
    words in a library's message (never in tlbuild's own messages, which name their file)."""
    chain = _chain(e)
    for cause in chain:
        if isinstance(cause, DiskFullError):
            return str(cause)
        if isinstance(cause, OSError) and cause.errno in _FULL:
            return str(DiskFullError(cause.filename or "a file it was writing"))
    for cause in chain:
        if not isinstance(cause, TlbuildError) and any(os.strerror(n) in str(cause) for n in _FULL):
            return str(DiskFullError("a file it was writing"))
    return None
