"""`selpipe train --json`: stdout is exactly one JSON object, the run's summary, under torchrun too."""

import json

from ...conftest import run_cli


def test_train_json_is_one_object_on_stdout_and_the_notices_go_to_stderr(demo_cache, models, tmp_path):
    result = run_cli("train", "--cache", demo_cache, "--policy", models["policy"], "--output", tmp_path / "run",
                     "--max-steps", "1", "--global-batch-size", "8", "--micro-batch-size", "4", "--no-progress",
                     "--report-to", "none", "--json", env={"OMP_NUM_THREADS": "1"})
    summary = json.loads(result.stdout)
    assert summary["steps"] == 1 and summary["output"] == str(tmp_path / "run")
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text()) and summary["model_saved"] is True
    assert "DeepSpeed" in result.stderr or "deepspeed" in result.stderr.lower()
