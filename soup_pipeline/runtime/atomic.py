"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from .errors import SoupError

NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # the OS errors of a write that ran out of room
TEMPORARY_SUFFIX = ".tmp"  # with a leading dot: `.NAME.XXXXXXXX.tmp` beside NAME while it is written


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    A write that fails for want of room (a full disk, a file-size limit) is one SoupError naming
    `path`; the previous file, if any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, SafetensorError) as exc:
        if not out_of_room(exc):
            raise
        raise SoupError(f"could not write {path} ({exc}); the previous file is kept. Free disk space (or raise the "
                        "file-size limit) and rerun: finished work is reused") from None
    finally:
        tmp_path.unlink(missing_ok=True)


def out_of_room(exc: BaseException) -> bool:
    """Whether a failed write ran out of room: a full disk, a file-size limit, a quota (safetensors reports
    the OS error in its message)."""
    if isinstance(exc, OSError):
        return exc.errno in NO_ROOM
    return any(os.strerror(code) in str(exc) for code in NO_ROOM)


def write_text(path: str | Path, text: str) -> None:
    """Write `text`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload: object) -> None:
    """Write `payload` as indented JSON, atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files `atomic_path` left under `folder` when its writer was killed; return them.

    Only safe while no writer can be at work there (the caller holds the folder's lock).
    """
    stale = [path for path in Path(folder).rglob(f".*{TEMPORARY_SUFFIX}") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
