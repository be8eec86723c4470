"""The Slurm scripts of docs/scaling.md, run here with the scheduler's variables simulated: two
array tasks for stage one, one node of one process for stage two (fake `srun` and `scontrol`; two
processes are covered by tests/stages/train/test_lora.py)."""

import json
import os
import signal
import subprocess
import time

import pytest

from selpipe.pipeline.cache import load_manifest, read_rows
from selpipe.stages.train import free_port

from ..conftest import BIN, REPO, demo, write_jsonl

SLURM = REPO / "configs" / "slurm"
SMALL = ("--backend", "hf", "--dtype", "float32", "--max-length", "64", "--max-prompt-length", "32", "--shard-size", "8")


def sbatch(script, *args, env):
    """Run a batch script as Slurm would start it, with selpipe and torchrun on the PATH."""
    path = f"{BIN}:{env.pop('PATH_FIRST', '')}:{os.environ['PATH']}"
    return subprocess.run(["bash", str(SLURM / script), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env, "PATH": path})


def array_task(task, count, low=0, high=None):
    high = count - 1 if high is None else high
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high)}


def test_the_documented_scripts_are_the_shipped_ones():
    page = (REPO / "docs" / "scaling.md").read_text()
    for script in ("score-ref.sbatch", "train.sbatch"):
        assert (SLURM / script).read_text() in page, script


def test_stage_one_array_script_with_two_tasks_and_a_rerun_of_one(tmp_path, models):
    rows = write_jsonl(tmp_path / "prefs.jsonl", demo.generate_pairs(24, seed=6, id_prefix="s"))
    paths = {"INPUT": str(rows), "MODEL": str(models["reference"]), "CACHE": str(tmp_path / "cache")}
    summaries = []
    for task in (0, 1):
        result = sbatch("score-ref.sbatch", *SMALL, env={**paths, **array_task(task, 2)})
        assert result.returncode == 0, result.stderr[-3000:]
        summaries.append(json.loads(result.stdout))  # --json: the summary alone on stdout
    assert [(s["worker"], s["num_workers"], s["complete"]) for s in summaries] == [(0, 2, False), (1, 2, True)]
    ids = sorted(r["id"] for r in read_rows(tmp_path / "cache", load_manifest(tmp_path / "cache")))
    assert ids == sorted(f"s-{i:05d}" for i in range(24))
    said = json.loads((tmp_path / "cache" / "config-worker-00001.json").read_text())["//"]
    assert said == "worker 1 of 2: Slurm array SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=2"
    # `sbatch --array=1 ...` reruns task 1 alone: its count comes from the cache, its shards resume.
    rerun = sbatch("score-ref.sbatch", *SMALL, env={**paths, **array_task(1, 1, low=1, high=1)})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["complete"] and summary["rows_scored_now"] == 0 and summary["shards_resumed"] == summaries[1]["shards"]


@pytest.fixture
def slurm_job(tmp_path, demo_cache, models):
    """The environment of job 7 on one node: fake `srun` (runs its command once, as on one node) and
    `scontrol` (names the node; `scontrol requeue` is written to tmp_path/requeued)."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fakes / "scontrol").write_text(f'#!/bin/bash\nif [[ "$1" == requeue ]]; then echo "$@" >> {tmp_path / "requeued"}; '
                                    f'else echo localhost; fi\n')
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    return {"PATH_FIRST": str(fakes), "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost",
            "GPUS_PER_NODE": "1", "PORT": str(free_port()), "CACHE": str(demo_cache), "POLICY": str(models["policy"]),
            "RUN": str(tmp_path / "run")}


def test_stage_two_multi_node_script_on_one_node(tmp_path, slurm_job):
    result = sbatch("train.sbatch", "--zero-stage", "2", "--max-steps", "2", "--global-batch-size", "8",
                    "--micro-batch-size", "4", "--save-every", "0", "--no-save-model", env=slurm_job)
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert not (tmp_path / "requeued").exists()


def test_usr1_before_the_time_limit_saves_the_step_requeues_and_the_requeued_job_finishes(tmp_path, slurm_job):
    """Slurm's `--signal=B:USR1@120` as the script receives it: the trap passes USR1 through torchrun
    to the rank, which saves its current step; the script requeues job 7, whose rerun (--resume)
    takes the remaining steps."""
    flags = ("--max-steps", "12", "--global-batch-size", "8", "--micro-batch-size", "4", "--save-every", "1000",
             "--no-save-model", "--report-to", "none")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **slurm_job,
           "PATH": f"{BIN}:{slurm_job['PATH_FIRST']}:{os.environ['PATH']}"}
    job = subprocess.Popen(["bash", str(SLURM / "train.sbatch"), *flags], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.01)
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-5000:]
    stopped_at = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert 2 <= stopped_at < 12, "the signal must land mid-run"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at}"
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "7"]
    assert f"stopped by SIGUSR1 after step {stopped_at}" in stderr
    rerun = sbatch("train.sbatch", *flags, env=dict(slurm_job))
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 13))
