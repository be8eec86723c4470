"""LoRA through PEFT: only the adapter trains and is saved, the base stays bit-identical, ZeRO-3 on two
processes gives one process's losses, a resumed run continues the adapter exactly, and merged models
compute what base + adapter compute."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from selpipe.stages.train.safe_load import load_tensors

from ...conftest import per_step, run_cli, torchrun
from ...conftest import train_cli as train
from .test_export import BATCH, export, export_here, logits

LORA = ("--lora-rank", "8", "--learning-rate", "1e-3")
# Four steps of eight pairs, checkpoints at steps 2 and 4; one rank or two (no accumulation on two).
# --top-k 1 (every token selected): see test_lora_under_zero3_on_two_processes_gives_the_losses_of_one.
SHORT = (*LORA, "--max-steps", "4", "--global-batch-size", "8", "--micro-batch-size", "4", "--beta", "0.1",
         "--save-every", "2", "--top-k", "1")


def module_state(run, step):
    """The trained module as ZeRO-0 checkpointed it, named as in the causal LM."""
    raw = load_tensors(run / "checkpoints" / f"step-{step}" / "mp_rank_00_model_states.pt")["module"]
    return {k.removeprefix("policy."): v for k, v in raw.items()}


def adapter_of(directory):
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def with_adapter(policy, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32), adapter)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, demo_cache, models):
    run = tmp_path_factory.mktemp("lora") / "one"
    train(demo_cache, models["policy"], run, *SHORT)
    return run


def test_only_the_adapter_trains_the_loss_falls_and_the_merge_computes_base_plus_adapter(tmp_path, demo_cache, models):
    """The demo's selective settings, shorter: 3 epochs of 96 pairs in batches of 16. Steps 1 and 2
    see the policy equal to the reference (lora_B starts at zero; warm-up starts at lr 0): ln 2.
    The mask then picks the tokens the policy gets most wrong, so the loss rises first, then falls
    (measured: 0.712 over steps 3-6, 0.697 over steps 15-18)."""
    run = tmp_path / "run"
    train(demo_cache, models["policy"], run, *LORA, "--top-k", "0.4", "--beta", "0.1", "--global-batch-size", "16",
          "--micro-batch-size", "8", "--epochs", "3", "--warmup-steps", "2", "--merge-adapter")
    losses = per_step(run, "loss")
    assert sorted(losses) == list(range(1, 19)) and abs(losses[1] - math.log(2)) < 1e-6
    early, late = (sum(losses[s] for s in steps) / 4 for steps in (range(3, 7), range(15, 19)))
    assert late < early - 0.01

    # RUN/model holds the adapter alone.
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "model").iterdir()}
    assert not list((run / "model").glob("model*.safetensors"))
    # The trained module as checkpointed at the last step: the base weights are the policy's, bit for
    # bit; the adapter moved (lora_B starts at zero) and is what RUN/model saved.
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32).state_dict()
    trained = module_state(run, 18)
    base = {k.replace(".base_layer.", "."): v for k, v in trained.items() if "lora_" not in k}
    assert base.keys() == policy.keys()
    assert all(torch.equal(base[k], policy[k]) for k in policy)
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    assert len(lora) == 2 * 7 * 2  # A and B, seven projections, two layers
    assert all(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    saved = adapter_of(run / "model")  # PEFT's names: base_model.model.<name> without the adapter's name
    assert {f"base_model.model.{k}".replace(".default", ""): v for k, v in lora.items()}.keys() == saved.keys()
    assert all(torch.equal(saved[f"base_model.model.{k}".replace(".default", "")], v) for k, v in lora.items())
    # Base + adapter, loaded as a user would: the base layers are the policy's own.
    model = with_adapter(models["policy"], run / "model")
    loaded = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
              for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(loaded[k], policy[k]) for k in policy)

    # model-merged/ (--merge-adapter) computes what base + adapter compute: W + s·BA, rounded once.
    with torch.no_grad():
        expected = model(input_ids=BATCH).logits
    merged = logits(run / "model-merged")
    assert torch.allclose(merged, expected, rtol=0, atol=1e-5) and not torch.allclose(merged, logits(models["policy"]))
    # `selpipe export --merge` of the last checkpoint is that merged model.
    assert export(run, "--merge", "--output", tmp_path / "merged")["kind"] == "merged"
    assert torch.equal(logits(tmp_path / "merged"), merged)


def test_lora_under_zero3_on_two_processes_gives_the_losses_of_one(lora_run, tmp_path, demo_cache, models):
    """Why --top-k 1, and the tolerance. At step 1 lora_B is zero: the policy is the reference, so
    every alignment score r - p is 0 only where the policy's log-probs equal the cache's bit for
    bit; elsewhere it is rounding noise (other padding, other kernels, other threads than stage one
    used), and top-k at k < 1 selects the noise's extremes: a different mask, a different first
    gradient (this test once failed so: step 2 at 0.7294294 against 0.7294867). With k = 1 every
    token is selected on both sides, whatever the noise, so both runs take the same first step by
    construction. What remains is the order of summation: one process accumulates two micro
    batches, two processes all-reduce one each (x/2 + y/2 against (x + y)/2, the same rounding),
    and ZeRO-3 sums partitions where ZeRO-0 sums whole tensors. Each reordered float32 sum moves a
    value by a few ulps; Adam's update m/(sqrt(v) + eps) is scale-free, so weights stay within a
    few ulps of lr-sized steps and each loss (~0.69, ulp 6e-8) within a few ulps too: measured
    0 to 2 ulps. 2e-5 is ~300 ulps of the loss: far above that noise, far below a different mask's
    5.7e-5."""
    two = tmp_path / "two"
    train(demo_cache, models["policy"], two, *SHORT, "--zero-stage", "3", launcher=torchrun(2))
    expected, got = per_step(lora_run, "loss"), per_step(two, "loss")
    assert got.keys() == expected.keys() == {1, 2, 3, 4}
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=2e-5), step
    # The adapter gathered from the partitions at the end computes what one process's computes. (Its
    # weights differ by up to 7e-5: Adam scales summation-order noise in near-zero gradients up to
    # the learning rate. Measured on the logits: 1.4e-5 apart, 0.047 from the base.)
    with torch.no_grad():
        one_logits, two_logits = (with_adapter(models["policy"], run / "model")(input_ids=BATCH).logits
                                  for run in (lora_run, two))
    assert torch.allclose(two_logits, one_logits, rtol=0, atol=1e-4)
    assert (two_logits - logits(models["policy"])).abs().max() > 1e-2
    # Exporting the last ZeRO-3 checkpoint joins the partitioned adapter into the same adapter.
    summary = export_here(two, tmp_path / "exported")
    assert (summary["kind"], summary["step"], summary["zero_stage"]) == ("adapter", 4, 3)
    exported, gathered = adapter_of(tmp_path / "exported"), adapter_of(two / "model")
    assert exported.keys() == gathered.keys() and all(torch.equal(exported[k], gathered[k]) for k in exported)


def test_a_resumed_lora_run_continues_with_the_losses_of_an_uninterrupted_one(lora_run, tmp_path, demo_cache, models):
    # What a kill after the step-2 checkpoint leaves: step 2 is the latest; metrics rows after it are redone.
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "checkpoints" / "step-4")
    (run / "checkpoints" / "latest").write_text("step-2\n")
    train(demo_cache, models["policy"], run, *SHORT, "--resume")
    clean, resumed = per_step(lora_run, "loss"), per_step(run, "loss")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(clean[step], abs=1e-6), step
    assert json.loads((run / "summary.json").read_text())["steps_this_run"] == 2
    clean_adapter, resumed_adapter = adapter_of(lora_run / "model"), adapter_of(run / "model")
    assert all(torch.allclose(clean_adapter[k], resumed_adapter[k], rtol=0, atol=1e-6) for k in clean_adapter)


def test_load_in_4bit_without_a_gpu_is_one_line(tmp_path, demo_cache, models):
    result = run_cli("train", "--cache", demo_cache, "--policy", models["policy"], "--output", tmp_path / "run",
                     "--no-progress", "--lora-rank", "8", "--load-in-4bit", "--max-steps", "1",
                     env={"OMP_NUM_THREADS": "1"}, check=False, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("error: --load-in-4bit needs a CUDA GPU"), lines[-1]
