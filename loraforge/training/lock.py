"""One training run per output folder: a lock file for the length of a run, and the clean-up of
what a dead run left behind.

The lock (``<output.dir>/.loraforge.lock``) records the process id, the host and when the run
started. A lock whose process is gone (on this host) is stale and is taken over; a live one
refuses the second run with a message naming it. While the lock is held no other run writes to
the folder, so temporary files of an earlier run (``.NAME-state.XXXX.tmp`` after a SIGKILL during
a save) are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from loraforge.console import info
from loraforge.errors import TrainingError

LOCK_NAME = ".loraforge.lock"


@contextlib.contextmanager
def hold_output_folder(folder: Path, name: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold the output folder's lock for the block, then release it.

    Args:
        folder: ``output.dir``.
        name: ``output.name``; temporary files of earlier runs of that name are removed.
        enabled: only the process that writes files (rank 0) takes the lock.

    Raises:
        TrainingError: another live run holds the folder.
    """
    if not enabled:
        yield
        return
    lock = Path(folder) / LOCK_NAME
    _acquire(lock)
    try:
        remove_stale_temporaries(Path(folder), name)
        yield
    finally:
        with contextlib.suppress(OSError):
            if _read(lock).get("pid") == os.getpid():
                lock.unlink()


def _acquire(lock: Path) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if not _is_stale(holder):
                raise _in_use(lock, holder) from None
            info(f"{lock}: removing the lock of process {holder.get('pid')}, which has ended")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        return
    raise _in_use(lock, _read(lock))


def _read(lock: Path) -> dict:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_stale(holder: dict) -> bool:
    """A lock of a process on this host that is no longer running (or an unreadable lock)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _in_use(lock: Path, holder: dict) -> TrainingError:
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(since)) if since else "?"
    return TrainingError(
        f"{lock.parent} is in use by another training run (process {holder.get('pid')} on "
        f"{holder.get('host')}, started {when}); two runs would overwrite each other's files",
        hint=f"wait for it to finish or set output.dir to another folder; if that run is gone, "
        f"delete {lock}",
    )


def remove_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Remove the temporary files and folders a dead run of ``name`` left in ``folder``
    (``.NAME….tmp`` and their ``.old`` siblings); call only while holding the lock."""
    pattern = re.compile(rf"^\.{re.escape(name)}[-._].*\.(tmp|old)(\.old)?$")
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if not pattern.match(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        info(f"removed {len(removed)} temporary file(s) an interrupted run left in {folder}")
    return removed
