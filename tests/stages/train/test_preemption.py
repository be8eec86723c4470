"""Preemption: SIGTERM or USR1 stops a run after its current step with a checkpoint of that step
(however far --save-every is), exit 75, and `--resume` continues it bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch

from selpipe.stages.train.preemption import EXIT_PREEMPTED, StopRequests

from ...conftest import BIN, REPO, per_step, train_cli


def test_a_signal_is_recorded_and_every_rank_agrees_to_stop():
    other_ranks = [0.0]

    def all_reduce(tensor):  # this rank plus the others, as a sum over ranks
        tensor += sum(other_ranks)

    before = signal.getsignal(signal.SIGUSR1)
    with StopRequests(all_reduce, torch.device("cpu")) as stop:
        assert not stop.agreed()
        other_ranks[0] = 1.0  # another rank was signalled, this one was not
        assert stop.agreed() and stop.describe() == "a stop signal to another rank"
        other_ranks[0] = 0.0
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not fatal
        assert stop.agreed() and stop.describe() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


# 24 steps; --save-every far beyond the end: the only checkpoint before the last step is the one
# the signal asks for.
SETTINGS = ("--max-steps", "24", "--global-batch-size", "8", "--micro-batch-size", "4", "--learning-rate", "5e-4",
            "--beta", "0.1", "--warmup-steps", "3", "--save-every", "1000", "--no-save-model", "--report-to", "none")


def test_sigterm_mid_run_saves_the_current_step_and_resume_gives_the_uninterrupted_losses(tmp_path, demo_cache, models):
    train_cli(demo_cache, models["policy"], tmp_path / "clean", *SETTINGS)
    run = tmp_path / "stopped"
    command = [str(BIN / "selpipe"), "train", "--cache", str(demo_cache), "--policy", str(models["policy"]),
               "--output", str(run), "--no-progress", *SETTINGS]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    stopped_at = max(per_step(run))
    assert 3 <= stopped_at < 24, "the signal must land mid-run"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at}"
    assert not (run / "summary.json").exists()
    last = stderr.strip().splitlines()[-1]
    assert f"stopped by SIGTERM after step {stopped_at}" in last and "--resume" in last and "Traceback" not in stderr

    train_cli(demo_cache, models["policy"], run, *SETTINGS, "--resume")
    clean, resumed = per_step(tmp_path / "clean"), per_step(run)
    assert sorted(resumed) == sorted(clean) == list(range(1, 25))
    assert resumed == clean  # exactly: the stopped run took the same steps, the resumed one the rest
