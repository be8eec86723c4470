import pytest
import torch
from transformers import AutoModelForCausalLM

from selpipe.pipeline.batching import collate_pairs, top_k_selector
from selpipe.pipeline.logprobs import (
    check_output_head, completion_logprobs, completion_target_mask, pad_sequences, selective_completion_logprobs, to_padded,
)
from selpipe.pipeline.config import LossConfig
from selpipe.pipeline.loss import selective_dpo_loss


def naive(model, sequences, prompt_lengths):
    """The definition: full logits of each unpadded sequence, fp32 log-softmax, gather."""
    out = []
    for seq, start in zip(sequences, prompt_lengths):
        ids = torch.tensor([seq])
        logps = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        out.append(logps[start - 1:])
    return torch.cat(out)


@pytest.fixture(scope="module")
def model(models):
    return AutoModelForCausalLM.from_pretrained(models["reference"]).eval()


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_equals_naive_full_logits_with_padding_and_odd_lengths(model, chunk_size):
    generator = torch.Generator().manual_seed(0)
    lengths, prompts = [5, 17, 2, 11, 30], [1, 9, 1, 4, 13]
    sequences = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    input_ids, attention_mask = pad_sequences(sequences)
    target = completion_target_mask(prompts, [n - p for n, p in zip(lengths, prompts)], input_ids.shape[1])
    with torch.no_grad():
        fast = completion_logprobs(model, input_ids, attention_mask, target, chunk_size)
        slow = naive(model, sequences, prompts)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_gradients_through_chunked_checkpointing_match_the_naive_path(models):
    model = AutoModelForCausalLM.from_pretrained(models["reference"])
    sequences, prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [2, 1]
    input_ids, attention_mask = pad_sequences(sequences)
    target = completion_target_mask(prompts, [4, 2], input_ids.shape[1])
    completion_logprobs(model, input_ids, attention_mask, target, chunk_size=2).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    naive(model, sequences, prompts).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_to_padded_is_row_major_and_differentiable():
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    padded, mask = to_padded(flat, [3, 1])
    assert padded.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    (padded * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    assert flat.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_position_zero_cannot_be_a_target(model):
    input_ids, attention_mask = pad_sequences([[4, 5]])
    with pytest.raises(ValueError, match="position 0"):
        completion_logprobs(model, input_ids, attention_mask, torch.tensor([[True, True]]))


def tiny(config_class, **transform):
    """A two-layer model of an architecture that transforms its logits after the head."""
    import transformers

    config = getattr(transformers, config_class)(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **transform)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("config_class, transform", [
    ("Gemma2Config", {"final_logit_softcapping": 2.0}),  # tanh soft-cap
    ("CohereConfig", {"logit_scale": 3.0}),  # logits x 3
    ("GraniteConfig", {"logits_scaling": 4.0}),  # logits / 4
])
def test_heads_that_scale_or_cap_their_logits_are_reproduced(config_class, transform):
    model = tiny(config_class, **transform)
    sequences, prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [3, 1]
    input_ids, attention_mask = pad_sequences(sequences)
    target = completion_target_mask(prompts, [4, 2], input_ids.shape[1])
    with torch.no_grad():
        fast = completion_logprobs(model, input_ids, attention_mask, target, chunk_size=3)
        slow = naive(model, sequences, prompts)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    check_output_head(model)


def test_a_head_transform_selpipe_does_not_know_is_refused(model):
    class Doubled(torch.nn.Module):
        """Logits x 2 inside forward, where `output_head` cannot see it."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.base_model_prefix = inner, inner.config, "inner"

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        @property
        def base_model(self):
            return self.inner.model

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = out.logits * 2
            return out

    check_output_head(model)
    with pytest.raises(ValueError, match="does not reproduce"):
        check_output_head(Doubled(model))


def pair_rows(seed: int = 0) -> list[dict]:
    """Six pairs of random tokens; reference log-probs drawn apart from the policy's, so the
    alignment scores differ and top-k selects a real subset."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, (p, c, r) in enumerate([(3, 9, 7), (1, 12, 2), (6, 4, 11), (2, 1, 3), (5, 8, 8), (4, 6, 5)]):
        ids = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (p, c, r)]
        rows.append({"id": f"p{index}", "prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[2],
                     "chosen_ref_logps": (-8 * torch.rand(c, generator=generator)).tolist(),
                     "rejected_ref_logps": (-8 * torch.rand(r, generator=generator)).tolist()})
    return rows


