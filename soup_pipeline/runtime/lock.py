"""One writer per pipeline root: an exclusive lock on ROOT/runs/.lock while a command writes outputs.

The lock is an OS file lock (flock), so the kernel releases it when its holder exits, however it
exits: a lock file left behind by a killed run holds no lock and never blocks the next run. The
file only says who holds the lock, for the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .atomic import remove_stale_temporaries
from .errors import SoupError

LOCK_HELD_ENV = "SOUP_PIPELINE_LOCK_HELD"  # set by a command for the processes it launches under its own lock


@contextlib.contextmanager
def file_lock(path: Path, command: str, refusal: str, fix: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (written with who holds it); when another process holds it, raise
    SoupError: `refusal`, the holder, and `fix`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SoupError(f"{refusal}: {holder} holds {path}. {fix}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} (`soup-pipeline {command}`, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def root_lock(root: str | Path, command: str) -> Iterator[None]:
    """Hold the pipeline root's lock for `command`; refuse at once, naming the holder, when another process has it.

    Once held, the temporary files a killed writer left half-written under runs/ are removed: no
    other writer can be using them.
    """
    runs = Path(root) / "runs"
    with file_lock(runs / ".lock", command, f"{Path(root).resolve()} is in use",
                   "Wait for it to finish, or give this command another --root"):
        remove_stale_temporaries(runs)
        yield
