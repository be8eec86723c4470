"""A run never hurts the user's files: each refusal is one line, exit 2, before anything is written,
and the files it would have touched are byte-identical afterwards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ...conftest import assert_refused, run_cli, snapshot


def train(cache, policy, output, *extra):
    return run_cli("train", "--cache", cache, "--policy", policy, "--output", output, "--no-progress",
                   "--global-batch-size", "8", "--micro-batch-size", "4", *extra, check=False, timeout=300)


@pytest.fixture
def policy(models, tmp_path) -> Path:
    copy = tmp_path / "policy"
    shutil.copytree(models["policy"], copy)
    return copy


def test_an_output_that_is_someone_elses_directory_is_refused_untouched(demo_cache, policy, tmp_path):
    theirs = tmp_path / "theirs"
    (theirs / "model").mkdir(parents=True)
    (theirs / "config.json").write_text('{"mine": true}\n')
    (theirs / "metrics.jsonl").write_text("precious\n")
    (theirs / "model" / "weights.bin").write_bytes(b"\x00" * 64)
    before = snapshot(theirs)
    result = train(demo_cache, policy, theirs, "--max-steps", "1")
    assert_refused(result, f"--output {theirs} is a directory that is neither empty nor a selpipe run")
    assert snapshot(theirs) == before


@pytest.mark.parametrize("where", ["policy", "inside-policy", "cache", "inside-cache"])
def test_an_output_overlapping_the_policy_or_a_cache_is_refused(demo_cache, policy, tmp_path, where):
    output = {"policy": policy, "inside-policy": policy / "run", "cache": demo_cache,
              "inside-cache": demo_cache / "run"}[where]
    before = snapshot(policy), snapshot(demo_cache)
    result = train(demo_cache, policy, output, "--max-steps", "1")
    assert_refused(result, f"--output {output} overlaps", "writing there would change your inputs")
    assert (snapshot(policy), snapshot(demo_cache)) == before and not (demo_cache / "run").exists()


def test_an_output_that_is_a_file_is_refused(demo_cache, policy, tmp_path):
    output = tmp_path / "out"
    output.write_text("keep me")
    assert_refused(train(demo_cache, policy, output), f"--output {output} is a file")
    assert output.read_text() == "keep me"


def test_an_output_below_a_file_is_one_line(demo_cache, policy, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = train(demo_cache, policy, tmp_path / "afile" / "run", "--max-steps", "1")
    assert_refused(result, "afile")


def test_a_poisoned_cache_is_refused_before_step_one(demo_cache, policy, tmp_path):
    from ...pipeline.test_cache_validation import poison

    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    poison(cache, "chosen_ref_logps", float("nan"))
    result = train(cache, policy, tmp_path / "run", "--max-steps", "1")
    assert_refused(result, "chosen_ref_logps holds NaN or infinite values")
    assert not (tmp_path / "run").exists()


def test_a_policy_with_a_missing_weight_file_is_one_line(demo_cache, policy, tmp_path):
    for weights in policy.glob("*.safetensors"):
        weights.unlink()
    assert_refused(train(demo_cache, policy, tmp_path / "run", "--max-steps", "1"), f"--policy {policy}: cannot load")


def test_a_policy_whose_vocabulary_is_smaller_than_its_tokenizer_is_refused(demo_cache, policy, tmp_path):
    config = json.loads((policy / "config.json").read_text())
    config["vocab_size"] = 100
    (policy / "config.json").write_text(json.dumps(config))
    assert_refused(train(demo_cache, policy, tmp_path / "run"), "the model's vocabulary (100) is smaller than its tokenizer's")


def test_an_invalid_deepspeed_config_is_one_line(demo_cache, policy, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{ not json")
    assert_refused(train(demo_cache, policy, tmp_path / "run", "--deepspeed-config", bad),
                   f"--deepspeed-config {bad} is not a readable JSON file")


def test_a_crafted_checkpoint_file_is_refused_on_resume_and_runs_nothing(demo_cache, policy, tmp_path):
    run = tmp_path / "run"
    result = train(demo_cache, policy, run, "--max-steps", "2", "--save-every", "1", "--no-save-model")
    assert result.returncode == 0, result.stderr[-3000:]
    planted = tmp_path / "pwned"
    states = run / "checkpoints" / "step-2" / "mp_rank_00_model_states.pt"
    (tmp_path / "craft.py").write_text(
        "import pathlib, sys, torch\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        f"        return (pathlib.Path.touch, (pathlib.Path({str(planted)!r}),))\n"
        f"torch.save({{'module': Payload()}}, {str(states)!r})\n")
    import subprocess
    import sys

    subprocess.run([sys.executable, str(tmp_path / "craft.py")], check=True)
    resumed = train(demo_cache, policy, run, "--max-steps", "3", "--save-every", "1", "--no-save-model", "--resume")
    assert_refused(resumed, f"{states}: refused to load this checkpoint file")
    assert not planted.exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A small tmpfs (root only, as CI runs), 64 KiB unless asked: room for the run's marker and
    config, not a checkpoint."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()

    def make(options: str, size: int = 64 << 10) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},{options}", "tmpfs", str(mount)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def pages(directory: Path) -> int:
    """Bytes a tmpfs gives the files below `directory`: whole 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in directory.rglob("*") if p.is_file())


