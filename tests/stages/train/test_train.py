"""Stage two end to end, each run in its own process as a user launches it."""

import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest

from selpipe.pipeline.config import BatchConfig, ConfigError
from selpipe.stages.score_ref import run_score_ref
from selpipe.stages.train import free_port

from ...conftest import BIN, REPO, demo, per_step, torchrun, write_jsonl
from ...conftest import train_cli as train


@pytest.fixture(scope="module")
def demo_caches(tmp_path_factory, score_config):
    """The demo's train (512 pairs) and eval (128 pairs) data, scored by the tiny reference."""
    root = tmp_path_factory.mktemp("demo")
    caches = {}
    for name, count, seed in (("train", 512, 1), ("eval", 128, 2)):
        rows = write_jsonl(root / f"{name}.jsonl", demo.generate_pairs(count, seed, name))
        run_score_ref(score_config(rows, root / name, shard_size=128, row_group_size=32))
        caches[name] = root / name
    return caches


def test_loss_falls_and_eval_preference_accuracy_rises(tmp_path, demo_caches, models):
    """The demo's own settings. Step 1 sees policy == reference (loss ln 2, all scores tied, every
    token selected); the mask then picks the tokens the policy gets most wrong, so the loss first
    rises above ln 2 and then falls as training fixes them."""
    settings = ("--eval-cache", demo_caches["eval"], "--top-k", "0.4", "--beta", "0.1", "--learning-rate", "3e-4",
                "--warmup-steps", "4", "--epochs", "2", "--global-batch-size", "16", "--micro-batch-size", "8",
                "--eval-every", "32")
    train(demo_caches["train"], models["policy"], tmp_path / "run", *settings)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    losses = per_step(tmp_path / "run")
    assert len(losses) == 64 and abs(losses[1] - 0.6931472) < 1e-6
    early = sum(losses[s] for s in range(2, 18)) / 16
    late = sum(losses[s] for s in range(49, 65)) / 16
    assert late < early - 0.02
    before, after = summary["eval_before"]["eval/preference_accuracy"], summary["eval_after"]["eval/preference_accuracy"]
    assert before == 0.5 and after > 0.65
    dpo_losses = per_step(tmp_path / "run", "eval/dpo_loss")  # every token counted: comparable across k
    assert dpo_losses[0] == pytest.approx(0.6931472, abs=1e-6) and dpo_losses[64] < dpo_losses[0]
    assert per_step(tmp_path / "run", "eval/preference_accuracy")[64] == after  # evaluated at the last step
    assert sorted(per_step(tmp_path / "run", "eval/loss")) == [0, 32, 64]
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    for step in (2, 64):
        row = rows[step]
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-6)
        assert (row["rewards/accuracies"] * 16) == pytest.approx(round(row["rewards/accuracies"] * 16))  # of 16 pairs
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 and row["tokens_per_second"] > 0
    # Linear warm-up from 0 over 4 steps: step k applies 3e-4 * (k - 1) / 4 until step 5.
    assert [rows[k]["lr"] for k in (1, 2, 5)] == pytest.approx([0.0, 7.5e-5, 3e-4])
    assert 0.35 < per_step(tmp_path / "run", "selected_fraction/chosen")[64] < 0.6
    for side in ("chosen", "rejected"):  # at k = 0.4, tau is each response's 0.6 quantile
        q10, q50, tau, q90 = (per_step(tmp_path / "run", f"scores/{side}_{name}")[64] for name in ("q10", "q50", "threshold", "q90"))
        assert q10 <= q50 <= tau <= q90
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["top_k"] == 0.4

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "model").eos_token == "<|im_end|>"
    start = AutoModelForCausalLM.from_pretrained(models["policy"])
    assert any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), start.parameters()))

    # Rerunning a finished run with --resume redoes nothing and reports the same thing.
    metrics, weights = (tmp_path / "run" / "metrics.jsonl").read_text(), next((tmp_path / "run" / "model").glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    train(demo_caches["train"], models["policy"], tmp_path / "run", *settings, "--resume")
    rerun = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics and weights.stat().st_mtime_ns == written
    assert rerun["steps_this_run"] == 0
    for key in ("eval_before", "eval_after", "final"):
        assert rerun[key] == summary[key], key


# --top-k 1: at step 1 the policy is the reference, and top-k at k < 1 would select rounding noise that
# differs with the micro batches' padding (see test_lora.py's two-process test for the arithmetic).
SAME_BATCH = ("--max-steps", "4", "--global-batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "1e-3",
              "--beta", "0.1", "--save-every", "0", "--no-save-model", "--top-k", "1")


def deepspeed_launcher(processes):
    """DeepSpeed's own launcher, which passes `--local_rank=N` before the command."""
    return (str(BIN / "deepspeed"), "--num_gpus", str(processes), "--master_port", str(free_port()))


@pytest.mark.slow  # two 2-process runs; the default suite's one is test_lora.py's
def test_two_processes_give_the_losses_of_one(tmp_path, demo_caches, models):
    train(demo_caches["train"], models["policy"], tmp_path / "one", *SAME_BATCH)
    expected = per_step(tmp_path / "one")
    for stage, launcher in ((2, deepspeed_launcher(2)), (3, torchrun(2))):
        train(demo_caches["train"], models["policy"], tmp_path / f"two-z{stage}", *SAME_BATCH, "--zero-stage", stage,
              launcher=launcher)
        got = per_step(tmp_path / f"two-z{stage}")
        assert got.keys() == expected.keys()
        for step in expected:
            assert got[step] == pytest.approx(expected[step], abs=2e-5), (stage, step)


@pytest.mark.slow  # a 2-process run (test_lora.py's default one gathers a ZeRO-3 adapter)
def test_final_model_is_gathered_under_zero3(tmp_path, demo_caches, models):
    train(demo_caches["train"], models["policy"], tmp_path / "z3", "--max-steps", "2", "--global-batch-size", "8",
          "--micro-batch-size", "4", "--zero-stage", "3", "--learning-rate", "1e-3", launcher=torchrun(2))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "z3" / "model")
    start = AutoModelForCausalLM.from_pretrained(models["policy"])
    shapes = [p.shape for p in model.parameters()]
    assert shapes == [p.shape for p in start.parameters()]
    assert any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), start.parameters()))


