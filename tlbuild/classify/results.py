"""The classify results file: Parquet that is always readable, resumable, and loses at most a batch.

How it stays safe when the process is killed at any moment:
- every finished batch is appended (and flushed) to a JSON-lines journal beside the file,
  `<out>.journal`, so a kill loses at most the batch in flight;
- every few thousand rows (or seconds) the buffered rows become a new row group: the Parquet file
  is copied, the group appended to the copy, and the copy renamed over the original, so the file
  on disk is always a complete Parquet file (pandas, pyarrow, DuckDB) that never lags the journal
  by more than one commit;
- the next run with the same --out folds the journal back in before it continues.
Appending a row group per batch in place would be simpler, but a kill during the footer write
leaves a file no reader can open, and thousands of tiny row groups make every reader slow.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.errors import DiskFullError, UsageError, disk_full
from tlbuild.fileio import atomic_path, open_own_file, quiet_fastparquet, read_record_text

# Column -> how it is stored. Documented in docs/classify.md ("Classify results schema").
COLUMNS: dict[str, str] = {
    "path": "utf8",
    "label": "utf8",
    "score": "Float32",
    "topk_labels": "json",
    "topk_scores": "json",
    "ok_score": "Float32",
    "defective": "boolean",
    "decided_by": "utf8",
    "novelty": "Float32",
    "novel": "boolean",
    "brightness": "Float32",
    "sharpness": "Float32",
    "width": "Int32",
    "height": "Int32",
    "file_size": "Int64",
    "error": "utf8",
    "model_sha256": "utf8",
    "artifact": "utf8",
    "precision": "utf8",
    "classified_at": "timestamp",
}
META_KEY = "tlbuild.classify"
# Settings that must match for a resumed run to append to the same file.
IDENTITY_KEYS = (
    "model_sha256",
    "artifact",
    "ok_class",
    "threshold",
    "novelty_threshold",
    "topk",
    "decode",
)
# A row group holds at least commit_rows rows and grows with the file (each commit copies the
# file, so a fixed size would copy O(rows^2) bytes), up to this many buffered rows (memory).
MAX_GROUP_ROWS = 65_536


def _fits(value: Any, kind: str) -> bool:
    """Whether a journal value can be stored as a COLUMNS `kind` (None is a null)."""
    if value is None:
        return kind != "timestamp"
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "utf8":
        return isinstance(value, str)
    if kind == "json":
        return isinstance(value, list)
    if kind == "Float32":
        return isinstance(value, int | float) and not abs(value) > 3.4e38
    if isinstance(value, int):
        limit = {"Int32": 2**31, "Int64": 2**63, "timestamp": 9 * 10**15}.get(kind, 0)
        return -limit <= value < limit
    return False


def journal_row(line: bytes | str) -> dict[str, Any] | None:
    """A journal line as a row of every column, or None if it is not one (torn by a kill, or
    damaged): the journal is read back from disk, so nothing in it is trusted unchecked."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("path"), str):
        return None
    if not all(c in row and _fits(row[c], kind) for c, kind in COLUMNS.items()):
        return None
    return row


def check_columns(found: list[str], where: str) -> None:
    """Refuse to append to results whose columns are not this tlbuild's (an older version's)."""
    if found != list(COLUMNS):
        missing = [c for c in COLUMNS if c not in found]
        raise UsageError(
            f"{where} has the columns of another tlbuild version"
            + (f" (no {', '.join(missing)})" if missing else "")
            + "; use --overwrite to start over, or another --out"
        )


