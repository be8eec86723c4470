"""`selpipe export`: a checkpoint of a run, under ZeRO 0 (whole weights) or ZeRO 3 (partitions), as
the Hugging Face model the run would have saved at that step."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch

from selpipe.pipeline.config import ExportConfig
from selpipe.pipeline.errors import CacheError, ConfigError
from selpipe.stages.train.export import best_step, export_checkpoint

from ...conftest import TINY_RUN, assert_refused, demo, per_step, run_cli, snapshot, train_cli



def export(run, *extra, check=True):
    """`selpipe export RUN ... --json` as a user runs it: its summary, or with check=False the finished process."""
    result = run_cli("export", run, "--json", *extra, env={"OMP_NUM_THREADS": "1"}, check=check, timeout=300)
    return json.loads(result.stdout) if check else result


def export_here(run, output, **settings):
    """The same export in this process (a fresh process costs seconds of imports)."""
    return export_checkpoint(ExportConfig(run=str(run), output=str(output), **settings))


BATCH = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(directory) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=BATCH).logits


@pytest.fixture(scope="module")
def zero0_run(tiny_run):
    """Two steps under ZeRO 0, a checkpoint at each, evaluated at each: the shared tiny run."""
    return tiny_run


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, demo_cache, models):
    """The same two steps under ZeRO 3: one process, gloo on CPU; the checkpoints hold partitions,
    and (--save-hf-checkpoints) a gathered Hugging Face copy beside each."""
    run = tmp_path_factory.mktemp("export") / "zero3"
    train_cli(demo_cache, models["policy"], run, *TINY_RUN, "--zero-stage", "3", "--save-hf-checkpoints")
    return run


def test_save_hf_checkpoints_writes_a_loadable_model_beside_each_checkpoint(zero3_run, tmp_path):
    step1 = export_here(zero3_run, tmp_path / "step-1", step=1)
    assert step1["step"] == 1
    assert torch.allclose(logits(zero3_run / "checkpoints" / "step-1" / "hf"), logits(tmp_path / "step-1"), rtol=0, atol=1e-6)
    assert torch.allclose(logits(zero3_run / "checkpoints" / "step-2" / "hf"), logits(zero3_run / "model"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 3])
def test_each_checkpoint_exports_as_the_model_the_run_saved_at_its_step(stage, request, tmp_path, models):
    run = request.getfixturevalue(f"zero{stage}_run")
    (tmp_path / "step-1").mkdir()  # an empty directory is as good as a new one
    first = export_here(run, tmp_path / "step-1", step=1)
    last = export(run, "--output", tmp_path / "step-2")  # --step latest by default
    assert (first["step"], last["step"], last["kind"], last["zero_stage"]) == (1, 2, "model", stage)
    # The run saved its model at its last step, step 2: the export of step 2 is that model.
    saved = logits(run / "model")
    assert torch.allclose(logits(tmp_path / "step-2"), saved, rtol=0, atol=1e-6)
    step1 = logits(tmp_path / "step-1")
    assert (step1 - saved).abs().max() > 1e-4 and (step1 - logits(models["policy"])).abs().max() > 1e-4
    # The policy's tokenizer and chat template go with it.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "step-2").eos_token == "<|im_end|>"


def test_best_is_the_kept_checkpoint_with_the_lowest_eval_loss(zero0_run, tmp_path):
    losses = per_step(zero0_run, "eval/loss")
    assert sorted(losses) == [0, 1, 2] and losses[1] != losses[2]
    lowest, highest = sorted((1, 2), key=losses.get)  # step 0 has no checkpoint
    best = export_here(zero0_run, tmp_path / "best", step="best")
    worst = export_here(zero0_run, tmp_path / "worst", step="best", greater_is_better=True)
    assert (best["step"], best["eval/loss"]) == (lowest, losses[lowest])
    assert (worst["step"], worst["eval/loss"]) == (highest, losses[highest])
    # The run's own model is step 2's: exactly the export of step 2 matches it.
    saved = logits(zero0_run / "model")
    matches = {s["step"]: torch.allclose(logits(tmp_path / name), saved, rtol=0, atol=1e-6)
               for s, name in ((best, "best"), (worst, "worst"))}
    assert matches == {1: False, 2: True}


def test_best_step_golden(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/loss": 0.5},        # lowest, but step 0 is never a checkpoint
            {"step": 2, "loss": 0.1},             # a training row: another key
            {"step": 2, "eval/loss": 0.65},
            {"step": 3, "eval/loss": float("nan")},
            {"step": 4, "eval/loss": 0.66},
            {"step": 5, "eval/loss": 0.60},       # lower, but not kept
            {"step": 6, "eval/loss": 0.65}]       # ties step 2
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "eval/lo')  # cut by a kill
    assert best_step(metrics, "eval/loss", [2, 3, 4, 6], greater_is_better=False) == (2, 0.65)  # the earlier of a tie
    assert best_step(metrics, "eval/loss", [3, 4, 6], greater_is_better=False) == (6, 0.65)     # NaN never wins
    assert best_step(metrics, "eval/loss", [2, 3, 4, 6], greater_is_better=True) == (4, 0.66)
    with pytest.raises(ConfigError, match=r"logs no eval/accuracy at a kept checkpoint \(steps 2, 4\)"):
        best_step(metrics, "eval/accuracy", [2, 4], greater_is_better=False)
    with pytest.raises(ConfigError, match="logs no eval/loss"):
        best_step(tmp_path / "absent.jsonl", "eval/loss", [2], greater_is_better=False)
    assert best_step(metrics, "eval/loss", [3, 4], greater_is_better=True) == (4, 0.66)      # nor when highest wins


def test_refusals_are_one_line_and_write_nothing(zero3_run, models, tokenizer, tmp_path):
    new = tmp_path / "new"
    # A model directory has a config.json too, but not a run's.
    assert_refused(export(models["policy"], "--output", new, check=False),
                   f"RUN {models['policy']} is not a selpipe training run")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert_refused(export(zero3_run, "--output", theirs, check=False),
                   f"--output {theirs} is a directory that is neither empty nor a new directory")
    assert (theirs / "notes.txt").read_text() == "keep me" and len(list(theirs.iterdir())) == 1
    # The rest raise the same one-line errors (the CLI prints any of them as above).
    with pytest.raises(ConfigError, match="has no checkpoint of that step; its checkpoints are at steps 1, 2"):
        export_here(zero3_run, new, step=7)
    with pytest.raises(ConfigError, match=r"logs no eval/loss at a kept checkpoint \(steps 1, 2\)"):
        export_here(zero3_run, new, step="best")
    with pytest.raises(ConfigError, match="--merge merges a LoRA adapter"):
        export_here(zero3_run, new, merge=True)
    moved = tmp_path / "run"
    shutil.copytree(zero3_run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["train"]["policy"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"the run's policy {tmp_path / 'gone'} is not a directory here"):
        export_here(moved, new)
    # A --policy that is not the model the run trained: loading is strict, names and shapes.
    for name, shape, reason in (("one-layer", {"layers": 1}, "unexpected model.layers.1."),
                                ("narrower", {"hidden_size": 64}, "size mismatch for model.embed_tokens.weight")):
        demo.build_model(tmp_path / name, tokenizer, **shape)
        with pytest.raises(CacheError, match=rf"its weights do not fit the policy {tmp_path / name} \({reason}"):
            export_here(zero3_run, new, policy=str(tmp_path / name))
    export_here(moved, new, policy=str(models["policy"]))  # --policy: where it is now
    assert not any(p.name.startswith(".new") for p in tmp_path.iterdir())


class Payload:
    """Unpickling this touches a file: what a crafted checkpoint could do instead."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_a_crafted_checkpoint_file_is_refused_before_deepspeed_reads_it(zero3_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    planted = tmp_path / "pwned"
    # zero_to_fp32 reads the ZeRO-3 optimizer partitions with weights_only=False.
    states = run / "checkpoints" / "step-2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(planted)}, states)
    before = snapshot(run)
    with pytest.raises(CacheError, match="refused to load this checkpoint file"):
        export_here(run, tmp_path / "out")
    assert not planted.exists() and not (tmp_path / "out").exists() and snapshot(run) == before


@pytest.mark.parametrize("inside", ["model", "checkpoints/step-1", "checkpoints/step-2/hf", "."])
def test_an_output_inside_the_run_is_refused(zero3_run, tmp_path, inside):
    """A resumed run deletes old checkpoints and replaces model/: an export there would be lost."""
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    before = snapshot(run)
    output = run / inside
    assert_refused(export(run, "--output", output, check=False), f"--output {output} overlaps RUN {run}")
    assert snapshot(run) == before


def test_two_exports_into_one_output_the_second_is_refused_naming_the_first(zero0_run, tmp_path):
    from selpipe.pipeline.ownership import output_lease

    output = tmp_path / "out"
    with output_lease(output, "export"):  # another export holding it, alive (this process)
        result = export(zero0_run, "--output", output, check=False)
    assert_refused(result, f"--output {output} is in use by `selpipe export` on host", f"pid {os.getpid()}")
    assert not output.exists()
