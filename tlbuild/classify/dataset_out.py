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
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from tlbuild.classify.results import (
    COLUMNS,
    IDENTITY_KEYS,
    META_KEY,
    PathIndex,
    object_encodings,
    parquet_keys,
    results_frame,
    signals_deferred,
)
from tlbuild.classify.storage import filesystem, is_url
from tlbuild.errors import UsageError
from tlbuild.fileio import quiet_fastparquet

IDENTITY_FILE = "_tlbuild.json"
LOCK_FILE = "_tlbuild.lock"
PLAN_FILE = "_compact.json"
ASIDE = "_unreadable"
FORMAT = "tlbuild.classify.dataset/1"
PART_ROWS = 50_000
# A storage lock not renewed for this long belongs to a run that died (parts are written at
# least every part_seconds, and each write renews it).
LEASE_SECONDS = 1800.0


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
        self._run = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.index = PathIndex()
        self._buf: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        self._buf_since = time.monotonic()
        self._lock: Any = None
        self._lease_renewed = 0.0
        self._open(overwrite)

    # -- paths --------------------------------------------------------------------------------
    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def parts(self) -> list[str]:
        """Names of the part files in the folder, oldest run first."""
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".parquet") and n[0] not in "._")

    # -- opening ------------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        if self.local and os.path.isfile(self.root):
            raise UsageError(f"--out {self.out}/ names a folder, but {self.out} is a file")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the results folder {self.out}: {e}") from None
        self._take_lock()
        try:
            self._finish_compaction()
            self._resume(overwrite)
        except BaseException:
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        if self.local:
            lock = open(self._p(LOCK_FILE), "a+")  # noqa: SIM115 - held open while writing
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise UsageError(
                    f"another tlbuild classify is writing {self.out}/; wait for it or use "
                    "another --out"
                ) from None
            self._lock = lock
            return
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

    def _release_lock(self) -> None:
        if self._lock is None:
            return
        if self.local:
            self._lock.close()
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(LOCK_FILE))
        self._lock = None

    def _resume(self, overwrite: bool) -> None:
        found = self._read_identity()
        if overwrite:
            for name in self.parts():
                self.fs.rm_file(self._p(name))
            found = None
        elif found is None and self.parts():
            raise UsageError(
                f"{self.out}/ holds Parquet files that tlbuild classify did not write; "
                "use --overwrite to replace them, or another --out"
            )
        if found is not None:
            diffs = [
                f"{k}: {found.get(k)!r} there, {self.identity[k]!r} now"
                for k in IDENTITY_KEYS
                if found.get(k) != self.identity[k]
            ]
            if diffs:
                raise UsageError(
                    f"{self.out}/ holds results of another model or settings "
                    f"({'; '.join(diffs)}). Use --overwrite to start over, or another --out."
                )
        else:
            self._write_bytes(
                IDENTITY_FILE,
                json.dumps({"format": FORMAT, "identity": self.identity, "meta": self.meta}),
            )
        if self.local:  # parts a killed run was writing when it died
            for name in os.listdir(self.root):
                if name.startswith(".part-") and name.endswith(".tmp"):
                    os.unlink(self._p(name))
        for name in self.parts():
            self._read_part_keys(name)

    def _read_identity(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self.fs.cat_file(self._p(IDENTITY_FILE)))
        except FileNotFoundError:
            return None
        except ValueError:
            raise UsageError(
                f"{self.out}/{IDENTITY_FILE} is damaged; use --overwrite to start over"
            ) from None
        return raw.get("identity", {})

    def _read_part_keys(self, name: str) -> None:
        """Index a readable part's paths; an unreadable one is set aside (its files redone)."""
        try:
            pf = quiet_fastparquet().ParquetFile(self._p(name), open_with=self.fs.open)
            keys, rows = parquet_keys(pf, self.retry_errors)
        except Exception as e:
            self.fs.makedirs(self._p(ASIDE), exist_ok=True)
            self.fs.mv(self._p(name), self._p(f"{ASIDE}/{name}"))
            self.warn(
                f"{self.out}/{name} is not a readable Parquet file ({type(e).__name__}); moved "
                f"to {ASIDE}/ and its files will be classified again"
            )
            return
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
            self.parts_written += 1
            self._write_part(f"part-{self._run}-{self.parts_written:05d}.parquet", self._buf)
            self._buf = {c: [] for c in COLUMNS}
            self.index.settle()
        self._renew_lease()

    def _write_part(self, name: str, cols: dict[str, list[Any]]) -> None:
        fastparquet = quiet_fastparquet()
        final = self._p(name)
        target = self._p(f".{name}.tmp") if self.local else final
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fastparquet trips pandas deprecation warnings
            fastparquet.write(
                target,
                results_frame(cols),
                object_encoding=object_encodings(),
                compression="ZSTD",
                custom_metadata={META_KEY: json.dumps(self.meta)},
                open_with=self.fs.open,
            )
        if self.local:
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(target, final)

    def _write_bytes(self, name: str, text: str) -> None:
        if self.local:
            tmp = self._p(f".{name}.tmp")
            Path(tmp).write_text(text, encoding="utf-8")
            os.replace(tmp, self._p(name))
        else:
            self.fs.pipe_file(self._p(name), text.encode("utf-8"))

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
            plan = json.loads(self.fs.cat_file(self._p(PLAN_FILE)))
        except FileNotFoundError:
            return
        # Published: every new part is whole, so the old ones go; otherwise the new ones do.
        for name in plan["remove"] if plan.get("published") else plan["add"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(name))
        self.fs.rm_file(self._p(PLAN_FILE))


def _local_fs(path: str) -> tuple[Any, str]:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), os.path.abspath(path)
