"""The run directory: what a new run may overwrite (nothing of a run's results), the `latest`
pointer, the metrics a resume keeps, and the checkpoint a resume reads (each file once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selpipe.pipeline.errors import CacheError, ConfigError
from selpipe.stages.train.run_dir import RunDirectory

from ...conftest import assert_refused, snapshot, train_cli

SHORT = ("--max-steps", "1", "--global-batch-size", "8", "--micro-batch-size", "4", "--report-to", "none")


def test_a_finished_run_is_refused_without_resume_even_when_its_checkpoints_are_gone(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints")
    directory = RunDirectory(run, rank=0)
    assert directory.results() == ["model", "summary.json"]
    with pytest.raises(ConfigError, match=r"already holds a run \(model, summary.json, metrics.jsonl\); pass --resume"):
        directory.refuse_overwrite(resume=False)
    # --resume has no checkpoint to continue from: starting over would replace the results.
    with pytest.raises(ConfigError, match=r"holds a finished run \(model, summary.json\) but no checkpoint to resume"):
        directory.refuse_overwrite(resume=True)


@pytest.mark.parametrize("holds, fresh, resume", [
    ((), True, True),                                     # new or empty
    (("metrics.jsonl",), False, True),                    # a kill before the first checkpoint: --resume starts over
    (("checkpoints",), False, True),                      # a checkpoint: --resume continues it
    (("checkpoints", "model", "summary.json"), False, True),  # a finished run: --resume redoes nothing
    (("model",), False, False),                           # a finished run whose checkpoints were deleted
    (("summary.json",), False, False),
    (("model-merged",), False, False),
])
def test_what_a_run_directory_allows(tmp_path, holds, fresh, resume):
    """`fresh`: a new run without --resume may use it; `resume`: a run with --resume may."""
    run = tmp_path / "run"
    run.mkdir()
    for name in holds:
        if name == "checkpoints":
            (run / "checkpoints" / "step-2").mkdir(parents=True)
            (run / "checkpoints" / "latest").write_text("step-2\n")
        elif name.endswith((".json", ".jsonl")):
            (run / name).write_text('{"step": 1}\n')
        else:
            (run / name).mkdir()
    directory = RunDirectory(run, rank=0)
    for flag, allowed in ((False, fresh), (True, resume)):
        if allowed:
            directory.refuse_overwrite(resume=flag)
        else:
            with pytest.raises(ConfigError, match=f"--output {run}"):
                directory.refuse_overwrite(resume=flag)


def test_a_finished_run_is_refused_by_train_and_left_byte_identical(tiny_run, demo_cache, models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    result = train_cli(demo_cache, models["policy"], run, *SHORT, check=False, timeout=300)
    assert_refused(result, f"--output {run} already holds a run (model, summary.json, metrics.jsonl)")
    assert snapshot(run) == before


def test_latest_must_name_a_step_directory_of_the_run(tmp_path):
    directory = RunDirectory(tmp_path, rank=0)
    assert directory.latest_checkpoint() is None
    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-12").mkdir()
    (tmp_path / "checkpoints" / "step-x").mkdir()
    assert [p.name for p in directory.step_directories()] == ["step-3", "step-12"]  # by number, not by name
    (tmp_path / "checkpoints" / "latest").write_text("step-12\n")
    assert directory.latest_checkpoint() == "step-12"
    for bad in ("../../etc", "step-7", "step-x"):
        (tmp_path / "checkpoints" / "latest").write_text(bad + "\n")
        with pytest.raises(CacheError, match="not a checkpoint of this run"):
            directory.latest_checkpoint()


def test_a_resume_keeps_the_logged_rows_up_to_its_checkpoint_and_a_fresh_start_none(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    metrics = tmp_path / "metrics.jsonl"
    torn = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'  # what a kill mid-write leaves
    metrics.write_text(torn)
    directory = RunDirectory(tmp_path, rank=0)
    directory.open_logs(2, [], {})
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    directory.log(3, {"loss": 0.25})
    directory.close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    directory.open_logs(None, [], {})
    assert metrics.read_text() == ""


def test_two_concurrent_trains_into_one_output_one_refuses_naming_the_other(demo_cache, models, tmp_path):
    """Both start at once; the lease goes to one, held to its end, and the other refuses in one line
    without writing anything (its files would have mixed with the first's)."""
    import os
    import subprocess

    from ...conftest import BIN, REPO

    run = tmp_path / "run"
    command = [str(BIN / "selpipe"), "train", "--cache", str(demo_cache), "--policy", str(models["policy"]),
               "--output", str(run), "--no-progress", "--max-steps", "6", *SHORT[2:], "--no-save-model"]
    logs = [open(tmp_path / f"stderr-{i}", "w+") for i in range(2)]  # files: no pipe fills up and blocks
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for log in logs]
    results = [(process.wait(timeout=600), (tmp_path / f"stderr-{i}").read_text()) for i, process in enumerate(processes)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    [(winner_pid, _)] = [(p.pid, err) for p, (code, err) in zip(processes, results) if code == 0]
    [refusal] = [err for code, err in results if code == 2]
    last = refusal.strip().splitlines()[-1]
    assert last.startswith(f"error: --output {run} is in use by `selpipe train` on host") and f"pid {winner_pid}" in last
    assert "Traceback" not in refusal
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # one run's rows, once each
    assert not (run / ".selpipe-lease.json").exists()  # released at the end


COUNTING_TRAIN = """
import collections, json, sys, torch
reads = collections.Counter()
real = torch.load
def counting(f, *args, **kwargs):
    reads[str(f)] += 1
    return real(f, *args, **kwargs)
torch.load = counting  # DeepSpeed's checkpoint engine and selpipe's check both call torch.load
from selpipe.cli.app import main
sys.argv = ["selpipe", "train", *sys.argv[2:]]
try:
    main()
finally:
    open(__import__("os").environ["READS_OUT"], "w").write(json.dumps(reads))
"""


def test_a_resume_reads_each_checkpoint_file_once(tiny_run, demo_cache, models, tmp_path):
    """Once: the settings check, the weights_only check and DeepSpeed's load share one read (every
    torch.load of the resumed process counted)."""
    import os
    import subprocess
    import sys

    from ...conftest import REPO, TINY_RUN

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "latest").write_text("step-1\n")  # as if killed after step 1
    out = tmp_path / "reads.json"
    command = [sys.executable, "-c", COUNTING_TRAIN, "-", "--cache", str(demo_cache), "--policy", str(models["policy"]),
               "--output", str(run), "--no-progress", *TINY_RUN, "--eval-cache", str(demo_cache), "--resume"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "READS_OUT": str(out)})
    assert done.returncode == 0, done.stderr[-3000:]
    step1 = str(run / "checkpoints" / "step-1")
    reads = {Path(name).name: count for name, count in json.loads(out.read_text()).items() if name.startswith(step1)}
    assert reads == {"mp_rank_00_model_states.pt": 1, "rng-rank0.pt": 1}