def selective_loss(flat, batch, **settings):
    """The trainer's loss: `selective_dpo_loss` over the padded policy log-probs, mean over pairs."""
    policy, mask = to_padded(flat, batch.completion_lengths)
    b = batch.pairs
    out = selective_dpo_loss(policy[:b], policy[b:], batch.reference[:b], batch.reference[b:], mask[:b], mask[b:],
                             LossConfig(top_k=0.4, beta=0.1, **settings))
    return out.losses.mean(), torch.cat([out.chosen_selected, out.rejected_selected])[mask]


@pytest.mark.parametrize("chunk_size, settings", [
    (5, {}),  # checkpointed chunks
    (4096, {}),  # one chunk, kept for backward
    (5, {"loss_type": "ipo"}),
    (5, {"rpo_alpha": 0.5, "rpo_tokens": "all"}),  # a gradient at every chosen token: all_chosen
    (5, {"rpo_alpha": 0.5, "rpo_tokens": "selected"}),
])
def test_selective_head_gives_the_full_heads_values_and_gradient(models, chunk_size, settings):
    """Same values bit for bit, and, under the selective loss (zero gradient off the selection),
    the same gradient for every parameter within 1e-6 of its norm."""
    model = AutoModelForCausalLM.from_pretrained(models["policy"])
    batch = collate_pairs(pair_rows())
    inputs = (model, batch.input_ids, batch.attention_mask, batch.target_mask)

    full = completion_logprobs(*inputs, chunk_size=chunk_size)
    loss, selected = selective_loss(full, batch, **settings)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert 0 < selected.sum() < selected.numel()  # a real subset

    model.zero_grad()
    select = top_k_selector(batch, 0.4, all_chosen=settings.get("rpo_tokens") == "all")
    flat = selective_completion_logprobs(*inputs, select=select, chunk_size=chunk_size)
    assert torch.equal(flat, full)
    loss_again, selected_again = selective_loss(flat, batch, **settings)
    assert torch.equal(selected_again, selected) and torch.equal(loss_again, loss)
    loss_again.backward()
    for name, param in model.named_parameters():
        error = (param.grad - expected[name]).norm() / expected[name].norm()
        assert error <= 1e-6, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_unselected_positions_have_no_gradient_path(models, chunk_size):
    """The head runs with gradient on the selected rows only, and an unselected log-prob has no
    gradient with respect to any parameter."""
    model = AutoModelForCausalLM.from_pretrained(models["policy"])
    batch = collate_pairs(pair_rows(1))
    select = top_k_selector(batch, 0.4)
    rows_with_grad = []
    hook = model.lm_head.register_forward_hook(
        lambda module, args, out: rows_with_grad.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
    flat = selective_completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask, select, chunk_size)
    hook.remove()
    selected = select(flat.detach())
    assert sum(rows_with_grad) == selected.sum() < selected.numel()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(flat[~selected].sum(), params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_selective_head_without_gradient_is_the_plain_head(model):
    batch = collate_pairs(pair_rows(2))

    def never(flat):
        raise AssertionError("select is for gradients only")

    with torch.no_grad():
        plain = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask, 7)
        selective = selective_completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask, never, 7)
    assert torch.equal(selective, plain)


def test_select_must_return_one_bool_per_log_prob(models):
    model = AutoModelForCausalLM.from_pretrained(models["policy"])
    batch = collate_pairs(pair_rows())
    with pytest.raises(ValueError, match="select must return a bool tensor of shape"):
        selective_completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                      lambda flat: (flat < -5)[1:], 7)
