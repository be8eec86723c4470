"""pipeline/atomic.py: a file appears under its final name only whole, and exclusive creation
holds even when the file system misreports a hard link (the NFS case)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from selpipe.pipeline import atomic
from selpipe.pipeline.atomic import (
    atomic_path, create_exclusive, temporary_name, write_json_atomic, write_text_atomic,
)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or ".old" in p.name)


def test_temporary_name_is_a_hidden_sibling_unique_to_the_write(tmp_path):
    first, second = temporary_name(tmp_path / "manifest.json"), temporary_name(tmp_path / "manifest.json")
    assert first.parent == tmp_path and first != second
    assert first.name.startswith(f".manifest.json.{socket.gethostname()}.{os.getpid()}.") and first.name.endswith(".tmp")


def test_atomic_path_renames_a_complete_file_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target, fsync=True) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # until the block ends, readers see the old file
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


def test_an_error_inside_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt  # BaseException too: a Ctrl-C mid-write
    assert target.read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "dir") as tmp:
        (tmp / "sub").mkdir(parents=True)
        raise RuntimeError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_directory_replaces_an_existing_one_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old-only.bin").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"] and _leftovers(tmp_path) == []


def test_write_text_and_json(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "hello")
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.txt").read_text() == "hello"
    text = (tmp_path / "a.json").read_text()
    assert json.loads(text) == {"b": 1, "a": [1, 2]} and text.endswith("\n") and text.index('"b"') < text.index('"a"')


def test_a_kill_mid_write_leaves_the_old_file_whole(tmp_path):
    """SIGKILL while the new content is half written: no cleanup can run, yet the final name
    still holds the old content; only a hidden temporary is left behind."""
    target = tmp_path / "manifest.json"
    target.write_text('{"old": true}\n')
    script = textwrap.dedent(f"""
        import os, signal
        from selpipe.pipeline.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "w") as handle:
                handle.write('{{"new": ')
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"old": True}
    left = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].startswith(".manifest.json.") and left[0].endswith(".tmp")


def test_create_exclusive_creates_once(tmp_path):
    path = tmp_path / "header.json"
    assert create_exclusive(path, "first") is True
    assert create_exclusive(path, "second") is False
    assert path.read_text() == "first" and _leftovers(tmp_path) == []


def test_create_exclusive_reads_success_from_the_link_count_when_nfs_loses_the_reply(tmp_path, monkeypatch):
    """NFS can retry a link(2) whose reply was lost; the retry finds the name taken and reports
    EEXIST for the link this client made. Simulated honestly: a real hard link is made, then
    EEXIST is raised, as the retried request would. The temporary's link count (2) says we won.
    When the name really was someone else's, the count is 1 and we lost."""
    real_link = os.link

    def link_then_lose_the_reply(source, target):
        real_link(source, target)
        raise FileExistsError(errno.EEXIST, "File exists", str(target))

    monkeypatch.setattr(atomic.os, "link", link_then_lose_the_reply)
    path = tmp_path / "lease.json"
    assert create_exclusive(path, "ours") is True and path.read_text() == "ours"
    monkeypatch.setattr(atomic.os, "link", real_link)
    assert create_exclusive(path, "theirs") is False and path.read_text() == "ours"
    assert _leftovers(tmp_path) == []


def test_without_hard_links_it_falls_back_to_o_excl(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    path = tmp_path / "header.json"
    assert create_exclusive(path, "first") is True
    assert create_exclusive(path, "second") is False
    assert path.read_text() == "first" and _leftovers(tmp_path) == []


def test_another_link_failure_is_raised_and_cleans_up(tmp_path, monkeypatch):
    def disk_full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "link", disk_full)
    with pytest.raises(OSError, match="No space"):
        create_exclusive(tmp_path / "x.json", "text")
    assert list(tmp_path.iterdir()) == []


def test_racing_threads_create_exactly_once(tmp_path):
    path, barrier, wins = tmp_path / "claim.json", threading.Barrier(8), []

    def contend(index):
        barrier.wait()
        if create_exclusive(path, f"thread {index}"):
            wins.append(index)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1 and path.read_text() == f"thread {wins[0]}"