def test_a_full_disk_is_one_line(demo_cache, policy, small_filesystem):
    output = small_filesystem("rw") / "run"
    result = train(demo_cache, policy, output, "--max-steps", "1", "--report-to", "none")
    assert_refused(result, "cannot write the run directory")
    assert not list(output.rglob("*.tmp")), "a half-written temporary file was left behind"


def test_a_full_disk_while_saving_the_final_model_is_one_line(demo_cache, policy, tmp_path, small_filesystem):
    """Room for the run and its checkpoint, not for the model saved after it: the mount holds what a
    run of these settings writes on a normal disk (the sizes follow from the settings), less half
    the model."""
    settings = ("--max-steps", "1", "--save-every", "0", "--report-to", "none")
    measured = tmp_path / "measured"
    assert train(demo_cache, policy, measured, *settings).returncode == 0
    output = small_filesystem("rw", size=pages(measured) - pages(measured / "model") // 2) / "run"
    result = train(demo_cache, policy, output, *settings)
    assert_refused(result, "cannot write", "No space left on device", "free some space")
    assert (output / "checkpoints" / "latest").read_text() == "step-1\n"  # the last checkpoint is whole
    assert not (output / "model").exists() and not [p for p in output.rglob("*") if p.name.endswith(".tmp")]


def test_a_read_only_output_is_one_line(demo_cache, policy, small_filesystem):
    output = small_filesystem("ro") / "run"
    assert_refused(train(demo_cache, policy, output, "--max-steps", "1"), f"{output}", "read-only")


def test_a_resume_with_another_adapter_or_zero_stage_is_refused_before_deepspeed_loads(demo_cache, policy, tmp_path):
    run = tmp_path / "run"
    common = ("--max-steps", "3", "--save-every", "1", "--no-save-model", "--report-to", "none")
    first = train(demo_cache, policy, run, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    (run / "checkpoints" / "latest").write_text("step-2\n")  # as if killed after step 2
    assert_refused(train(demo_cache, policy, run, *common, "--resume", "--lora-rank", "4"),
                   "--resume with settings that differ from the checkpoint's (--lora-rank 0 -> 4)")
    assert_refused(train(demo_cache, policy, run, *common, "--resume", "--zero-stage", "2"), "--zero-stage 0 -> 2")


def test_a_resume_with_a_policy_of_another_size_is_one_line_before_deepspeed_loads(demo_cache, policy, tokenizer,
                                                                                   tmp_path):
    from ...conftest import demo

    run = tmp_path / "run"
    common = ("--max-steps", "2", "--save-every", "1", "--no-save-model", "--report-to", "none")
    first = train(demo_cache, policy, run, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    (run / "checkpoints" / "latest").write_text("step-1\n")  # as if killed after step 1
    before = snapshot(run / "checkpoints")
    wider = tmp_path / "wider"
    demo.build_model(wider, tokenizer, hidden_size=192)
    assert_refused(train(demo_cache, wider, run, *common, "--resume"),
                   "--policy has other weights' names or shapes than the checkpoint's (another model)")
    assert snapshot(run / "checkpoints") == before


def test_a_truncated_safetensors_policy_is_one_line(demo_cache, policy, tmp_path):
    [weights] = policy.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    assert_refused(train(demo_cache, policy, tmp_path / "run", "--max-steps", "1"),
                   f"--policy {policy}: cannot load the model", "truncated or damaged")


def test_a_pytorch_model_bin_that_unpickles_with_code_is_refused_in_one_line_and_runs_nothing(demo_cache, policy,
                                                                                             tmp_path):
    import subprocess
    import sys

    for weights in policy.glob("*.safetensors"):
        weights.unlink()
    planted = tmp_path / "pwned"
    (tmp_path / "craft.py").write_text(
        "import pathlib, torch\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        f"        return (pathlib.Path.touch, (pathlib.Path({str(planted)!r}),))\n"
        f"torch.save({{'lm_head.weight': Payload()}}, {str(policy / 'pytorch_model.bin')!r})\n")
    subprocess.run([sys.executable, str(tmp_path / "craft.py")], check=True)
    assert_refused(train(demo_cache, policy, tmp_path / "run", "--max-steps", "1"),
                   f"--policy {policy}: cannot load the model", "was NOT unpickled")
    assert not planted.exists()
