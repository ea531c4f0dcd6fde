"""Atomic file writes and hashing: a killed run never leaves a complete-looking half file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

# fileio's temporary files are named ".<stem>.<pid>-<random>.tmp<suffix>": the writer's pid
# tells a leftover of a dead run from a file another live process is still writing.
_TEMP = re.compile(r"^\..*\.(\d+)-[^.]+\.tmp(\.[^.]*)?$")
# Before, ".<stem>.<random>.tmp<suffix>": only a tlbuild older than this one writes such a name,
# so one found now is a leftover of a killed run of it.
_OLD_TEMP = re.compile(r"^\..+\.[a-z0-9_]+\.tmp(\.[^.]*)?$")


def _temp_path(path: Path) -> Path:
    """A new empty file beside `path` with a temporary name (a killed writer's is removed by the
    next build)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder so os.replace is a rename on one filesystem; the suffix is kept because
    # some writers (torch.onnx, PIL, matplotlib) pick the format from it.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.{os.getpid()}-", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A full disk inside the block is a DiskFullError naming `path`."""
    path = Path(path)
    tmp_path = _temp_path(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as e:
        from tlbuild.errors import DiskFullError, disk_full

        # Writers wrap ENOSPC in their own errors (found in the chain), and torch.save drops
        # the errno ("unexpected pos ..."): that failure on a file system with next to nothing
        # left is the full disk it almost surely is. Nothing else is guessed at.
        full = disk_full(e) is not None or (
            isinstance(e, RuntimeError) and "unexpected pos" in str(e) and _nearly_full(path.parent)
        )
        inner_temp = isinstance(e, DiskFullError) and _TEMP.match(Path(str(e.path)).name)
        if (isinstance(e, DiskFullError) and not inner_temp) or not full:
            raise
        raise DiskFullError(path) from e  # named for the file the user knows, not its temp
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def dead_temp_files(folder: Path) -> list[Path]:
    """atomic_path's temporary files in `folder` whose writer has exited (a killed run's)."""
    found = []
    for p in Path(folder).glob(".*.tmp*"):
        m = _TEMP.match(p.name)
        dead = not _alive(int(m.group(1))) if m is not None else bool(_OLD_TEMP.match(p.name))
        if dead and p.is_file():
            found.append(p)
    return found


def write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, pretty-printed and key-ordered as given."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# Far above any record tlbuild writes (manifests and splits of a million images are tens of MB).
MAX_RECORD_BYTES = 256 << 20


def read_record_text(path: Path) -> str:
    """A record file's text (JSON, a list): only a regular file, at most MAX_RECORD_BYTES.

    OSError if it is missing or not a regular file (a pipe must not hang the reader), and
    ValueError if it is not UTF-8 or too large."""
    with open_regular(path) as f:
        data = f.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES >> 20} MiB")
    return data.decode("utf-8")


def read_recorded_json(path: Path, hint: str) -> Any:
    """A JSON file an earlier stage wrote; a UsageError ending in `hint` if missing or damaged."""
    from tlbuild.errors import UsageError

    try:
        return json.loads(read_record_text(path))
    except OSError as e:
        why = e.reason if isinstance(e, NotRegularFileError) else "missing or unreadable"
        raise UsageError(f"{path}: {why}; {hint}") from None
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; {hint}") from None


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when the file does not exist (yet); a UsageError when it is
    damaged (gates read it: a damaged file must fail loudly, never read as "not measured")."""
    if not os.path.lexists(path):
        return {}
    found = read_recorded_json(path, "run `tlbuild run` again to rewrite it")
    if not isinstance(found, dict):
        from tlbuild.errors import UsageError

        raise UsageError(f"{path} is not a JSON object; run `tlbuild run` again to rewrite it")
    return found


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file, read in chunks (NotRegularFileError for anything else)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quiet_fastparquet():  # noqa: ANN201 - the fastparquet module, imported lazily
    """Import fastparquet without the pandas deprecation warnings it trips on import."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fastparquet
    return fastparquet


def write_parquet(path: Path, df: Any, object_encoding: dict[str, str] | str = "infer") -> None:
    """Write a pandas DataFrame as one Parquet file (ZSTD), atomically.

    `object_encoding`: fastparquet's, per column (`{"topk": "json"}`) where inference from the
    values could fail (a column of nulls) or guess wrong."""
    import warnings

    fastparquet = quiet_fastparquet()
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        fastparquet.write(str(tmp), df, compression="ZSTD", object_encoding=object_encoding)


def plain_name(name: object) -> bool:
    """Whether `name` is one file name that stays inside the folder it is joined to.

    Names read from files tlbuild did not just write (a manifest, a part list, a plan) pass this
    before they are joined to a folder: no separators, no '..', nothing absolute, no NUL.
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


class NotRegularFileError(OSError):
    """Not a regular file (a pipe, a device, a socket, a folder); `reason` says which."""

    def __init__(self, path: Path | str, kind: str) -> None:
        self.reason = f"not a regular file: {kind}"
        super().__init__(self.reason)
        self.path = path


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_unless_regular(path: Path | str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")
        raise NotRegularFileError(path, kind)


def open_own_file(path: Path | str, append: bool = False) -> BinaryIO:
    """Open (creating it) a file tlbuild keeps beside its outputs, a lock or a journal, for
    reading and writing: a UsageError, naming it, if it is a link or not a regular file.

    Never through a link (what is written would land in its target, wherever that is) and
    never a pipe or device (the first read would block)."""
    from tlbuild.errors import UsageError

    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | (os.O_APPEND if append else 0), 0o666)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
        raise UsageError(f"{path} {why}; remove it, or write somewhere else") from None
    try:
        _refuse_unless_regular(path, os.fstat(fd).st_mode)
    except NotRegularFileError as e:
        os.close(fd)
        raise UsageError(f"{path} is {e.reason}; remove it, or write somewhere else") from None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a+b" if append else "r+b", buffering=0)


def open_regular(path: Path | str) -> BinaryIO:
    """Open `path` (symlinks followed) for binary reading if it is a regular file, else raise
    NotRegularFileError: a named pipe in a folder of images must not hang the reader."""
    # Stat first so no device is ever opened (opening some has effects: a tape rewinds, a
    # watchdog arms). O_NONBLOCK: a pipe swapped in after the stat still cannot block open().
    _refuse_unless_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        _refuse_unless_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)  # reads of a regular file then behave as after a plain open()
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
