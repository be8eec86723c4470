"""bench/gpu/run.sh in its CPU rehearsal (`--device cpu --tiny`): every check runs end to end and
writes finite, sensible numbers, and the correctness checks hold at fp32 precision.

Slow (a few minutes on 2 CPU cores: five DeepSpeed runs, two TRL runs, the memory workers):
`pytest -m slow tests/bench/test_gpu_smoke.py`. The performance targets are stated for an H100
and are not asserted here; only that each was measured.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = ("stage_one_parity", "stage_one_speed", "stage_two_parity", "stage_two_runs", "stage_two_speed", "memory")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proof(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("gpu-proof")
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh"), "--device", "cpu", "--tiny",
                             "--out", str(root / "out"), "--work", str(root / "work")],
                            cwd=REPO, capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "PYTHON": sys.executable})  # this test's environment, not a bare python3
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {name: json.loads((root / "out" / f"{name}.json").read_text()) for name in (*CHECKS, "summary")}


def finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_summary_lists_every_target_and_check(proof):
    summary = proof["summary"]
    assert summary["mode"] == "tiny" and not summary["errors"]
    assert summary["selpipe_installed_matches_tree"] is True
    assert all(summary["versions"][name] for name in ("torch", "transformers", "deepspeed", "trl"))
    assert len({row["target"] for row in summary["targets"]}) == len(summary["targets"]) == 4
    for row in summary["targets"]:
        assert row["binding"] is False  # CPU numbers are recorded, not claimed
        if "MFU" in row["target"]:
            assert row["measured"] is None  # no GPU peak to divide by
        else:
            assert finite(row["measured"]) and row["measured"] > 0 and isinstance(row["met"], bool)
    assert [row["passed"] for row in summary["checks"]] == [True] * len(summary["checks"])


def test_stage_one_parity(proof):
    parity = proof["stage_one_parity"]
    assert parity["token_ids_match_drawn"] and parity["all_finite"] and parity["tokens_compared"] > 0
    diff = parity["abs_diff"]
    assert 0 < diff["p50"] <= diff["p99"] <= diff["max"] < 0.1  # bf16 vs fp32 on the same weights
    fp32 = parity["verify_fp32_vs_fp32"]
    assert fp32["exit_code"] == 0 and fp32["report"]["tokens_checked"] > 0
    assert fp32["report"]["max_abs_diff"] < 1e-5  # fp32 vs fp32: the same numbers
    low = parity["verify_low_vs_fp32"]
    assert low["exit_code"] == 0, low
    assert low["report"]["tokens_checked"] > 0 and 0 < low["report"]["max_abs_diff"] < 0.1


def test_stage_one_speed(proof):
    speed = proof["stage_one_speed"]
    rows = {row["backend"]: row for row in speed["rows"]}
    assert set(rows) == {"hf", "hf budget 65536", "naive"}
    for row in rows.values():
        assert finite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 and row["tokens"] == rows["hf"]["tokens"]
        assert row["max_abs_diff_vs_hf"] < 0.1  # the same bf16 model, batched differently
    assert speed["hf_over_naive"] == pytest.approx(rows["hf"]["tokens_per_s"] / rows["naive"]["tokens_per_s"])


def test_k1_loss_equals_trls(proof):
    parity = proof["stage_two_parity"]
    assert parity["precision"] == "fp32" and parity["trl_pairs"] == parity["pairs"]
    assert parity["trl_tokenization_mismatches"] == []
    assert abs(parity["trl_loss"] - math.log(2)) > 1e-4  # policy and reference differ: a real margin
    assert abs(parity["selpipe_loss"] - parity["trl_loss"]) <= 1e-5 and parity["equal"]


def test_zero_stages_and_resume(proof):
    runs = proof["stage_two_runs"]
    for stage in ("zero0", "zero2"):
        assert runs[stage]["steps_logged"] == 20 and runs[stage]["all_finite"]
    assert runs["zero0_vs_zero2_max_abs_loss_diff"] < 1e-4  # the same math under both stages
    resume = runs["resume"]
    assert resume["killed_by_sigkill_after"] == "step-10" and resume["exit_code_of_killed"] == -9
    assert resume["steps_run_after_resume"] == 10 and resume["compared_steps"] == list(range(11, 21))
    assert all(d <= 1e-6 for d in resume["max_abs_diff"].values()) and resume["equal"]


def test_stage_two_speed(proof):
    speed = proof["stage_two_speed"]
    for side in ("selpipe", "trl_live", "trl_precompute"):
        assert finite(speed[side]["pairs_per_second"], speed[side]["peak_memory_mib"])
        assert speed[side]["pairs_per_second"] > 0 and speed[side]["measured_steps"] == 15
        # The same pairs on both sides, tokenized by selpipe once and by TRL itself.
        assert speed[side]["tokens_per_pair"] == pytest.approx(speed["selpipe"]["tokens_per_pair"], rel=0.05)
    for side in ("trl_live", "trl_precompute"):
        assert speed[side]["losses_finite"] and len(speed[side]["losses"]) == 20
    assert speed["ratio_over_trl_live"] == pytest.approx(
        speed["selpipe"]["pairs_per_second"] / speed["trl_live"]["pairs_per_second"])


def test_memory(proof):
    memory = proof["memory"]
    for row in memory["rows"].values():
        assert finite(row["step_peak_mib"]) and row["step_peak_mib"] > 0
    assert memory["ratio_selpipe_over_trl"] == pytest.approx(
        memory["rows"]["selpipe"]["step_peak_mib"] / memory["rows"]["trl"]["step_peak_mib"])
