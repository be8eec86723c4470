"""The errors a user can fix. Each message is one line naming the file, row or flag and the fix;
the CLI prints it and exits with status 2. Anything else that escapes is a bug (a traceback).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SelpipeError(ValueError):
    """Base of every user-fixable error."""


class ConfigError(SelpipeError):
    """A setting that cannot work; the message says which one and what to do."""


class CacheError(SelpipeError):
    """A cache (or checkpoint, or run directory) that cannot be used as asked; the message says what differs and what to do."""


class InputError(SelpipeError):
    """The input as a whole cannot be read (missing file, unknown format, bad JSON structure)."""


class BadRowError(SelpipeError):
    """One row is malformed. `reason` is a short key for skip counts."""

    def __init__(self, source: str, row: int, field: str | None, reason: str, detail: str, row_id: str | None = None):
        self.source, self.row, self.field, self.reason, self.row_id = source, row, field, reason, row_id
        where = f"{source}: row {row}" + (f" (id {row_id})" if row_id else "")
        super().__init__(f"{where}, field '{field}': {detail}" if field else f"{where}: {detail}")


def os_error_message(err: OSError, action: str) -> str:
    """One line for an OSError: what was being done, to which path, and the system's reason."""
    import errno

    path = err.filename or "?"
    hints = {
        errno.ENOSPC: "free some space or choose another location",
        errno.EROFS: "the file system is read-only; choose a writable location",
        errno.EACCES: "permission denied; fix the permissions or choose another location",
        errno.EPERM: "permission denied; fix the permissions or choose another location",
        errno.EEXIST: "it already exists; remove it or choose another path",
        errno.ENOTDIR: "a parent of it is a file, not a directory",
        errno.EISDIR: "it is a directory, not a file",
        errno.ENOENT: "it does not exist",
    }
    reason = hints.get(err.errno, err.strerror or str(err))
    return f"{path}: cannot {action} ({err.strerror or err}): {reason}"


class StorageError(SelpipeError):
    """A file system refusal (full disk, read-only, permissions) the user can fix."""


@contextmanager
def storage_errors(action: str, path: str | Path | None = None,
                   error: type[SelpipeError] = StorageError) -> Iterator[None]:
    """Turn a storage failure inside the block (full disk, read-only, permissions, a file where a
    directory should be) into one line naming the path, `action` and the fix.

    torch.save reports a failed write as a RuntimeError from its zip writer (inline_container.cc:
    "file write failed", or "unexpected pos N vs M" after a short write), not as an OSError.
    """
    try:
        yield
    except OSError as err:
        if err.filename is None and path is not None:
            err.filename = str(path)
        raise error(os_error_message(err, action)) from None
    except RuntimeError as err:
        if "PytorchStreamWriter" not in str(err) and "inline_container" not in str(err):
            raise
        raise error(f"{path}: cannot {action}: a checkpoint write failed ({first_line(err)[:200]}); check free "
                    f"space and permissions of the output") from None


def first_line(err: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
