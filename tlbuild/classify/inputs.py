"""Lazily list the image files named by `tlbuild classify`'s inputs: folders, files, path lists."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tlbuild.classify.storage import exists, filesystem, is_url, local_path
from tlbuild.data.extensions import IMAGE_EXTENSIONS
from tlbuild.errors import UsageError
from tlbuild.fileio import open_regular

# An input file with one of these suffixes (or "-" for stdin) is a list of image paths.
LIST_SUFFIXES = (".txt", ".lst", ".list")


def parse_extensions(text: str) -> tuple[str, ...]:
    """'jpg,PNG' -> ('.jpg', '.png'); '' -> every type tlbuild reads; a UsageError for ','."""
    if not text:
        return IMAGE_EXTENSIONS
    exts = tuple(
        "." + e.strip().lower().lstrip(".") for e in text.split(",") if e.strip().strip(".")
    )
    if not exts:
        raise UsageError(f"--ext '{text}' names no extension; e.g. --ext jpg,png")
    return exts


def check_inputs(inputs: Iterable[str]) -> list[str]:
    """Fail before any work if a named input does not exist (a typo should not run for hours)."""
    inputs = list(inputs)
    if not inputs:
        raise UsageError("name at least one INPUT: a folder, an image file or a list of paths")
    inputs = [local_path(raw) for raw in inputs]
    for raw in inputs:
        if raw == "-":
            continue
        if not (exists(raw) if is_url(raw) else os.path.exists(raw)):
            raise UsageError(f"input not found: {raw}")
    return inputs


class InputWalker:
    """Yields absolute image paths one at a time; problems with folders go to `warn`, not raise.

    Folders are read with os.scandir in file-system order and never sorted or listed whole, so
    memory stays flat however many files a folder holds. Symlinked folders are followed once:
    a folder reached again (a symlink loop, or two links to one folder) is reported and skipped.
    Names starting with '.' are skipped (editor and OS droppings such as ._IMG_1.jpg).
    """

    def __init__(
        self,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.extensions = extensions
        self.warn = warn or (lambda msg: None)
        self.ignored = 0  # files in folders with another extension
        self._seen_dirs: set[tuple[int, int]] = set()

    def __call__(self, inputs: Iterable[str]) -> Iterator[str]:
        for raw in inputs:
            if raw == "-":
                yield from self._list(sys.stdin, Path.cwd())
            elif is_url(raw):
                yield from self._remote(raw)
            elif os.path.isdir(raw):
                yield from self._walk(os.path.abspath(raw))
            elif raw.lower().endswith(LIST_SUFFIXES):
                try:
                    # A list that is a named pipe (or a device) is refused, not waited on;
                    # "-" is how a pipe is given on purpose.
                    with io.TextIOWrapper(open_regular(raw), encoding="utf-8") as f:
                        # abspath, not resolve: the same file must get the same path (and
                        # resume key) whether it comes from a list or a folder.
                        yield from self._list(f, Path(os.path.abspath(raw)).parent)
                except (OSError, UnicodeDecodeError) as e:
                    self.warn(f"cannot read path list {raw}: {e}")
            else:
                # A file named explicitly is classified whatever its extension.
                yield os.path.abspath(raw)

    def _remote(self, url: str) -> Iterator[str]:
        """Objects under a storage URL, as full URLs (the row's path), one listing per prefix."""
        fs, root = filesystem(url)
        try:
            if not fs.isdir(root):
                if url.lower().endswith(LIST_SUFFIXES):
                    text = fs.cat_file(root).decode("utf-8")
                    yield from self._list(text.splitlines(), url.rsplit("/", 1)[0])
                else:
                    yield url
                return
            for folder, subfolders, files in fs.walk(root):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                for name in files:
                    if name.startswith("."):
                        continue
                    if name.lower().endswith(self.extensions):
                        yield fs.unstrip_protocol(f"{folder.rstrip('/')}/{name}")
                    else:
                        self.ignored += 1
        except (OSError, UnicodeDecodeError) as e:
            self.warn(f"cannot list {url}: {e}")

    def _list(self, lines: Iterable[str], base: Path | str) -> Iterator[str]:
        """Paths from a list file: one per line, relative to the list's folder, '#' comments.

        In a list, a URL line is taken as it is, and a list held in storage names its relative
        lines under its own prefix."""
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                if is_url(line):
                    # A line ending in '/' is a prefix to walk; any other names one object
                    # (no request per line: lists run to millions of lines).
                    yield from self._remote(line) if line.endswith("/") else iter([line])
                    continue
                if isinstance(base, str) and is_url(base):
                    yield f"{base}/{line.lstrip('/')}"
                    continue
                p = os.path.join(base, os.path.expanduser(line))
                if os.path.isdir(p):
                    yield from self._walk(os.path.abspath(p))
                else:
                    yield os.path.abspath(p)  # a missing one becomes an error row

    def _walk(self, root: str) -> Iterator[str]:
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
            except OSError as e:
                self.warn(f"cannot read folder {folder}: {e.strerror}")
                continue
            key = (st.st_dev, st.st_ino)
            if key in self._seen_dirs:
                self.warn(f"skipped {folder}: already visited (symlink loop or second link)")
                continue
            self._seen_dirs.add(key)
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        if entry.name.startswith("."):
                            continue
                        try:
                            is_dir = entry.is_dir()  # follows symlinks
                        except OSError:
                            is_dir = False
                        if is_dir:
                            stack.append(entry.path)
                        elif entry.name.lower().endswith(self.extensions):
                            yield entry.path  # a broken link becomes an error row
                        else:
                            self.ignored += 1
            except OSError as e:
                self.warn(f"cannot read folder {folder}: {e.strerror or e}")
