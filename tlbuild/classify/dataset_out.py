"""Classify results as a Parquet dataset: a folder (local or s3://, gs://) of part files.

For outputs past what one file should hold (tens of millions of rows, or object storage, where
a file cannot be appended to). The folder holds:
- `_tlbuild.json`, the identity (model sha256, artifact, decision settings) every part shares;
- `part-<run>-<n>.parquet`, each written whole under a temporary name and renamed (a storage
  object appears only when its upload completes), so a part that can be read is complete;
- `_tlbuild.lock` while a run writes: one writer per folder.
Readers take the folder as one table: pandas.read_parquet(DIR), pyarrow.dataset, DuckDB
`read_parquet('DIR/*.parquet')`; they skip the `_` and `.` files by convention.

A part holds `part_rows` rows (default 50,000) or what `part_seconds` gathered, so a killed run
loses at most that much work; Ctrl-C and SIGTERM write the rows in hand first. `compact()`
merges small parts (from many short or resumed runs) into full ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from tlbuild.classify.options import PART_ROWS
from tlbuild.classify.results import (
    COLUMNS,
    IDENTITY_KEYS,
    META_KEY,
    PathIndex,
    check_columns,
    check_identity,
    count_rows,
    object_encodings,
    parquet_keys,
    results_frame,
    runs_list,
    signals_deferred,
)
from tlbuild.classify.storage import filesystem, is_url
from tlbuild.errors import DiskFullError, UsageError, disk_full
from tlbuild.fileio import (
    NotRegularFileError,
    atomic_path,
    dead_temp_files,
    open_own_file,
    quiet_fastparquet,
    read_record_text,
)

IDENTITY_FILE = "_tlbuild.json"
RUNS_FILE = "_runs.json"  # one record per finished run (its drift figures)
LOCK_FILE = "_tlbuild.lock"
PLAN_FILE = "_compact.json"
ASIDE = "_unreadable"
FORMAT = "tlbuild.classify.dataset/1"
# A storage lock not renewed for this long belongs to a run that died (parts are written at
# least every part_seconds, and each write renews it).
LEASE_SECONDS = 1800.0
# What a part file's name may be where the name comes from a file (the compaction plan): one
# plain name in the folder, so no plan can make a run delete anything else.
_PART_NAME = re.compile(r"part-[^/\\\x00]+\.parquet")


def is_dataset_out(out: str) -> bool:
    """`--out` names a dataset folder: it ends with '/', is an existing folder, or is a URL
    without a .parquet suffix (object storage cannot append to one file)."""
    if out.endswith("/"):
        return True
    if is_url(out):
        return not out.lower().endswith(".parquet")
    return os.path.isdir(out)


def _cols_from_frame(df: Any) -> dict[str, list[Any]]:
    """A part read back by fastparquet as COLUMNS lists, nulls as None (for rewriting it)."""
    import pandas as pd

    cols: dict[str, list[Any]] = {}
    for name, kind in COLUMNS.items():
        s = df[name]
        if kind == "timestamp":
            cols[name] = [int(v) // 1000 for v in s.astype("datetime64[ns, UTC]").astype("int64")]
        else:
            cols[name] = [None if (not isinstance(v, list) and pd.isna(v)) else v for v in s]
            if kind in ("Float32", "Int32", "Int64"):
                cast = float if kind == "Float32" else int
                cols[name] = [None if v is None else cast(v) for v in cols[name]]
            elif kind == "boolean":
                cols[name] = [None if v is None else bool(v) for v in cols[name]]
            elif kind == "json":
                cols[name] = [None if v is None else list(v) for v in cols[name]]
    return cols


class ResultsDataset:
    """Writes result rows as part files in a folder; same interface as ResultsFile."""

    def __init__(
        self,
        out: str,
        identity: dict[str, Any],
        overwrite: bool = False,
        retry_errors: bool = False,
        part_rows: int = PART_ROWS,
        part_seconds: float = 600.0,
        warn: Any = None,
    ) -> None:
        self.out = out.rstrip("/")
        self.fs, self.root = filesystem(self.out) if is_url(out) else _local_fs(self.out)
        self.local = not is_url(out)
        self.identity = {k: identity.get(k) for k in IDENTITY_KEYS}
        self.meta = dict(identity)
        self.retry_errors = retry_errors
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.warn = warn or (lambda msg: None)
        self.previous_rows = 0
        self.parts_written = 0
        self.rows_written = 0  # this run's rows in part files
        self._run = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.index = PathIndex()
        self._buf: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        self._buf_since = time.monotonic()
        self._lock: Any = None
        self._made: list[str] = []  # the folder and lock file this run created, newest last
        self._lease_renewed = 0.0
        self._open(overwrite)

    # -- paths --------------------------------------------------------------------------------
    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def parts(self) -> list[str]:
        """Names of the part files in the folder, oldest run first: regular files only (a named
        pipe would block the reader, and a folder is not a part)."""
        try:
            if self.local:
                with os.scandir(self.root) as it:
                    names = [e.name for e in it if e.is_file()]
            else:
                found = self.fs.ls(self.root, detail=True)
                names = [e["name"].rsplit("/", 1)[-1] for e in found if e.get("type") == "file"]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".parquet") and n[0] not in "._")

    def _read(self, name: str) -> bytes | str:
        """A small file of the folder (`_tlbuild.json`, the plan); a local one must be regular."""
        if not self.local:
            return self.fs.cat_file(self._p(name))
        try:
            return read_record_text(Path(self._p(name)))
        except NotRegularFileError as e:
            raise UsageError(f"{self.out}/{name} is {e.reason}; remove it") from None

    # -- opening ------------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise UsageError(f"--out {self.out}/ names a folder, but {self.out} is a file")
        if self.local and not os.path.isdir(self.root):
            self._made.append(self.root)
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the results folder {self.out}: {e}") from None
        try:
            self._take_lock()
            self._resume(overwrite)
        except BaseException:
            # A refused run leaves the folder as it found it: no lock file, no new folder.
            self._release_lock(undo=True)
            raise

    def _take_lock(self) -> None:
        if self.local:
            path = self._p(LOCK_FILE)
            for _ in range(10):
                made = not os.path.lexists(path)
                lock = open_own_file(path)  # held open while writing
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    lock.close()
                    raise UsageError(
                        f"another tlbuild classify is writing {self.out}/; wait for it or use "
                        "another --out"
                    ) from None
                # A refused run removes the lock file it made; one opened just before that
                # is then locked in vain, so the lock counts only if it is still the file's.
                with contextlib.suppress(OSError):
                    if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                        self._lock = lock
                        if made:
                            self._made.append(path)
                        return
                lock.close()
            raise UsageError(f"cannot lock {self.out}/{LOCK_FILE}: it keeps being replaced")
        # Object storage has no advisory locks: a lease object that each part write renews.
        path = self._p(LOCK_FILE)
        with contextlib.suppress(FileNotFoundError):
            held = json.loads(self.fs.cat_file(path))
            age = time.time() - float(held.get("renewed", 0))
            if age < LEASE_SECONDS:
                raise UsageError(
                    f"another tlbuild classify (host {held.get('host')}, pid {held.get('pid')}) "
                    f"wrote {self.out}/ {age:.0f} s ago; wait for it, or if that run is dead, "
                    f"delete {self.out}/{LOCK_FILE}"
                )
        self._lock = {"host": socket.gethostname(), "pid": os.getpid(), "run": self._run}
        self._renew_lease()

    def _renew_lease(self) -> None:
        if self.local or self._lock is None:
            return
        self._lease_renewed = time.monotonic()
        lease = json.dumps({**self._lock, "renewed": time.time()}).encode("utf-8")
        self.fs.pipe_file(self._p(LOCK_FILE), lease)

    def _release_lock(self, undo: bool = False) -> None:
        """Let go of the folder; `undo`: also remove the lock file and folder this run made."""
        if self.local:
            if undo:
                # Removed while still locked, newest first: the folder only if left empty.
                for made in reversed(self._made):
                    with contextlib.suppress(OSError):
                        (os.rmdir if made == self.root else os.unlink)(made)
            if self._lock is not None:
                self._lock.close()
        elif self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(LOCK_FILE))
        self._lock = None

    def _resume(self, overwrite: bool) -> None:
        found = self._read_identity()
        if overwrite:
            for name in self.parts():
                self.fs.rm_file(self._p(name))
            if self.fs.exists(self._p(RUNS_FILE)):
                self.fs.rm_file(self._p(RUNS_FILE))
            found = None
        elif found is None and self.parts():
            raise UsageError(
                f"{self.out}/ holds Parquet files that tlbuild classify did not write; "
                "use --overwrite to replace them, or another --out"
            )
        if found is not None:
            check_identity(found, self.identity, f"{self.out}/")
        # Only in a folder this run may write: a plan names files to delete.
        self._finish_compaction()
        if found is None:
            self._write_bytes(
                IDENTITY_FILE,
                json.dumps({"format": FORMAT, "identity": self.identity, "meta": self.meta}),
            )
        if self.local:  # files a killed run was writing when it died
            for p in dead_temp_files(Path(self.root)):
                p.unlink(missing_ok=True)
        for name in self.parts():
            self._read_part_keys(name)

    def _read_identity(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self._read(IDENTITY_FILE))
        except FileNotFoundError:
            return None
        except ValueError:
            raw = None
        found = raw.get("identity") if isinstance(raw, dict) else None
        if not isinstance(found, dict):
            raise UsageError(
                f"{self.out}/{IDENTITY_FILE} is damaged; use --overwrite to start over"
            )
        return found

    def _read_part_keys(self, name: str) -> None:
        """Index a readable part's paths; an unreadable one is set aside (its files redone)."""
        try:
            pf = quiet_fastparquet().ParquetFile(self._p(name), open_with=self.fs.open)
            keys, rows = parquet_keys(pf, self.retry_errors)
        except Exception as e:
            try:
                if self.local and os.path.islink(self._p(ASIDE)):  # it would lead out of the folder
                    raise OSError(f"{ASIDE} is a symbolic link")
                self.fs.makedirs(self._p(ASIDE), exist_ok=True)
                self.fs.mv(self._p(name), self._p(f"{ASIDE}/{name}"))
            except OSError as moving:
                raise UsageError(
                    f"{self.out}/{name} is not a readable Parquet file, and it cannot be moved to "
                    f"{ASIDE}/ ({moving}); move it out of the folder"
                ) from None
            self.warn(
                f"{self.out}/{name} is not a readable Parquet file ({type(e).__name__}); moved "
                f"to {ASIDE}/ and its files will be classified again"
            )
            return
        check_columns(list(pf.columns), f"{self.out}/{name}")  # one schema for every part
        self.index.add(keys)
        self.previous_rows += rows

    # -- the same calls as ResultsFile ----------------------------------------------------------
    def done(self, path: str) -> bool:
        """True if `path` already has a row."""
        return self.index.done(path)

    def claim(self, path: str) -> bool:
        """Take `path` for this run (see PathIndex.claim)."""
        return self.index.claim(path)

    def add(self, rows: dict[str, list[Any]]) -> None:
        """Buffer one batch; a part is written when it is full or old enough."""
        if not self._buf["path"]:
            self._buf_since = time.monotonic()
        for c in COLUMNS:
            self._buf[c].extend(rows[c])
        full = len(self._buf["path"]) >= self.part_rows
        if full or time.monotonic() - self._buf_since >= self.part_seconds:
            self._flush()
        elif time.monotonic() - self._lease_renewed > LEASE_SECONDS / 4:
            self._renew_lease()

    def kept(self) -> str:
        """Where this run's rows are now, in words: the last message of a run cut short."""
        n, lost = self.rows_written, len(self._buf["path"])
        said = "this run wrote no rows"
        if n:
            parts = f"{self.parts_written} part file{'s' * (self.parts_written != 1)}"
            said = f"the {count_rows(n)} this run wrote are in {parts} in {self.out}/"
        if lost:
            said += (
                f"; {count_rows(lost)} more could not be written (the next run redoes their files)"
            )
        return said

    def close(self) -> None:
        """Write the buffered rows as a last part and let go of the folder; safe to call twice."""
        if self._lock is None:
            return
        try:
            self._flush()
        finally:
            self._release_lock()

    # -- writing ------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._buf["path"]:
            return
        with signals_deferred():  # a part is written whole, even on Ctrl-C
            self._write_part(f"part-{self._run}-{self.parts_written + 1:05d}.parquet", self._buf)
            self.parts_written += 1
            self.rows_written += len(self._buf["path"])
            self._buf = {c: [] for c in COLUMNS}
            self.index.settle()
        self._renew_lease()

    def _write_part(self, name: str, cols: dict[str, list[Any]]) -> None:
        fastparquet = quiet_fastparquet()
        frame = results_frame(cols)
        kwargs = {
            "object_encoding": object_encodings(),
            "compression": "ZSTD",
            "custom_metadata": {META_KEY: json.dumps(self.meta)},
        }
        with self._disk_full_named(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fastparquet trips pandas deprecation warnings
            if not self.local:  # a storage object appears only when its upload completes
                fastparquet.write(self._p(name), frame, open_with=self.fs.open, **kwargs)
                return
            # A fresh temporary name (never a planted symlink), removed if the write fails.
            with atomic_path(Path(self._p(name))) as tmp:
                fastparquet.write(str(tmp), frame, **kwargs)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())

    def record_run(self, record: dict[str, Any]) -> None:
        """Append `record` to the folder's runs file."""
        try:
            text = self._read(RUNS_FILE)
        except (OSError, ValueError, UsageError):  # missing, damaged or not a regular file
            text = None
        self._write_bytes(RUNS_FILE, json.dumps([*runs_list(text), record], indent=1))

    def _write_bytes(self, name: str, text: str) -> None:
        with self._disk_full_named():
            if self.local:
                with atomic_path(Path(self._p(name))) as tmp:
                    tmp.write_text(text, encoding="utf-8")
            else:
                self.fs.pipe_file(self._p(name), text.encode("utf-8"))

    @contextlib.contextmanager
    def _disk_full_named(self) -> Any:
        """A full disk while writing into the folder is a DiskFullError naming the folder."""
        try:
            yield
        except (OSError, RuntimeError, DiskFullError) as e:
            if disk_full(e) is None:
                raise
            raise DiskFullError(f"{self.out}/") from e

    # -- compaction ---------------------------------------------------------------------------
    def compact(self, target_rows: int | None = None) -> tuple[int, int]:
        """Merge parts smaller than `target_rows` into full ones; (parts before, parts after).

        Crash-safe by a plan file: the new parts are written, the plan marked published, then
        the old parts removed; the next open finishes or undoes a plan a kill interrupted.
        Readers that list the folder while it runs can see rows twice: compact between runs.
        """
        self._flush()
        target = target_rows or self.part_rows
        fastparquet = quiet_fastparquet()
        small: list[tuple[str, int]] = []
        for name in self.parts():
            rows = fastparquet.ParquetFile(self._p(name), open_with=self.fs.open).count()
            if rows < target:
                small.append((name, int(rows)))
        before = len(self.parts())
        if len(small) < 2:
            return before, before
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-c" + uuid.uuid4().hex[:5]
        groups: list[list[str]] = [[]]
        count = 0
        for name, rows in small:
            if count >= target:
                groups.append([])
                count = 0
            groups[-1].append(name)
            count += rows
        groups = [g for g in groups if len(g) > 1]
        removes = [n for g in groups for n in g]
        adds = [f"part-{stamp}-{i + 1:05d}.parquet" for i in range(len(groups))]
        plan = {"remove": removes, "add": adds, "published": False}
        self._write_bytes(PLAN_FILE, json.dumps(plan))
        for name, group in zip(adds, groups, strict=True):
            merged: dict[str, list[Any]] = {c: [] for c in COLUMNS}
            for part in group:
                df = fastparquet.ParquetFile(self._p(part), open_with=self.fs.open).to_pandas()
                for c, values in _cols_from_frame(df).items():
                    merged[c].extend(values)
            self._write_part(name, merged)
        self._write_bytes(PLAN_FILE, json.dumps({**plan, "published": True}))
        self._finish_compaction()
        return before, len(self.parts())

    def _finish_compaction(self) -> None:
        try:
            raw = self._read(PLAN_FILE)
        except FileNotFoundError:
            return
        try:
            plan = json.loads(raw)
        except ValueError:
            plan = None
        # The plan names files to delete: only part files of this folder, or nothing at all.
        if not (
            isinstance(plan, dict)
            and all(
                isinstance(plan.get(key), list)
                and all(isinstance(n, str) and _PART_NAME.fullmatch(n) for n in plan[key])
                for key in ("remove", "add")
            )
        ):
            raise UsageError(
                f"{self.out}/{PLAN_FILE} is damaged or names files that are not part files of "
                f"the folder, so no file was removed; check the part files, then delete "
                f"{PLAN_FILE}"
            )
        # Published: every new part is whole, so the old ones go; otherwise the new ones do.
        for name in plan["remove"] if plan.get("published") is True else plan["add"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(name))
        self.fs.rm_file(self._p(PLAN_FILE))


def _local_fs(path: str) -> tuple[Any, str]:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), os.path.abspath(path)
