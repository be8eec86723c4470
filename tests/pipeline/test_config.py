"""Settings validate themselves: a bad value is one line naming the flag, however the config was built."""

import pytest

from selpipe.pipeline.config import IOConfig, TrainConfig, build_config
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
