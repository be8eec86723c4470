"""Atomic writes: a file (or directory) appears under its final name only when it is complete.

Everything selpipe writes goes through these helpers, so a kill at any moment leaves either the
old file or the new one, never a torn one, and never a stray temporary file after an error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path`, unique to this write: workers on other hosts sharing the file
    system may have the same process id, so the name carries the host and a random token too."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it onto `path`, on error remove it.

    Works for a file or a directory written under the temporary path. A directory replaces an
    existing one at `path` (only call it for a directory this run owns).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if tmp.is_dir() and path.is_dir():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# link(2) failing with these means the file system has no hard links (some FUSE and SMB mounts).
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS)


def create_exclusive(path: str | Path, text: str) -> bool:
    """Create `path` holding `text` only if nothing is there yet; True if this call created it.

    The file is written under a temporary name and hard-linked to `path`: link(2) refuses an
    existing name atomically, on NFS too, and the file appears whole. Over NFS a lost reply can
    report failure for a link that was made, so success is read from the temporary file's link
    count, as in the classic NFS lock-file recipe. Where hard links are unsupported, `O_EXCL`
    creates the file and it is written in place (a reader may then see it torn for a moment).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as err:
            if err.errno not in NO_HARD_LINKS:
                raise
            return _create_in_place(path, text)
        return os.stat(tmp).st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)


def _create_in_place(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True
