"""Each benchmark in its reduced setting runs end to end and writes sane rows (no timing checks).

Slow (minutes on 2 CPU cores; vLLM and DeepSpeed start-up included): `pytest -m slow tests/bench`.
Results and work files go to a temporary directory (BENCH_RESULTS_DIR, BENCH_WORK_DIR), never
over bench/results/ or into another run's bench/work/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def run_reduced(tmp_path):
    def run(script: str) -> dict:
        result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--reduced"], cwd=REPO,
                                capture_output=True, text=True, timeout=900,
                                env={**os.environ, "BENCH_RESULTS_DIR": str(tmp_path),
                                     "BENCH_WORK_DIR": str(tmp_path / "work")})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return check_meta(json.loads((tmp_path / script.replace(".py", ".json")).read_text()))
    return run


def check_meta(data: dict) -> dict:
    assert data["meta"]["settings"]["setting"] == "reduced"
    assert data["meta"]["threads"] >= 1 and data["rows"]
    return data


def positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def test_train_throughput(run_reduced):
    rows = run_reduced("train_throughput.py")["rows"]
    throughput = [r for r in rows if r["kind"] == "throughput"]
    assert {r["reference"] for r in throughput} == {"same size", "8x"}
    for row in throughput:
        assert positive(row["selpipe_pairs_per_s"], row["trl_pairs_per_s"], row["selpipe_tokens_per_s"],
                        row["trl_tokens_per_s"], row["selpipe_peak_rss_mib"], row["trl_peak_rss_mib"], row["stage_one_s"])
        assert row["ratio_pairs_per_s"] == pytest.approx(row["selpipe_pairs_per_s"] / row["trl_pairs_per_s"])
        # Both trainers saw the same pairs, so the same tokens per pair within tokenization differences.
        assert row["selpipe_tokens_per_pair"] == pytest.approx(row["trl_tokens_per_pair"], rel=0.1)
    amortised = [r for r in rows if r["kind"] == "amortised"]
    assert sorted({r["runs"] for r in amortised}) == [1, 4, 16]
    assert all(positive(r["selpipe_epoch_s"], r["trl_epoch_s"], r["ratio_trl_over_selpipe"]) for r in amortised)


def test_memory(run_reduced):
    rows = run_reduced("memory.py")["rows"]
    assert {r["vocab"] for r in rows} == {32000, 151936}
    for row in rows:
        assert positive(row["selpipe_step_peak_mib"], row["trl_step_peak_mib"], row["ratio_selpipe_over_trl"])
        assert positive(row["selpipe_chunk1024_step_peak_mib"], row["full_logits_step_peak_mib"])
        assert row["ratio_selpipe_over_trl"] == pytest.approx(row["selpipe_step_peak_mib"] / row["trl_step_peak_mib"])


def test_scoring(run_reduced):
    rows = run_reduced("scoring.py")["rows"]
    assert {r["backend"] for r in rows} == {"hf", "hf --compile", "vllm", "naive"}
    for row in rows:
        assert positive(row["tokens_per_s"], row["ratio_hf_over_this"], row["startup_s"])
        # All four compute the same log-probs of the same model.
        assert row["max_abs_diff_vs_hf"] < 1e-3


def test_cache_size(run_reduced):
    rows = run_reduced("cache_size.py")["rows"]
    sizes = {r["format"]: r for r in rows if r["kind"] == "size"}
    assert {"selpipe parquet", "parquet defaults", "jsonl"} <= set(sizes)
    assert all(positive(r["bytes_per_completion_token"], r["ratio_to_selpipe"]) for r in sizes.values())
    stream = next(r for r in rows if r["kind"] == "stream")
    assert positive(stream["stream_pairs_per_s"])