def runs_list(text: str | bytes | None) -> list[Any]:
    """A runs file's records; a damaged or foreign one starts a new list."""
    try:
        found = json.loads(text) if text else []
    except ValueError:
        return []
    return found if isinstance(found, list) else []


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Add `record` to the JSON list at `path` (a new list if missing or damaged)."""
    try:
        text = read_record_text(path)
    except (OSError, ValueError):  # missing, not a regular file, not UTF-8 or far too large
        text = None
    runs = [*runs_list(text), record]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(runs, indent=1), encoding="utf-8")


def count_rows(n: int) -> str:
    """'1 row', '1,204 rows'."""
    return f"{n:,} row{'s' * (n != 1)}"


def path_key(path: str) -> int:
    """A 64-bit key for a path: the resume index holds 8 bytes per row, not the strings."""
    return int.from_bytes(
        hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little"
    )


def storable(path: str) -> str:
    """A path as valid UTF-8 (undecodable bytes in file names become \\x escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def results_frame(cols: dict[str, list[Any]]):  # noqa: ANN201 - pandas imported lazily
    """The rows as a DataFrame typed per COLUMNS, so every file and part has one schema."""
    import pandas as pd

    data: dict[str, Any] = {}
    for name, kind in COLUMNS.items():
        values = cols[name]
        if kind in ("utf8", "json"):
            data[name] = pd.Series(values, dtype=object)
        elif kind == "timestamp":
            data[name] = pd.to_datetime(np.asarray(values, np.int64), unit="us", utc=True)
        else:
            data[name] = pd.array(values, dtype=kind)
    return pd.DataFrame(data)


def object_encodings() -> dict[str, str]:
    """fastparquet's object_encoding for the text and JSON columns."""
    """fastparquet's object_encoding for the text and JSON columns."""
    return {n: k for n, k in COLUMNS.items() if k in ("utf8", "json")}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM until the block ends, then deliver them (main thread only).

    Python runs signal handlers in the main thread whichever thread the kernel picked, so
    swapping the handlers (not the thread's signal mask) is what keeps the block whole.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:  # None: installed outside Python; leave ours (harmless)
                signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


class PathIndex:
    """Which paths already have a row: 8-byte keys from earlier runs (a sorted array, so memory
    is flat in the number of rows) plus the keys claimed since the last write (a set)."""

    def __init__(self) -> None:
        self._done = np.zeros(0, np.uint64)
        self._pending: set[int] = set()

    def add(self, keys: np.ndarray) -> None:
        """Mark these keys as having a row."""
        self._done = np.union1d(self._done, np.asarray(keys, np.uint64))

    def settle(self) -> None:
        """The claimed keys' rows are written: keep them with the others."""
        if self._pending:
            self.add(np.fromiter(self._pending, np.uint64, len(self._pending)))
            self._pending.clear()

    def _has(self, key: int) -> bool:
        if key in self._pending:
            return True
        k = np.uint64(key)
        i = int(np.searchsorted(self._done, k))
        return i < self._done.size and self._done[i] == k

    def done(self, path: str) -> bool:
        """True if `path` already has a row (from an earlier run, or claimed in this one)."""
        return self._has(path_key(storable(path)))

    def claim(self, path: str) -> bool:
        """Take `path` for this run: False if it already has a row or was taken (a folder and
        a list naming the same file), so it is classified once. One hash per discovered file."""
        key = path_key(storable(path))
        if self._has(key):
            return False
        self._pending.add(key)
        return True


def parquet_keys(pf: Any, retry_errors: bool) -> tuple[np.ndarray, int]:
    """Path keys of the rows in a results ParquetFile (without error rows when they are to be
    retried), and its row count; read a row group at a time."""
    parts = [np.zeros(0, np.uint64)]
    rows = 0
    for df in pf.iter_row_groups(columns=["path", "error"]):
        paths = df["path"][df["error"].isna()] if retry_errors else df["path"]
        parts.append(np.fromiter((path_key(p) for p in paths), np.uint64, len(paths)))
        rows += len(df)
    return np.concatenate(parts), rows


def check_identity(found: dict[str, Any], identity: dict[str, Any], where: str) -> None:
    """Refuse to add rows to results written by another model or settings, saying which."""
    diffs = [
        f"{k}: {found.get(k)!r} there, {identity[k]!r} now"
        for k in IDENTITY_KEYS
        if found.get(k) != identity[k]
    ]
    if not diffs:
        return
    hint = ""
    only_decode = [k for k in IDENTITY_KEYS if found.get(k) != identity[k]] == ["decode"]
    if only_decode and found.get("decode") == "jpeg-draft":
        # The full decode became the default: an older run's file continues with the option.
        hint = " To continue it as it was written, add --no-exact-decode."
    raise UsageError(
        f"{where} holds results of another model or settings ({'; '.join(diffs)}). "
        f"Use --overwrite to start over, or another --out.{hint}"
    )


class ResultsFile:
    """Appends rows to `out`; `done(path)` says whether a previous run already classified it."""

    def __init__(
        self,
        out: Path,
        identity: dict[str, Any],
        overwrite: bool = False,
        retry_errors: bool = False,
        commit_rows: int = 4096,
        commit_seconds: float = 15.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.out = Path(out)
        self.identity = {k: identity.get(k) for k in IDENTITY_KEYS}
        self.meta = dict(identity)
        self.commit_rows = commit_rows
        self.retry_errors = retry_errors
        self.commit_seconds = commit_seconds
        self.journal_path = self.out.with_name(self.out.name + ".journal")
        # One record per finished run (its drift figures), for dashboards to plot run by run.
        self.runs_path = self.out.with_name(self.out.name + ".runs.json")
        self.warn = warn or (lambda msg: None)
        self.previous_rows = 0
        self.rows_added = 0  # this run's rows, journaled
        self.rows_committed = 0  # of those, the ones in the Parquet file
        self.index = PathIndex()
        self._rows_in_file = 0
        self._buf: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        self._buf_added = 0  # rows in _buf that this run added (the rest were folded in)
        self._last_commit = time.monotonic()
        self._journal: Any = None  # an unbuffered binary file: no write is left half-pending
        self._open(overwrite)

    # -- opening and resuming -------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        if self.out.is_dir():
            raise UsageError(f"--out {self.out} is a folder; name a .parquet file")
        if self.out.exists() and not self.out.is_file():
            raise UsageError(f"--out {self.out} is not a regular file; name a .parquet file")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            journal = self._open_journal()
        except OSError as e:
            raise UsageError(f"cannot write beside {self.out}: {e.strerror}") from None
        try:
            fcntl.flock(journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            journal.close()
            raise UsageError(
                f"another tlbuild classify is writing {self.out}; wait for it or use another --out"
            ) from None
        self._journal = journal
        try:
            self._resume(overwrite)
        except BaseException:
            # A refused run leaves the folder as it found it (no empty journal behind).
            journal.seek(0, os.SEEK_END)
            if journal.tell() == 0:
                self.journal_path.unlink(missing_ok=True)
            journal.close()
            self._journal = None
            raise

    def _open_journal(self) -> Any:
        """The journal, for reading and appending: never through a link (truncating it would
        truncate whatever it points to), never a pipe (folding it in would block)."""
        return open_own_file(self.journal_path, append=True)

    def _resume(self, overwrite: bool) -> None:
        if overwrite:
            self.out.unlink(missing_ok=True)
            self.runs_path.unlink(missing_ok=True)
            self._reset_journal()
            return
        if self.out.exists():
            self._check_identity(self._file_identity(), str(self.out))
            pf = quiet_fastparquet().ParquetFile(str(self.out))
            check_columns(list(pf.columns), str(self.out))
            self.index.add(parquet_keys(pf, self.retry_errors)[0])
        self._fold_journal()

    def _file_identity(self) -> dict[str, Any]:
        try:
            pf = quiet_fastparquet().ParquetFile(str(self.out))
        except Exception as e:
            raise UsageError(
                f"{self.out} exists but is not a readable Parquet file ({e}); "
                "use --overwrite to replace it, or another --out"
            ) from None
        raw = pf.key_value_metadata.get(META_KEY)
        try:
            found = json.loads(raw) if raw is not None else None
        except ValueError:
            found = None
        if not isinstance(found, dict):
            raise UsageError(
                f"{self.out} was not written by tlbuild classify; "
                "use --overwrite to replace it, or another --out"
            )
        self.previous_rows = self._rows_in_file = int(pf.count())
        return found

    def _check_identity(self, found: dict[str, Any], where: str) -> None:
        check_identity(found, self.identity, where)

    def _fold_journal(self) -> None:
        """Rows journaled by a run that was killed go into the file before anything new."""
        assert self._journal is not None
        self._journal.seek(0)
        lines = self._journal.read().split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        if lines:
            try:
                header = json.loads(lines[0])
            except ValueError:
                header = {}
            header = header if isinstance(header, dict) else {}
            if header.get("journal") == META_KEY:
                identity = header.get("identity")
                identity = identity if isinstance(identity, dict) else {}
                self._check_identity(identity, str(self.journal_path))
                rows = [journal_row(line) for line in lines[1:]]
                # The last line is torn when a kill came mid-write; any other bad line was
                # damaged on disk: its file is classified again, like one never journaled.
                damaged = sum(r is None for r in rows[:-1])
                if damaged:
                    self.warn(
                        f"{self.journal_path}: {damaged} damaged line(s) skipped; their files "
                        "will be classified again"
                    )
                rows = [r for r in rows if r is not None]
                # A kill between the file's rename and the journal's reset leaves rows twice.
                fresh = [r for r in rows if not self.done(r["path"])]
                for r in fresh:
                    for c in COLUMNS:
                        self._buf[c].append(r[c])
                self.previous_rows += len(fresh)
                # With retry_errors, failed files stay to do: their rows are kept all the same.
                done = [r for r in fresh if not (self.retry_errors and r["error"] is not None)]
                self.index.add(np.fromiter((path_key(r["path"]) for r in done), np.uint64))
        self._commit()

    # -- writing ----------------------------------------------------------------------------
    def done(self, path: str) -> bool:
        """True if `path` already has a row (from an earlier run, or earlier in this one)."""
        return self.index.done(path)

    def claim(self, path: str) -> bool:
        """Take `path` for this run (see PathIndex.claim)."""
        return self.index.claim(path)

    def add(self, rows: dict[str, list[Any]]) -> None:
        """Append one batch (columnar, every column of COLUMNS): journaled now, committed soon."""
        n = len(rows["path"])
        lines = [json.dumps({c: rows[c][i] for c in COLUMNS}) for i in range(n)]
        self._journal_write(("\n".join(lines) + "\n").encode("utf-8"))
        self.rows_added += n
        self._buf_added += n
        for c in COLUMNS:
            self._buf[c].extend(rows[c])
        group = min(MAX_GROUP_ROWS, max(self.commit_rows, self._rows_in_file // 8))
        # The first batch is committed at once, so the file (and any write problem) shows early.
        buffered = len(self._buf["path"])
        # A timed commit also needs 1/64 of the file in new rows, so copies stay bounded.
        if (
            not self.out.exists()
            or buffered >= group
            or (
                time.monotonic() - self._last_commit >= self.commit_seconds
                and buffered >= self._rows_in_file // 64
            )
        ):
            self._commit()

    def _journal_write(self, data: bytes) -> None:
        """Append `data` to the journal whole, or leave the journal as it was and raise (a full
        disk is a DiskFullError naming the results file)."""
        assert self._journal is not None
        fd = self._journal.fileno()
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            # A batch half on disk would be folded in half; the rows in memory decide.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            if disk_full(e) is None:
                raise
            raise DiskFullError(self.out) from e

    def _commit(self) -> None:
        fastparquet = quiet_fastparquet()
        if not self._buf["path"]:
            self._reset_journal()
            return
        df = results_frame(self._buf)
        # Ctrl-C / SIGTERM wait until the file, the buffer and the journal agree again: an
        # interrupt between the rename and the reset would commit the same rows twice.
        with signals_deferred():
            # fastparquet trips pandas' deprecation warnings; users should not see them per run.
            with warnings.catch_warnings(), atomic_path(self.out) as tmp:
                warnings.simplefilter("ignore")
                if self.out.exists():
                    shutil.copyfile(self.out, tmp)
                    fastparquet.write(
                        str(tmp),
                        df,
                        append=True,
                        object_encoding=object_encodings(),
                        compression="ZSTD",
                    )
                else:
                    fastparquet.write(
                        str(tmp),
                        df,
                        object_encoding=object_encodings(),
                        compression="ZSTD",
                        custom_metadata={META_KEY: json.dumps(self.meta)},
                    )
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            self._rows_in_file += len(df)
            self.rows_committed += self._buf_added
            self._buf_added = 0
            self._buf = {c: [] for c in COLUMNS}
            self.index.settle()
            self._reset_journal()

    def _reset_journal(self) -> None:
        assert self._journal is not None
        os.ftruncate(self._journal.fileno(), 0)
        header = json.dumps({"journal": META_KEY, "identity": self.identity}) + "\n"
        self._journal_write(header.encode("utf-8"))
        self._last_commit = time.monotonic()

    def record_run(self, record: dict[str, Any]) -> None:
        """Append `record` to the runs file beside the results (atomically)."""
        append_record(self.runs_path, record)

    def kept(self) -> str:
        """Where this run's rows are now, in words: the last message of a run cut short."""
        n, in_file = self.rows_added, self.rows_committed
        if n == 0:
            return "this run wrote no rows"
        if in_file == n:
            return f"the {count_rows(n)} this run wrote are in {self.out}"
        journal = f"its journal {self.journal_path}, which the next run with this --out folds in"
        if in_file == 0:
            return f"the {count_rows(n)} this run wrote are in {journal}"
        split = f"{in_file:,} are in {self.out} and {n - in_file:,} in {journal}"
        return f"of the {count_rows(n)} this run wrote, {split}"

    def close(self) -> None:
        """Commit what is buffered and remove the journal; safe to call twice.

        If the commit fails the journal stays, with every row not yet in the file."""
        if self._journal is None:
            return
        try:
            self._commit()
            self.journal_path.unlink(missing_ok=True)
        finally:
            self._journal.close()
            self._journal = None
