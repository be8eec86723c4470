"""The errors a user can fix. Each message is one line naming the file, row or flag and the fix;
the CLI prints it and exits with status 2. Anything else that escapes is a bug (a traceback).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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


# What libraries (transformers, safetensors, torch, pyarrow, json) raise for an input that cannot
# be used: missing or damaged files, a refused unpickling, an unknown architecture. A TypeError or
# AttributeError is not among them: that is a bug in the caller, and stays a traceback.
LIBRARY_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, EOFError,
                                                     pickle.UnpicklingError)
# Libraries whose error classes are not worth importing here just to name them (safetensors' is
# a Rust extension type deriving straight from Exception; pyarrow's ArrowInvalid is a ValueError).
LIBRARY_ERROR_NAMES = frozenset({"SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeaderDeserialization"})


def is_library_error(err: BaseException) -> bool:
    return isinstance(err, LIBRARY_ERRORS) or type(err).__name__ in LIBRARY_ERROR_NAMES


def is_storage_failure(err: BaseException) -> bool:
    """An OSError, or torch.save's zip writer reporting a failed write as a RuntimeError
    (inline_container.cc: "file write failed", or "unexpected pos N vs M" after a short write)."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err) or "inline_container" in str(err))


Fix = str | Callable[[BaseException], str] | None


@contextmanager
def library_errors(what: str, where: str | Path | None, fix: Fix = None, *,
                   error: type[SelpipeError] = ConfigError,
                   catch: Callable[[BaseException], bool] = is_library_error) -> Iterator[None]:
    """The one wrapper from a library's exception to a one-line error: inside the block, an
    exception `catch` accepts becomes `error("{where}: cannot {what} ({reason}); {fix}")`.

    `where` names the flag and path (`--policy /m`), `fix` says what to do (or a function of the
    exception, for advice that depends on what failed). An OSError carrying an errno (full disk,
    permissions) is described by the system's reason (`os_error_message`); anything else by its
    type and first line. A SelpipeError raised inside passes unchanged, and so does what `catch`
    refuses: that is a bug, and stays a traceback.
    """
    try:
        yield
    except SelpipeError:
        raise
    except Exception as err:  # noqa: BLE001 (filtered by `catch`; the rest is re-raised)
        if not catch(err):
            raise
        raise error(one_line_error(err, what, where, fix(err) if callable(fix) else fix)) from None


def one_line_error(err: BaseException, what: str, where: str | Path | None, fix: str | None) -> str:
    """The message `library_errors` raises."""
    if isinstance(err, OSError) and err.errno is not None:
        if err.filename is None and where is not None:
            err.filename = str(where)
        message = os_error_message(err, what)
    elif isinstance(err, RuntimeError) and is_storage_failure(err):
        message = f"{where}: cannot {what}: a checkpoint write failed ({first_line(err)[:200]})"
        fix = fix or "check free space and permissions of the output"
    else:
        detail = first_line(err)[:300]
        message = f"{where}: cannot {what} ({type(err).__name__}: {detail})"
    return f"{message}; {fix}" if fix else message


def storage_errors(action: str, path: str | Path | None = None,
                   error: type[SelpipeError] = StorageError) -> AbstractContextManager[None]:
    """Turn a storage failure inside the block (full disk, read-only, permissions, a file where a
    directory should be, a failed torch.save) into one line naming the path, `action` and the fix:
    `library_errors` restricted to storage failures (see `is_storage_failure`)."""
    return library_errors(action, path, error=error, catch=is_storage_failure)


def first_line(err: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
