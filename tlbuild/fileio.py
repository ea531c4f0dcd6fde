"""Atomic file writes and hashing: a killed run never leaves a complete-looking half file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder so os.replace is a rename on one filesystem; the suffix is kept because
    # some writers (torch.onnx, PIL, matplotlib) pick the format from it.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, pretty-printed and key-ordered as given."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_recorded_json(path: Path, hint: str) -> Any:
    """A JSON file an earlier stage wrote; a UsageError ending in `hint` if missing or damaged."""
    from tlbuild.errors import UsageError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise UsageError(f"no {path}; {hint}") from None
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; {hint}") from None


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when the file does not exist (yet)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
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
