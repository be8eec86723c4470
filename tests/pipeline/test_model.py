"""Every way a model directory can be unusable is one line naming the flag, the path and the fix.

The broken models are real: a tiny Qwen2 saved by transformers, then damaged on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from selpipe.pipeline.errors import ConfigError
from selpipe.pipeline.model import load_causal_lm, load_model_config


def _config(hidden: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def _save(directory: Path, hidden: int = 16) -> Path:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(_config(hidden)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("model") / "good")


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def _refused(path: Path, *fragments: str, flag: str = "--policy", **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load_causal_lm(path, dtype=torch.float32, flag=flag, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{flag} {path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_good_model_loads_in_the_dtype_asked(good):
    model = load_causal_lm(good, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_truncated_safetensors_file_is_one_line(good, tmp_path):
    model = _copy(good, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 20):  # the tensors cut short; the header itself cut short
        weights.write_bytes(data[:cut])
        _refused(model, "truncated or damaged", "SafetensorError")


def test_missing_weights_missing_directory_and_a_file_are_one_line(good, tmp_path):
    model = _copy(good, tmp_path)
    (model / "model.safetensors").unlink()
    _refused(model, "holds no weights")
    _refused(tmp_path / "absent", "does not exist", flag="--model")
    _refused(model / "config.json", "is a file")


def test_a_pickle_that_runs_code_is_refused_without_running(good, tmp_path):
    model = _copy(good, tmp_path)
    (model / "model.safetensors").unlink()
    witness = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    torch.save({"model.embed_tokens.weight": Payload()}, model / "pytorch_model.bin")
    _refused(model, "was NOT unpickled", "UnpicklingError")
    assert not witness.exists()


def test_an_unreadable_config_is_one_line_for_both_loaders(good, tmp_path):
    model = _copy(good, tmp_path)
    (model / "config.json").write_text("{torn")
    _refused(model, "config.json cannot be read")
    with pytest.raises(ConfigError, match=rf"^--policy {model}: cannot read the model's config .*config.json") as caught:
        load_model_config(model)
    assert "\n" not in str(caught.value)
    config = json.loads((good / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    _refused(model, "ValueError", "no-such-architecture")


def test_load_model_config_reads_the_config(good):
    assert load_model_config(good, "--model").hidden_size == 16


def test_weights_of_another_size_than_the_config_are_one_line(good, tmp_path):
    model = _copy(good, tmp_path)
    bigger = _save(tmp_path / "bigger", hidden=32)
    shutil.copy(bigger / "model.safetensors", model / "model.safetensors")
    _refused(model, "another size than its config.json")


def test_a_state_of_another_size_or_other_names_is_one_line(good, tmp_path):
    from transformers import Qwen2ForCausalLM

    other = Qwen2ForCausalLM(_config(32)).state_dict()
    _refused(good, "do not fit this model", "size mismatch for", state=other)
    own = load_causal_lm(good, dtype=torch.float32).state_dict()
    _refused(good, "missing lm_head.weight", state={k: v for k, v in own.items() if k != "lm_head.weight"})
    _refused(good, "unexpected extra", state={**own, "extra": torch.zeros(1)})
    changed = {k: v + 1 for k, v in own.items()}
    loaded = load_causal_lm(good, dtype=torch.float32, state=changed)
    assert torch.equal(loaded.state_dict()["lm_head.weight"], changed["lm_head.weight"])


def test_loading_prints_nothing_and_restores_the_libraries_settings(good, tmp_path, capfd):
    """transformers prints a progress bar (and, for weights of another size, a report) to stderr:
    a failure must be the one line raised alone, so the loader silences both, then restores them."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    load_causal_lm(good, dtype=torch.float32)
    model = _copy(good, tmp_path)
    shutil.copy(_save(tmp_path / "bigger", hidden=32) / "model.safetensors", model / "model.safetensors")
    capfd.readouterr()
    _refused(model, "another size")
    load_causal_lm(good, dtype=torch.float32)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert logging.get_verbosity() == verbosity and logging.is_progress_bar_enabled()
