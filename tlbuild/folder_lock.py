"""One writer per export folder: a lock held for a whole command, naming who holds it.

Two builds writing one folder delete each other's temporary files and set-aside readers, and
the second one can report "Build done" about a model the first one replaced. The lock is an
fcntl lock on `<folder>/.tlbuild.lock`, so the kernel drops it when its holder dies, however
it dies: a lock file left behind by a killed run never blocks the next one. The file itself
is never deleted (unlinking a lock file lets a third process lock a new one beside it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlbuild.errors import UsageError
from tlbuild.fileio import open_own_file

LOCK_FILE = ".tlbuild.lock"
# Set while a lock is held, for the processes this one starts (the torchrun training of
# `run --nproc-per-node`): "<lock path>=<token>". A child whose token matches the holder's
# works under its parent's lock instead of being refused by it.
INHERITED = "TLBUILD_FOLDER_LOCK"


class FolderBusyError(UsageError):
    """Another tlbuild process is writing the folder."""


def _holder(f: Any) -> dict[str, Any]:
    f.seek(0)
    try:
        found = json.loads(f.read().decode("utf-8") or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _inherited(path: Path, holder: dict[str, Any]) -> bool:
    token = holder.get("token")
    return bool(token) and os.environ.get(INHERITED) == f"{path.resolve()}={token}"


def describe(holder: dict[str, Any]) -> str:
    """'pid 1234 on host: tlbuild run r.toml, since 06:12:03 UTC' (what the lock file says)."""
    if not holder:
        return "another process"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}: "
        f"{holder.get('command', '?')}, since {holder.get('started', '?')}"
    )


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock for the block; a FolderBusyError naming the holder if it is taken."""
    path = Path(folder) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make {folder} ({e.strerror})") from None
    # The holder's details are written into it: never through a planted link, never a pipe.
    with open_own_file(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = _holder(f)
            if not _inherited(path, holder):
                raise FolderBusyError(
                    f"{folder} is being written by another tlbuild ({describe(holder)}); wait "
                    "for it to finish, or give this recipe another output_dir"
                ) from None
            locked = False  # our parent (or this process, further out) holds it for us
        except OSError:
            # A file system without locks (some network mounts: ENOLCK, EOPNOTSUPP): the build
            # goes on unguarded rather than not at all.
            locked = False
        if not locked:
            yield
            return
        token = secrets.token_hex(8)
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": " ".join(["tlbuild", *sys.argv[1:]]),
                    "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                    "token": token,
                }
            ).encode("utf-8")
        )
        before = os.environ.get(INHERITED)
        os.environ[INHERITED] = f"{path.resolve()}={token}"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(INHERITED, None)
            else:
                os.environ[INHERITED] = before
            f.seek(0)
            f.truncate()  # nobody holds it now; the flock goes with the close