def test_killed_run_resumes_with_the_losses_of_an_uninterrupted_one(tmp_path, demo_caches, models):
    settings = ("--epochs", "3", "--global-batch-size", "8", "--micro-batch-size", "4", "--learning-rate", "5e-4",
                "--beta", "0.1", "--warmup-steps", "5", "--save-every", "7", "--no-save-model")
    train(demo_caches["train"], models["policy"], tmp_path / "clean", *settings)
    command = [str(BIN / "selpipe"), "train", "--cache", str(demo_caches["train"]), "--policy", str(models["policy"]),
               "--output", str(tmp_path / "killed"), "--no-progress", *settings]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() != "step-7"):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the kill must land mid-run"
    killed_at = int(latest.read_text().strip()[5:])
    assert 14 <= killed_at < 192
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 999, "loss": 0.')  # what a kill in the middle of a write leaves
    refused(train(demo_caches["train"], models["policy"], tmp_path / "killed", *settings, "--seed", "1",
                  "--learning-rate", "1e-3", "--resume", check=False), "--seed 0 -> 1", "--learning-rate 0.0005 -> 0.001")
    refused(train(demo_caches["eval"], models["policy"], tmp_path / "killed", *settings, "--resume", check=False),
            "--cache holds other scores than the checkpoint's")
    # The same cache at another path (another mount) resumes: caches are compared by content.
    moved = tmp_path / "moved-cache"
    shutil.copytree(demo_caches["train"], moved)
    train(moved, models["policy"], tmp_path / "killed", *settings, "--resume")
    clean, resumed = per_step(tmp_path / "clean"), per_step(tmp_path / "killed")
    assert sorted(resumed) == sorted(clean) == list(range(1, 193))  # no step logged twice or lost
    for step in range(killed_at + 1, 193):
        assert resumed[step] == pytest.approx(clean[step], abs=1e-6), step


def test_a_resume_without_a_checkpoint_starts_over_and_logs_each_step_once(tmp_path, demo_caches, models):
    short = ("--max-steps", "2", "--global-batch-size", "8", "--micro-batch-size", "8", "--eval-cache", demo_caches["eval"],
             "--no-save-model")
    train(demo_caches["train"], models["policy"], tmp_path / "run", *short)
    refused(train(demo_caches["train"], models["policy"], tmp_path / "run", *short, check=False), "already holds a run")
    # A finished run whose checkpoints were deleted: nothing to resume from, its results are kept.
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    refused(train(demo_caches["train"], models["policy"], tmp_path / "run", *short, "--resume", check=False),
            "holds a finished run (summary.json) but no checkpoint to resume from")
    # What a kill before the first checkpoint leaves: metrics, no checkpoint, no summary. --resume starts over.
    (tmp_path / "run" / "summary.json").unlink()
    train(demo_caches["train"], models["policy"], tmp_path / "run", *short, "--resume")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2]  # eval at 0, two steps, eval at 2: once each


