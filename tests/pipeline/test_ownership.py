"""The output rule, settings that changed, and the exclusive lease on an output directory."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from selpipe.pipeline.errors import CacheError, ConfigError
from selpipe.pipeline.ownership import (
    LEASE, Holder, acquire, check_output, output_lease, process_start, setting_differences,
)
from selpipe.pipeline.atomic import temporary_name

# ------------------------------------------------------------------------------------ check_output


def test_new_empty_and_ours(tmp_path):
    assert check_output(tmp_path / "absent") == "new"
    assert check_output(tmp_path) == "empty"
    temporary_name(tmp_path / "header.json").write_text("{")  # another worker's write in progress
    (tmp_path / LEASE).write_text("{}")
    assert check_output(tmp_path) == "empty"
    (tmp_path / ".marker").write_text("{}")
    assert check_output(tmp_path, markers=[".marker"]) == "ours"
    assert check_output(tmp_path, is_ours=lambda d: (d / ".marker").exists()) == "ours"


def test_a_foreign_directory_or_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"^--output {tmp_path} is a directory that is neither empty nor a selpipe run;"):
        check_output(tmp_path, markers=[".marker"], kind="selpipe run")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_output(tmp_path / "notes.txt")
    (tmp_path / "notes.txt").unlink()
    (tmp_path / ".hidden").write_text("")
    with pytest.raises(ConfigError):
        check_output(tmp_path)
    assert check_output(tmp_path, ignore_hidden=True) == "empty"


def test_an_output_overlapping_an_input_either_way_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for output, inputs in ((run / "model", {"RUN": run}), (run, {"--policy": run / "model"}),
                           (run, {"--cache": run})):
        flag = next(iter(inputs))
        with pytest.raises(ConfigError, match=rf"overlaps {flag} "):
            check_output(output, inputs=inputs)
    assert check_output(tmp_path / "elsewhere", inputs={"RUN": run, "--eval-cache": None}) == "new"


# ------------------------------------------------------------------------------ setting_differences


def test_setting_differences_names_each_change():
    old = {"seed": 1, "beta": 0.1, "reference": {"model": "a", "fingerprint": "x"}}
    new = {"seed": 2, "beta": 0.1, "reference": {"model": "a", "fingerprint": "y"}, "top_k": 0.4}
    assert setting_differences(old, new) == ["reference.fingerprint: 'x' -> 'y'", "seed: 1 -> 2", "top_k: None -> 0.4"]
    # A key the record lacks had its default then; `keys` restricts, `name` renders.
    assert setting_differences(old, new, keys=["top_k", "seed"], defaults={"top_k": 0.4},
                               name=lambda k: "--" + k.replace("_", "-")) == ["--seed: 1 -> 2"]
    assert setting_differences(old, new, depth=0, keys=["reference"])[0].startswith("reference: {")
    assert setting_differences({"a": "x" * 500}, {"a": "y"}, limit=50)[0] == "a: '" + "x" * 46 + "..."  # 4 + 46 = the 50 kept


# ---------------------------------------------------------------------------------------- the lease


def _holder_of(directory: Path) -> dict:
    return json.loads((directory / LEASE).read_text())


def test_a_lease_records_its_holder_and_is_released_on_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with output_lease(tmp_path, "train") as lease:
        record = _holder_of(tmp_path)
        assert (record["host"], record["pid"], record["slurm_job_id"], record["slurm_array_task_id"]) == \
            (socket.gethostname(), os.getpid(), "4242", "3")
        assert record["process_start"] == process_start(os.getpid()) and record["started_at"]
        assert lease.held()
    assert not (tmp_path / LEASE).exists()
    with pytest.raises(RuntimeError), output_lease(tmp_path, "train"):
        raise RuntimeError("the run failed")
    assert not (tmp_path / LEASE).exists()


def test_a_directory_the_lease_created_is_removed_if_left_empty(tmp_path):
    with output_lease(tmp_path / "new", "export"):
        pass
    assert not (tmp_path / "new").exists()
    with output_lease(tmp_path / "kept", "export"):
        (tmp_path / "kept" / "model").mkdir()
    assert (tmp_path / "kept" / "model").is_dir()


def test_a_live_lease_is_refused_naming_its_holder(tmp_path):
    # A live process on this host: a child that sleeps.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = Holder.me("train")
        holder = replace(me, pid=child.pid, process_start=process_start(child.pid), command="score-ref",
                         slurm_job_id="77", token="theirs")
        (tmp_path / LEASE).write_text(json.dumps(asdict(holder)))
        with pytest.raises(ConfigError) as caught:
            acquire(tmp_path, "train")
        message = str(caught.value)
        assert "\n" not in message
        assert f"is in use by `selpipe score-ref` on host {me.host}, pid {child.pid}, Slurm job 77" in message
        assert _holder_of(tmp_path)["token"] == "theirs"
    finally:
        child.kill()
        child.wait()


def _dead_pid() -> tuple[int, int | None]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start(child.pid)
    child.wait()
    return child.pid, start


def test_a_lease_of_a_dead_process_is_taken_over(tmp_path):
    pid, start = _dead_pid()
    stale = replace(Holder.me("train"), pid=pid, process_start=start, token="dead")
    (tmp_path / LEASE).write_text(json.dumps(asdict(stale)))
    with output_lease(tmp_path, "train") as lease:
        assert _holder_of(tmp_path)["token"] == lease.holder.token != "dead"
    assert not (tmp_path / LEASE).exists()


def test_a_reused_pid_with_another_start_time_is_taken_over(tmp_path):
    # Our parent is alive but started at another time than the lease says: the pid was reused.
    ppid = os.getppid()
    reused = replace(Holder.me("train"), pid=ppid, process_start=(process_start(ppid) or 0) + 12345, token="old")
    (tmp_path / LEASE).write_text(json.dumps(asdict(reused)))
    with output_lease(tmp_path, "train") as lease:
        assert lease.holder.token != "old"


def test_another_host_is_taken_over_only_by_the_same_slurm_job(tmp_path, monkeypatch):
    elsewhere = replace(Holder.me("train"), host="node-17", pid=1, boot_id="other", slurm_job_id="900",
                        slurm_array_task_id=None, token="remote")
    (tmp_path / LEASE).write_text(json.dumps(asdict(elsewhere)))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "901")
    with pytest.raises(ConfigError, match="in use by `selpipe train` on host node-17, pid 1, Slurm job 900"):
        acquire(tmp_path, "train")
    monkeypatch.setenv("SLURM_JOB_ID", "900")  # the requeued job: Slurm ended its earlier run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with output_lease(tmp_path, "train") as lease:
        assert _holder_of(tmp_path)["token"] == lease.holder.token


def test_a_lease_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / LEASE).write_text("{torn")
    with pytest.raises(CacheError, match=rf"^{tmp_path / LEASE}: not a readable selpipe lease .*remove it$"):
        acquire(tmp_path, "train")


def _contend(directory: str, start, release, results) -> None:
    start.wait()
    try:
        with output_lease(directory, "train"):
            results.put("held")
            release.wait(60)  # hold it until every contender has tried
    except ConfigError as err:
        results.put(str(err))


def test_racing_processes_one_wins_the_others_are_refused(tmp_path):
    """Six processes released at once onto one new directory: exactly one holds it."""
    context = multiprocessing.get_context("spawn")
    contenders = 6
    start, release, results = context.Barrier(contenders), context.Event(), context.Queue()
    processes = [context.Process(target=_contend, args=(str(tmp_path / "out"), start, release, results))
                 for _ in range(contenders)]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(contenders)]
    finally:
        release.set()
        for process in processes:
            process.join(timeout=60)
    assert outcomes.count("held") == 1, outcomes
    assert all("is in use by `selpipe train`" in o for o in outcomes if o != "held"), outcomes
    assert not (tmp_path / "out" / LEASE).exists()  # released on exit
