"""Settings validate themselves: a bad value is one line naming the flag, however the config was built."""

import dataclasses
import typing

import pytest

from selpipe.pipeline.config import (
    ExportConfig, InspectConfig, IOConfig, LossConfig, ScoreConfig, TrainConfig, VerifyConfig, build_config, flag_name,
    identity_settings, load_config_file, setting_fields, to_dict,
)
from selpipe.pipeline.errors import ConfigError

REQUIRED = {"cache": "c", "policy": "p", "output": "o"}


def train_config(**settings) -> TrainConfig:
    return build_config(TrainConfig, {**REQUIRED, **settings})


@pytest.mark.parametrize("settings, message", [
    ({"adam_betas": [0.9]}, "--adam-betas must be two numbers in [0, 1)"),
    ({"adam_betas": [1.5, 0.9]}, "--adam-betas must be two numbers in [0, 1)"),
    ({"seed": -1}, "--seed must be at least 0"),
    ({"save_every": -1}, "--save-every must be at least 0"),
    ({"min_lr_ratio": 0.1}, "--min-lr-ratio applies to --schedule cosine_with_min_lr only"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "--loss-type ipo: the ipo loss has no label smoothing"),
    ({"merge_adapter": True}, "--merge-adapter merges an adapter: set --lora-rank too"),
    ({"load_in_4bit": True}, "--load-in-4bit trains an adapter on a frozen 4-bit base: set --lora-rank too"),
    ({"report_to": "tensorboard,comet"}, "--report-to comet is not a tracker"),
])
def test_bad_training_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        train_config(**settings)


def test_trackers_parse_none_and_lists():
    assert IOConfig(**REQUIRED, report_to="none").trackers() == []
    assert IOConfig(**REQUIRED, report_to="tensorboard, wandb").trackers() == ["tensorboard", "wandb"]


# --------------------------------------------------------------- ranges and finiteness (issue 21)

ALL_CONFIGS = (ScoreConfig, TrainConfig, InspectConfig, VerifyConfig, ExportConfig)
# The smallest valid settings of each command, to which one bad value is added.
VALID = {ScoreConfig: {"input": "i", "output": "o", "model": "m"}, TrainConfig: REQUIRED,
         InspectConfig: {"cache": "c"}, VerifyConfig: {"cache": "c", "model": "m"}, ExportConfig: {"run": "r", "output": "o"}}


def numeric_settings():
    """(class, field, type) of every number-valued setting of every command, groups walked."""
    return [(cls, f, hint) for cls in ALL_CONFIGS for _, f, hint in setting_fields(cls)
            if {int, float} & set(typing.get_args(hint) or (hint,)) and hint is not bool]


def test_every_command_has_numeric_settings_and_they_are_all_bounded():
    """The walk finds the numbers (so the tests below cover them); each has a stated range, except
    SimPO's margin, which may be any finite number."""
    found = {f.name for _, f, _ in numeric_settings()}
    assert {"gradient_clipping", "learning_rate", "beta", "lora_alpha", "gpu_memory_utilization", "tolerance",
            "samples", "step", "max_row_bytes"} <= found
    unbounded = {f.name for _, f, _ in numeric_settings()
                 if all(f.metadata[b] is None for b in ("minimum", "above", "maximum", "below"))}
    assert unbounded == {"simpo_gamma"}


