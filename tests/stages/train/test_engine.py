"""engine.py without a process group: the DeepSpeed config selpipe writes, the rank-0 verdict
protocol of `Comm` (two ranks simulated over a fake broadcast), and the policy's shape digest."""

from __future__ import annotations

import json

import pytest
import torch

from selpipe.pipeline.config import TrainConfig, build_config
from selpipe.pipeline.errors import CacheError, ConfigError
from selpipe.stages.train.engine import Comm, add_adapter, deepspeed_config, weight_shapes


def settings(**overrides) -> TrainConfig:
    return build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", **overrides})


def test_the_deepspeed_config_carries_selpipes_settings():
    cfg = settings(global_batch_size=24, micro_batch_size=4, gradient_clipping=0.5, learning_rate=2e-4,
                   weight_decay=0.1, adam_betas=[0.9, 0.95], zero_stage=2)
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 4, 3)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                         "torch_adam": not torch.cuda.is_available()}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # fp32 on a CPU
    assert not any(key.startswith("//") for key in ds)  # the shipped file's comment stays out


def test_a_given_deepspeed_config_must_agree_with_the_zero_stage(tmp_path):
    given = tmp_path / "ds.json"
    given.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"asks for ZeRO stage 3 but --zero-stage is 0"):
        deepspeed_config(settings(deepspeed_config=str(given)), world_size=1)
    given.write_text(json.dumps({"zero_optimization": [3]}))
    with pytest.raises(ConfigError, match="zero_optimization and optimizer are objects"):
        deepspeed_config(settings(deepspeed_config=str(given)), world_size=1)


class FakeDist:
    """deepspeed.comm's broadcast between simulated ranks: rank 0's tensors are queued, in order,
    and each other rank receives them in the same order."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []
        self.received = 0

    def broadcast(self, tensor, src):
        assert src == 0
        if self.rank == 0:
            self.sent.append(tensor.clone())
        else:
            tensor.copy_(self.sent[self.received])
            self.received += 1


def simulated(rank: int, dist: FakeDist) -> Comm:
    comm = object.__new__(Comm)  # no process group: only the broadcast is used
    comm.rank, comm.world_size, comm.closed, comm._dist = rank, 2, False, dist
    return comm


def run_on_two_ranks(work):
    """(rank 0's outcome, rank 1's outcome) of `on_rank_zero(work)`: a result or the error raised."""
    dist, outcomes = FakeDist(), []
    for rank in (0, 1):
        dist.rank = rank
        try:
            outcomes.append(simulated(rank, dist).on_rank_zero(work))
        except Exception as err:  # noqa: BLE001 - the outcome under test
            outcomes.append(err)
    return outcomes


def test_rank_zeros_one_line_error_is_raised_on_every_rank():
    calls = []

    def refuse():
        calls.append(1)
        raise CacheError("/c/part-0.parquet: checksum mismatch; rescore it")

    zero, one = run_on_two_ranks(refuse)
    assert calls == [1]  # only rank 0 did the work
    assert type(zero) is type(one) is CacheError and str(zero) == str(one) == "/c/part-0.parquet: checksum mismatch; rescore it"


def test_rank_zeros_result_stays_on_rank_zero_and_text_crosses_whole():
    assert run_on_two_ranks(lambda: {"ok": True}) == [{"ok": True}, None]
    dist = FakeDist()
    text = "manifest: \u00e9t\u00e9 \u2713 " * 100
    dist.rank = 0
    assert simulated(0, dist).broadcast_text(text) == text
    dist.rank = 1
    assert simulated(1, dist).broadcast_text(None) == text


def test_the_shape_digest_tells_another_model_size_and_ignores_the_adapter(models, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from ...conftest import demo

    policy = AutoModelForCausalLM.from_pretrained(models["policy"])
    same = AutoModelForCausalLM.from_pretrained(models["other"])  # other weights, same shapes
    assert weight_shapes(policy) == weight_shapes(same)
    demo.build_model(tmp_path / "wider", tokenizer, hidden_size=192)
    assert weight_shapes(AutoModelForCausalLM.from_pretrained(tmp_path / "wider")) != weight_shapes(policy)
    digest = weight_shapes(policy)
    add_adapter(settings(lora_rank=4).model, policy)  # injects LoRA in place
    assert weight_shapes(policy) == digest
