"""`PolicyForward`: which of the three log-prob paths a micro batch takes, and that they agree."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from selpipe.pipeline import forward as forward_module
from selpipe.pipeline.batching import top_k_selector
from selpipe.pipeline.config import LossConfig, ModelConfig
from selpipe.pipeline.forward import PolicyForward
from selpipe.pipeline.prefix import SharedPromptBatch

from .test_logprobs import pair_rows, selective_loss


def test_of_reads_the_model_and_loss_groups():
    forward = PolicyForward.of(ModelConfig(logprob_chunk=64, selective_head=False, prefix_sharing=True),
                               LossConfig(top_k=0.3, rpo_alpha=0.5, rpo_tokens="all"))
    assert forward == PolicyForward(chunk_size=64, selective_head=False, prefix_sharing=True, top_k=0.3,
                                    head_on_all_chosen=True)
    assert not PolicyForward.of(ModelConfig(), LossConfig(rpo_alpha=0.5, rpo_tokens="selected")).head_on_all_chosen


def test_inputs_pack_only_with_prefix_sharing():
    rows = pair_rows()[:2]
    batch, packed = PolicyForward().inputs(rows, 0, torch.device("cpu"), weights=[1.0, 0.0])
    assert packed is None and batch.pairs == 2 and batch.weights.tolist() == [1.0, 0.0]
    _, packed = PolicyForward(prefix_sharing=True).inputs(rows, 0, torch.device("cpu"))
    assert isinstance(packed, SharedPromptBatch) and packed.input_ids.shape[0] == 2  # one row per pair


def test_the_head_is_selective_only_where_it_saves_work_and_a_gradient_is_taken():
    batch, _ = PolicyForward().inputs(pair_rows(), 0, torch.device("cpu"))
    assert PolicyForward(top_k=0.4).selector(batch) is not None
    assert PolicyForward(top_k=1.0).selector(batch) is None  # every token selected: nothing to save
    assert PolicyForward(top_k=0.4, selective_head=False).selector(batch) is None
    with torch.no_grad():  # evaluation: no gradient, no head recomputation
        assert PolicyForward(top_k=0.4).selector(batch) is None
    flat = -8 * torch.rand(sum(batch.completion_lengths), generator=torch.Generator().manual_seed(0))
    assert torch.equal(PolicyForward(top_k=0.4, head_on_all_chosen=True).selector(batch)(flat),
                       top_k_selector(batch, 0.4, all_chosen=True)(flat))


@pytest.mark.parametrize("packed, select, called", [
    (False, False, "completion_logprobs"),
    (False, True, "selective_completion_logprobs"),
    (True, False, "shared_prompt_logprobs"),
    (True, True, "shared_prompt_logprobs"),
])
def test_logprobs_dispatches_to_one_path(monkeypatch, packed, select, called):
    calls = []
    for name in ("completion_logprobs", "selective_completion_logprobs", "shared_prompt_logprobs"):
        monkeypatch.setattr(forward_module, name, lambda *args, _name=name, **kwargs: calls.append((_name, args, kwargs)))
    chooser = (lambda flat: flat > 0) if select else None
    pack = object() if packed else None
    PolicyForward(chunk_size=7).logprobs("policy", "ids", "attention", "targets", chooser, pack)
    [(name, args, kwargs)] = calls
    assert name == called and 7 in args + tuple(kwargs.values())
    if packed:
        assert args[1] is pack and kwargs["select"] is chooser


def test_every_path_gives_the_same_loss_and_gradient(models):
    """Plain, selective head, packed, and both: the same selective loss and gradient up to rounding.
    The paths add the same terms in other orders; as in test_prefix, a gradient entry sums one term
    per token of the padded batch (n of them), so reordering moves it by at most about
    n * eps * max|g| of its tensor, the tolerance used here (the loss: within 1e-6 of ln-2-sized values)."""
    model = AutoModelForCausalLM.from_pretrained(models["policy"])
    rows = pair_rows()
    results = []
    for forward in (PolicyForward(chunk_size=5, top_k=0.4, selective_head=False),
                    PolicyForward(chunk_size=5, top_k=0.4),
                    PolicyForward(chunk_size=5, top_k=0.4, selective_head=False, prefix_sharing=True),
                    PolicyForward(chunk_size=5, top_k=0.4, prefix_sharing=True)):
        model.zero_grad()
        batch, packed = forward.inputs(rows, 0, torch.device("cpu"))
        flat = forward.logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                forward.selector(batch), packed)
        loss, _ = selective_loss(flat, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        tokens = int(batch.attention_mask.sum())
    plain_loss, plain_grads = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(plain_loss, abs=1e-6)
        for name, grad in grads.items():
            atol = tokens * torch.finfo(torch.float32).eps * float(plain_grads[name].abs().max())
            torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=atol, msg=name)