@pytest.mark.parametrize("cls, f, hint", numeric_settings(), ids=lambda v: getattr(v, "name", getattr(v, "__name__", "")))
def test_every_number_must_be_finite(cls, f, hint):
    """nan and inf are refused for every numeric setting, naming its flag, before anything loads."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match=f"^{flag_name(f)} must be (a finite number|an integer.*); got "):
            build_config(cls, {**VALID[cls], f.name: bad})


@pytest.mark.parametrize("cls, f, hint", [s for s in numeric_settings() if s[1].name != "simpo_gamma"],
                         ids=lambda v: getattr(v, "name", getattr(v, "__name__", "")))
def test_every_bound_refuses_the_value_just_outside_it(cls, f, hint):
    """Each stated bound is enforced: at an exclusive bound, or one step (1 for an integer, 0.01
    else) beyond an inclusive one, the setting is refused naming its flag; the default is accepted."""
    step = 1 if int in (typing.get_args(hint) or (hint,)) and float not in (typing.get_args(hint) or (hint,)) else 0.01
    meta = f.metadata
    outside = [meta["above"], meta["below"]] + ([meta["minimum"] - step] if meta["minimum"] is not None else []) \
        + ([meta["maximum"] + step] if meta["maximum"] is not None else [])
    for value in (v for v in outside if v is not None):
        with pytest.raises(ConfigError, match=f"^{flag_name(f)} must be "):
            build_config(cls, {**VALID[cls], f.name: value})
    build_config(cls, VALID[cls])


@pytest.mark.parametrize("settings, message", [
    ({"gradient_clipping": -1.0}, "--gradient-clipping must be at least 0; got -1.0"),
    ({"learning_rate": float("nan")}, "--learning-rate must be a finite number; got nan"),
    ({"learning_rate": -1e-5}, "--learning-rate must be at least 0; got -1e-05"),
    ({"learning_rate": float("inf")}, "--learning-rate must be a finite number; got inf"),
    ({"weight_decay": -1.0}, "--weight-decay must be at least 0; got -1.0"),
    ({"beta": float("nan")}, "--beta must be a finite number; got nan"),
    ({"label_smoothing": float("nan")}, "--label-smoothing must be a finite number; got nan"),
    ({"lora_alpha": float("inf")}, "--lora-alpha must be a finite number; got inf"),
    ({"top_k": 0.0}, "--top-k must be in (0, 1]; got 0.0"),
    ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1); got 1.0"),
    ({"zero_stage": 4}, "--zero-stage must be in [0, 3]; got 4"),
    ({"micro_batch_size": 0}, "--micro-batch-size must be positive; got 0"),
])
def test_the_reported_bad_training_numbers_are_refused_naming_the_flag(settings, message):
    with pytest.raises(ConfigError) as caught:
        train_config(**settings)
    assert str(caught.value) == message


@pytest.mark.parametrize("cls, settings, message", [
    (ScoreConfig, {"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization must be in (0, 1]; got 1.5"),
    (ScoreConfig, {"kv_cache_memory_bytes": -1}, "--kv-cache-memory-bytes must be positive; got -1"),
    (ScoreConfig, {"num_workers": 2, "worker_index": 2}, "--worker-index must be in [0, 2); got 2"),
    (ScoreConfig, {"num_workers": "many"}, "--num-workers must be an integer or 'auto'; got 'many'"),
    (VerifyConfig, {"tolerance": float("nan")}, "--tolerance must be a finite number; got nan"),
    (InspectConfig, {"top_k": 1.5}, "--top-k must be in (0, 1]; got 1.5"),
    (ExportConfig, {"step": 0}, "--step must be positive; got 0"),
    (ExportConfig, {"step": "first"}, "--step must be an integer or 'best' or 'latest'; got 'first'"),
    (ExportConfig, {"metric": ""}, "--metric is required: name a metrics.jsonl key, such as eval/loss"),
    (InspectConfig, {"cache": ""}, "CACHE is required: give a score cache directory"),
])
def test_other_commands_check_their_numbers_the_same_way(cls, settings, message):
    with pytest.raises(ConfigError) as caught:
        build_config(cls, {**VALID[cls], **settings})
    assert str(caught.value) == message


def test_a_bool_is_not_a_number_even_from_python():
    with pytest.raises(ConfigError, match=r"^--step must be an integer or 'best' or 'latest'; got True"):
        ExportConfig(run="r", output="o", step=True)


# --------------------------------------------------------------- config files: a key given twice (issue 21)


@pytest.mark.parametrize("name, text, key", [
    ("run.json", '{"cache": "c", "beta": 0.1, "beta": 0.2}', "'beta'"),
    ("run.json", '{"//": "a comment", "//": "another", "max-length": 64, "max_length": 32}', "'max_length'"),
    ("run.yaml", "cache: c\nbeta: 0.1\nbeta: 0.2\n", "'beta'"),
    ("run.yml", "top-k: 0.5\ntop_k: 0.4\n", "'top_k'"),
])
def test_a_key_given_twice_in_a_config_file_is_an_error_naming_it(tmp_path, name, text, key):
    """JSON and PyYAML both keep the last value silently; a config file must say one thing."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file {path}: the (key|setting) {key} is given twice"):
        load_config_file(path)


