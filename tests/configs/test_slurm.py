"""The Slurm scripts of docs/scaling.md, run here with the scheduler's variables simulated: two
array tasks for stage one, one node of one process for stage two (fake `srun` and `scontrol`; two
processes are covered by tests/stages/train/test_lora.py)."""

import json
import os
import subprocess

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


def test_stage_two_multi_node_script_on_one_node(tmp_path, demo_cache, models):
    fakes = tmp_path / "bin"
    fakes.mkdir()
    # srun runs its command once per node (one node here); scontrol names the node list's hosts.
    (fakes / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fakes / "scontrol").write_text('#!/bin/bash\necho localhost\n')
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    env = {"PATH_FIRST": str(fakes), "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost",
           "GPUS_PER_NODE": "1", "PORT": str(free_port()), "CACHE": str(demo_cache), "POLICY": str(models["policy"]),
           "RUN": str(tmp_path / "run")}
    result = sbatch("train.sbatch", "--zero-stage", "2", "--max-steps", "2", "--global-batch-size", "8",
                    "--micro-batch-size", "4", "--save-every", "0", "--no-save-model", env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