def test_anchor_cache_moves_the_rewards_but_not_the_mask(tmp_path, demo_caches, models, score_config):
    common = ("--max-steps", "2", "--global-batch-size", "8", "--micro-batch-size", "8", "--learning-rate", "1e-3", "--no-save-model")
    train(demo_caches["train"], models["policy"], tmp_path / "plain", *common)
    train(demo_caches["train"], models["policy"], tmp_path / "same", *common, "--anchor-scores", demo_caches["train"])
    assert per_step(tmp_path / "plain") == per_step(tmp_path / "same")
    # An anchor scored by another model (same tokenizer, same rows): the scoring cache still
    # picks the tokens, the anchor's log-probs set the rewards.
    rows = demo.generate_pairs(512, 1, "train")
    other = tmp_path / "other-anchor"
    run_score_ref(score_config(write_jsonl(tmp_path / "rows.jsonl", rows), other, model=str(models["other"]),
                               shard_size=128, row_group_size=32))
    train(demo_caches["train"], models["policy"], tmp_path / "other", *common, "--anchor-scores", other)
    for key in ("selected_fraction/chosen", "selected_fraction/rejected"):
        assert per_step(tmp_path / "other", key)[1] == per_step(tmp_path / "plain", key)[1]
    assert per_step(tmp_path / "other", "rewards/chosen")[1] != per_step(tmp_path / "plain", "rewards/chosen")[1]


def refused(result, *fragments, code=2):
    assert result.returncode == code, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-3000:])


def test_refusals_before_training(tmp_path, demo_caches, models, score_config):
    short = ("--max-steps", "1", "--global-batch-size", "8", "--micro-batch-size", "8")
    # A cache scored with another tokenizer.
    other_root = tmp_path / "other-tok"
    tokenizer = demo.build_tokenizer(other_root / "tok", demo.corpus(), vocab_size=400)
    demo.build_model(other_root / "model", tokenizer)
    rows = write_jsonl(tmp_path / "rows.jsonl", demo.generate_pairs(16, 1, "o"))
    run_score_ref(score_config(rows, other_root / "cache", model=str(other_root / "model")))
    refused(train(other_root / "cache", models["policy"], tmp_path / "r1", *short, check=False),
            "tokenizer differs", "vocab")
    # A truncated shard.
    damaged = tmp_path / "damaged"
    shutil.copytree(demo_caches["train"], damaged)
    shard = sorted(damaged.glob("part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    refused(train(damaged, models["policy"], tmp_path / "r2", *short, check=False), "the shard was truncated or replaced")
    # An unknown schema version.
    future = tmp_path / "future"
    shutil.copytree(demo_caches["train"], future)
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 7}))
    refused(train(future, models["policy"], tmp_path / "r3", *short, check=False), "schema version 7")
    # An anchor cache of other rows, and one of the same rows cut into other row groups.
    refused(train(demo_caches["train"], models["policy"], tmp_path / "r4", *short, "--anchor-scores",
                  demo_caches["eval"], check=False), "anchor cache")
    regrouped = tmp_path / "regrouped"
    run_score_ref(score_config(write_jsonl(tmp_path / "train.jsonl", demo.generate_pairs(512, 1, "train")), regrouped,
                               shard_size=128, row_group_size=16))
    refused(train(demo_caches["train"], models["policy"], tmp_path / "r4b", *short, "--anchor-scores", regrouped,
                  check=False), "shards or row groups differ", "--row-group-size")
    # An eval cache in which every row was skipped.
    empty = tmp_path / "empty-eval"
    run_score_ref(score_config(rows, empty, max_length=8, max_prompt_length=4, truncation="skip"))
    refused(train(demo_caches["train"], models["policy"], tmp_path / "r4c", *short, "--eval-cache", empty, check=False),
            "the eval cache holds no rows")
    # Impossible settings.
    refused(train(demo_caches["train"], models["policy"], tmp_path / "r5", "--top-k", "1.5", check=False), "--top-k must be in (0, 1]")
    refused(train(demo_caches["train"], models["policy"], tmp_path / "r6", "--top-k", "0", check=False), "--top-k must be in (0, 1]")
    refused(train(demo_caches["train"], models["policy"], tmp_path / "r7", "--global-batch-size", "10",
                  "--micro-batch-size", "4", check=False), "multiple of --micro-batch-size")


@pytest.mark.slow  # two processes
def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, demo_caches, models):
    refused(train(demo_caches["train"], models["policy"], tmp_path / "r8", "--global-batch-size", "12",
                  "--micro-batch-size", "4", launcher=torchrun(2), check=False),
            "divisible by --micro-batch-size (4) x ranks (2)", code=1)  # torchrun reports a failed child as 1


def test_global_batch_must_split_over_ranks():
    cfg = BatchConfig(global_batch_size=24, micro_batch_size=4)
    assert cfg.gradient_accumulation_steps(2) == 3
    with pytest.raises(ConfigError, match=r"x ranks \(4\) = 16"):
        cfg.gradient_accumulation_steps(4)