def test_comments_may_repeat_and_nested_values_load(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"//": "one", "//": "two", "adam_betas": [0.9, 0.95], "beta": 0.2}')
    assert load_config_file(path) == {"adam_betas": [0.9, 0.95], "beta": 0.2}
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("adam_betas: [0.9, 0.95]\nbeta: .nan\n")
    with pytest.raises(ConfigError, match="--beta must be a finite number; got nan"):
        build_config(TrainConfig, {**REQUIRED, **load_config_file(yaml_path)})


# --------------------------------------------------------------- groups and identity (issue 16)


def test_setting_names_are_unique_across_groups_and_round_trip_flat():
    """Flags and config keys are flat, so no two groups may share a name; to_dict gives back the
    flat settings that build the same config (as a run's saved config.json does for export)."""
    names = [f.name for _, f, _ in setting_fields(TrainConfig)]
    assert len(names) == len(set(names)) == 49
    cfg = train_config(top_k=0.5, seed=3, lora_rank=4, report_to="none")
    flat = to_dict(cfg)
    assert (flat["top_k"], flat["seed"], flat["lora_rank"]) == (0.5, 3, 4)
    assert build_config(TrainConfig, flat) == cfg
    assert (cfg.loss.top_k, cfg.batch.seed, cfg.model.lora_rank, cfg.io.report_to) == (0.5, 3, 4, "none")


def test_resume_invariants_are_the_identity_settings():
    """What a resume must agree on, read from the fields (was a hand-kept list in run_dir.py)."""
    assert set(identity_settings(train_config())) == {
        "global_batch_size", "seed", "shuffle_window", "length_bucketing", "top_k", "loss_type", "beta",
        "label_smoothing", "simpo_gamma", "rpo_alpha", "rpo_tokens", "max_steps", "epochs", "learning_rate",
        "min_lr_ratio", "schedule", "warmup_steps", "weight_decay", "adam_betas", "lora_rank", "lora_alpha",
        "lora_dropout", "lora_target_modules", "load_in_4bit", "precision", "zero_stage"}
    score = ScoreConfig(input="i", output="o", model="m")
    assert score.identity() == identity_settings(score) and "max_row_bytes" in score.identity()
    assert "worker_index" not in score.identity() and "input" not in score.identity()


def test_groups_are_checked_when_built_and_frozen():
    with pytest.raises(ConfigError, match="--beta must be positive"):
        LossConfig(beta=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossConfig().beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("cls, extra", [(VerifyConfig, {"cache": "c", "model": "m"}),
                                        (ScoreConfig, {"input": "i", "output": "o", "model": "m"})])
@pytest.mark.parametrize("device", ["nosuch", "cuda:x", "cpu:0", "cuda:", "gpu"])
def test_a_device_torch_cannot_name_is_one_line_before_anything_loads(cls, extra, device):
    """`verify --device nosuch` was a RuntimeError traceback from `model.to` after the model loaded."""
    with pytest.raises(ConfigError, match=r"^--device must be auto, cpu, mps, cuda or cuda:N; got "):
        build_config(cls, {**extra, "device": device})


def test_cuda_on_a_host_without_it_is_one_line(monkeypatch):
    """`verify --device cuda` on a CPU host was torch's "Torch not compiled with CUDA enabled" traceback."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda: this machine has no CUDA device"):
        build_config(VerifyConfig, {"cache": "c", "model": "m", "device": "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert build_config(VerifyConfig, {"cache": "c", "model": "m", "device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ConfigError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        build_config(VerifyConfig, {"cache": "c", "model": "m", "device": "cuda:2"})
    # The vllm backend places itself: --device (an hf setting) is not checked for it.
    assert build_config(ScoreConfig, {"input": "i", "output": "o", "model": "m", "backend": "vllm",
                                      "device": "cuda:9"}).backend == "vllm"
