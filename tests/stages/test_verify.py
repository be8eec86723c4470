"""verify_cache (`selpipe verify`)."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from selpipe.pipeline.cache import (PARQUET_OPTIONS, ScoredPair, file_sha256, load_manifest, pairs_to_table, write_json_atomic)
from selpipe.pipeline.config import ConfigError
from selpipe.stages.verify import verify_cache

from ..conftest import run_cli


@pytest.mark.parametrize(("settings", "message"), [
    ({"sample": 0}, "--sample must be at least 1; got 0"),
    ({"dtype": "float8"}, "--dtype must be one of float32, bfloat16, float16; got 'float8'"),
])
def test_bad_settings_are_refused(demo_cache, models, settings, message):
    with pytest.raises(ConfigError, match=message):
        verify_cache(demo_cache, str(models["reference"]), **settings)


def test_a_missing_model_is_named(demo_cache, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"cannot load a tokenizer from '{missing}'"):
        verify_cache(demo_cache, str(missing), sample=1)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match=f"cannot load a tokenizer from '{tmp_path / 'not-a-model'}'"):
        verify_cache(demo_cache, str(tmp_path / "not-a-model"), sample=1)


def test_an_empty_cache_fails(demo_cache, models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = load_manifest(demo_cache)
    totals = {**manifest["totals"], "rows": 0, "bytes": 0, "prompt_tokens": 0, "completion_tokens": 0}
    write_json_atomic(empty / "manifest.json", {**manifest, "totals": totals, "shards": []})
    report = verify_cache(empty, str(models["reference"]))
    assert report["tokens_checked"] == 0 and report["worst_token"] is None
    assert report["passed"] is False
    result = run_cli("verify", empty, "--model", models["reference"], check=False)
    assert result.returncode == 1 and "no tokens were checked" in result.stderr


def test_the_worst_token_names_row_side_and_position(demo_cache, models, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(demo_cache, altered)
    manifest = load_manifest(altered)
    shard = manifest["shards"][2]
    rows = pq.read_table(altered / shard["file"]).to_pylist()
    target = rows[5]
    target["rejected_ref_logps"][3] += 0.5
    pq.write_table(pairs_to_table([ScoredPair(**r) for r in rows]), altered / shard["file"], **PARQUET_OPTIONS)
    shard["bytes"], shard["sha256"] = (altered / shard["file"]).stat().st_size, file_sha256(altered / shard["file"])
    manifest["totals"]["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    write_json_atomic(altered / "manifest.json", manifest)

    report = verify_cache(altered, str(models["reference"]), sample=96)
    assert report["rows_checked"] == 96 and not report["passed"]
    worst = report["worst_token"]
    assert (worst["id"], worst["side"], worst["position"]) == (target["id"], "rejected", 3)
    assert worst["token_id"] == target["rejected_ids"][3]
    assert worst["cached"] == pytest.approx(target["rejected_ref_logps"][3])
    assert abs(worst["cached"] - worst["fresh"]) == pytest.approx(report["max_abs_diff"])
    json.dumps(report)  # the CLI prints it as JSON


def test_a_model_of_another_tokenizer_or_a_smaller_vocabulary_is_one_line(demo_cache, models, tmp_path):
    """--model whose tokenizer differs (its chat template), or whose embedding has 50 rows while the cache
    holds ids up to the tokenizer's size: refused before any rescoring, in one line, exit 2."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    other = tmp_path / "other-tokenizer"
    shutil.copytree(models["reference"], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.chat_template = "{{ messages }}"
    tokenizer.save_pretrained(other)
    small = tmp_path / "small-vocab"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1)).save_pretrained(small)
    AutoTokenizer.from_pretrained(models["reference"]).save_pretrained(small)
    for model, fragment in ((other, "differs in: chat_template"), (small, "outside the policy's vocabulary of 50")):
        result = run_cli("verify", demo_cache, "--model", model, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr
