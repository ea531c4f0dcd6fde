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
import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlbuild.errors import UsageError

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
        found = json.loads(f.read() or "{}")
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
        # Never through a link (the holder's details are written into it: a planted link
        # would have tlbuild overwrite its target) and never a pipe.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        why = "it is a symbolic link; remove it" if e.errno == errno.ELOOP else e.strerror
        raise UsageError(f"cannot lock {folder} with {path.name} ({why})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"cannot lock {folder}: {path} is not a regular file; remove it")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "r+", encoding="utf-8") as f:
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
            )
        )
        f.flush()
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
