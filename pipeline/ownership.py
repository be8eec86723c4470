"""Whose directory is this: the output rule, the settings a rerun must keep, and an exclusive lease.

- `check_output`: an output is new, empty, or this tool's own (it holds one of its markers);
  anything else, or an output overlapping an input, is refused in one line.
- `setting_differences`: `name: old -> new` for every identity setting that changed.
- `output_lease`: one process at a time writes into an output. Two `train` (or `score-ref` worker,
  or `export`) runs into one directory cannot both proceed; a lease is taken over only when its
  holder is provably gone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .atomic import create_exclusive, temporary_name
from .errors import CacheError, ConfigError

LEASE = ".selpipe-lease.json"
# atomic.temporary_name: `.{name}.{host}.{pid}.{token}.tmp`, a write in progress by some selpipe process.
TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{12}\.tmp$")

OutputState = Literal["new", "empty", "ours"]


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _ignorable(name: str, ignore_hidden: bool) -> bool:
    """Files that do not make a directory someone else's: leases and this tool's writes in progress."""
    return name.startswith(".selpipe-lease") or bool(TEMPORARY.match(name)) or (ignore_hidden and name.startswith("."))


def check_output(output: str | Path, *, markers: Sequence[str] = (), flag: str = "--output",
                 inputs: Mapping[str, str | Path | None] | None = None, is_ours: Callable[[Path], bool] | None = None,
                 ignore_hidden: bool = False, kind: str = "selpipe output") -> OutputState:
    """Refuse, before anything is written, an output that is not ours to write; else say what it is.

    It must not overlap any of `inputs` (flag -> path; either inside the other), so nothing a run
    writes lands in the user's model or data. Then it is "new" (absent), "empty" (a directory
    holding nothing but leases and temporary files of this tool, or with `ignore_hidden` any
    hidden name), or "ours": it holds one of `markers` (file names this tool writes first), or
    `is_ours(directory)` says so (an older layout without a marker). Anything else is refused.
    """
    output = Path(output)
    resolved = output.resolve()
    for input_flag, value in (inputs or {}).items():
        if value is not None and _overlaps(resolved, Path(value).resolve()):
            raise ConfigError(f"{flag} {output} overlaps {input_flag} {value}: writing there would change your inputs; "
                              f"choose a {flag} outside them")
    if not output.exists():
        return "new"
    if not output.is_dir():
        raise ConfigError(f"{flag} {output} is a file, not a directory; choose a new {flag}")
    if any((output / marker).is_file() for marker in markers) or (is_ours is not None and is_ours(output)):
        return "ours"
    if all(_ignorable(entry.name, ignore_hidden) for entry in output.iterdir()):
        return "empty"
    raise ConfigError(f"{flag} {output} is a directory that is neither empty nor a {kind}; choose a new or empty {flag} "
                      f"(selpipe will not write among files it did not create)")


def setting_differences(old: Mapping[str, Any], new: Mapping[str, Any], *, keys: Iterable[str] | None = None,
                        defaults: Mapping[str, Any] | None = None, name: Callable[[str], str] = str,
                        depth: int = 1, limit: int = 200) -> list[str]:
    """`name: old -> new` for every key (of `keys`, else of either mapping) whose value differs.

    A key absent from `old` is compared as `defaults[key]` (a setting newer than the record had
    its default then). Nested mappings are compared key by key down `depth` levels, named with
    dots (`reference.fingerprint: 'a' -> 'b'`). Each line is cut at `limit` characters.
    """
    defaults = defaults or {}
    differing = []
    for key in keys if keys is not None else sorted(set(old) | set(new), key=str):
        before, after = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if depth > 0 and isinstance(before, Mapping) and isinstance(after, Mapping):
            differing += setting_differences(before, after, name=lambda k, key=key: f"{name(key)}.{k}",
                                             depth=depth - 1, limit=limit)
        elif before != after:
            line = f"{name(key)}: {before!r} -> {after!r}"
            differing.append(line if len(line) <= limit else line[:limit] + "...")
    return differing


# ------------------------------------------------------------------------------------------- the lease


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the boot id, a
    process identity that a reused pid does not share. None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: written whole into the lease file."""

    command: str
    host: str
    pid: int
    process_start: int | None
    boot_id: str | None
    started_at: str
    slurm_job_id: str | None
    slurm_array_task_id: str | None
    slurm_restart_count: str | None
    token: str

    @classmethod
    def me(cls, command: str) -> Holder:
        return cls(command=command, host=socket.gethostname(), pid=os.getpid(), process_start=process_start(os.getpid()),
                   boot_id=_boot_id(), started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                   slurm_array_task_id=os.environ.get("SLURM_ARRAY_TASK_ID"),
                   slurm_restart_count=os.environ.get("SLURM_RESTART_COUNT"), token=uuid.uuid4().hex)

    def describe(self) -> str:
        slurm = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        task = f" task {self.slurm_array_task_id}" if self.slurm_job_id and self.slurm_array_task_id else ""
        return f"`selpipe {self.command}` on host {self.host}, pid {self.pid}{slurm}{task}, since {self.started_at}"

    def is_gone(self, me: Holder) -> bool:
        """Provably gone: on this host (same boot) its pid is dead, a zombie, or another process
        (other start time); or it is an earlier run of this very Slurm job (and array task), which
        Slurm ended before requeueing it. A holder elsewhere is never presumed dead."""
        if self.host == me.host and (self.boot_id is None or self.boot_id == me.boot_id):
            if self.pid == me.pid and self.process_start == me.process_start:
                return False  # this very process: a second lease in one run is a bug, not a takeover
            if not _alive(self.pid) or _process_state(self.pid) == "Z":
                return True
            return self.process_start is not None and process_start(self.pid) not in (None, self.process_start)
        if self.host == me.host and self.boot_id is not None and me.boot_id is not None:
            return True  # the host rebooted since: every process of that boot is gone
        return (self.slurm_job_id is not None and self.slurm_job_id == me.slurm_job_id
                and self.slurm_array_task_id == me.slurm_array_task_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _read_holder(path: Path) -> Holder | None:
    """The lease's holder; None if the file vanished. A file that is not a lease is one line."""
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise CacheError(f"{path}: not a readable selpipe lease ({type(err).__name__}); if no selpipe run is writing into "
                         f"{path.parent}, remove it") from None


class Lease:
    """A held lease; `held()` says whether the lease file still names this holder."""

    def __init__(self, path: Path, holder: Holder, created_directory: bool = False):
        self.path, self.holder, self.created_directory = path, holder, created_directory

    def held(self) -> bool:
        try:
            current = _read_holder(self.path)
        except CacheError:
            return False
        return current is not None and current.token == self.holder.token

    def release(self) -> None:
        if self.held():
            self.path.unlink(missing_ok=True)
        if self.created_directory:
            try:
                self.path.parent.rmdir()  # only if the run left nothing in the directory it created
            except OSError:
                pass


def _take_over(path: Path, stale: Holder, me: Holder, text: str) -> bool:
    """Replace the stale lease by ours; True if ours is now the lease.

    Contenders for one stale lease serialize on a create-only `.takeover` file. The lease name
    never goes missing meanwhile (os.replace swaps it whole), so a fresh contender's create fails
    and it reads the new holder.
    """
    breaker = path.with_name(path.name + ".takeover")
    if not create_exclusive(breaker, text):
        other = _read_holder(breaker)
        if other is None or not other.is_gone(me):
            return False  # another contender is taking over now: it will hold the lease
        breaker.unlink(missing_ok=True)  # its taker died mid-takeover (a moment's window, see output_lease)
        if not create_exclusive(breaker, text):
            return False
    try:
        current = _read_holder(path)
        if current is not None and current.token != stale.token:
            return False  # someone else took it over first
        tmp = temporary_name(path)
        tmp.write_text(text)
        os.replace(tmp, path)
        return True
    finally:
        breaker.unlink(missing_ok=True)


def acquire(directory: Path, command: str, name: str = LEASE, flag: str = "--output") -> Lease:
    """Take the lease on `directory` (created if absent, and removed on release if left empty) or
    refuse in one line naming its holder."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    me = Holder.me(command)
    text = json.dumps(asdict(me), indent=2) + "\n"
    for _ in range(20):  # a holder that releases or a takeover in progress: look again
        if create_exclusive(path, text):
            return Lease(path, me, created)
        holder = _read_holder(path)
        if holder is None:
            continue
        if holder.is_gone(me):
            if _take_over(path, holder, me, text):
                return Lease(path, me, created)
            time.sleep(0.05)
            continue
        raise ConfigError(f"{flag} {directory} is in use by {holder.describe()}; wait for it to finish or choose another "
                          f"{flag} (if that run is gone, remove {path})")
    raise ConfigError(f"{flag} {directory}: its lease {path} keeps changing hands; another run is starting there: choose "
                      f"another {flag}")


@contextmanager
def output_lease(directory: str | Path, command: str, *, name: str = LEASE, flag: str = "--output") -> Iterator[Lease]:
    """Hold `directory` exclusively for this process while the block runs; released on exit.

    The lease is the file `name` in the directory, holding the holder's host, pid, process start
    time, boot id, wall-clock start and Slurm job, array task and restart count. One process of a
    job takes it (rank 0 of `train`; each `score-ref` worker takes its own `name`).

    Why it is safe on NFS: the lease is written whole under a temporary name and hard-linked to
    its final name (`atomic.create_exclusive`). link(2) is atomic on the server and refuses an
    existing name, so of two clients exactly one creates it, and no reader ever sees it torn.
    NFS may retry a link whose reply was lost and report EEXIST for a link it made: success is
    therefore read from the temporary file's link count (2 when our link exists), as in the
    classic NFS lock-file recipe (open(2)'s O_EXCL is not atomic on NFSv2 and not across every
    client cache). There is no timeout-based expiry, because clocks and pauses across nodes
    prove nothing: the lease is taken over only when its holder is provably gone (`Holder.is_gone`).
    A takeover swaps the file with rename(2), atomic on NFS too, serialized by a create-only
    `.takeover` file. The one window left: a taker that dies between creating `.takeover` and
    swapping, with two new contenders racing to clear its `.takeover` in the same instant.
    """
    lease = acquire(Path(directory), command, name, flag)
    try:
        yield lease
    finally:
        lease.release()
