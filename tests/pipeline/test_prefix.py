from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from selpipe.pipeline.batching import collate_pairs, top_k_selector
from selpipe.pipeline.config import ConfigError
from selpipe.pipeline.logprobs import completion_logprobs
from selpipe.pipeline.prefix import (
    check_shared_prompts, pack_pairs, pack_shared_prompts, shared_prompt_logprobs, supports_shared_prompts,
)


def random_rows(shapes, seed=0):
    """Cache rows of random in-vocabulary tokens with (prompt, chosen, rejected) lengths `shapes`."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 500, (n,), generator=generator).tolist()

    def logps(n):
        return (-8 * torch.rand(n, generator=generator)).tolist()

    return [{"id": f"r{i}", "prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r),
             "chosen_ref_logps": logps(c), "rejected_ref_logps": logps(r)} for i, (p, c, r) in enumerate(shapes)]


SHAPES = [(3, 5, 7), (1, 9, 2), (6, 4, 4), (12, 1, 3)]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(models, request):
    return AutoModelForCausalLM.from_pretrained(models["policy"], attn_implementation=request.param)


def test_packed_layout():
    """Prompt [1, 2], chosen [3, 4, 5], rejected [6]; prompt [7], chosen [8], rejected [9, 10].
    Positions restart at len(prompt) for the rejected completion; the prompt's last state predicts
    both first tokens; output order is chosen of both rows, then rejected of both rows."""
    packed = pack_shared_prompts([[1, 2], [7]], [[[3, 4, 5], [6]], [[8], [9, 10]]], pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    assert packed.completions == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert packed.completion_lengths == [3, 1, 1, 2]
    assert packed.targets.tolist() == [3, 4, 5, 8, 6, 9, 10]
    # Flat indices into [2 rows x 6]: row 0 chosen from 1, 2, 3; row 1 chosen from 6 (its prompt's
    # last token); row 0 rejected from 1; row 1 rejected from 6, then 8 (its own first token).
    assert packed.sources.tolist() == [1, 2, 3, 6, 1, 6, 8]
    # Row 0's rejected token (index 5) sees the prompt and itself, never the chosen tokens 2..4.
    assert packed.allowed[0, 0, 5].tolist() == [True, True, False, False, False, True]
    assert packed.allowed[0, 0, 4].tolist() == [True, True, True, True, True, False]
    # Real tokens never see padding; padding rows are never empty.
    assert not packed.allowed[1, 0, :4, 4:].any() and packed.allowed[1, 0].any(dim=1).all()


def test_values_and_gradients_equal_the_unshared_forward(model):
    """The packed forward adds the same terms as the padded one, in another order (other row widths,
    so other matmul blockings): the results differ by rounding only. A weight's gradient sums one
    term per token of the batch (n = 79 here: 8 padded rows of prompt + completion); reordering a
    sum of n terms moves it by at most about n * eps * (its largest term), and no term exceeds the
    tensor's largest gradient entry by much, so each tensor is compared with atol = n * eps * max|g|
    (about 9e-6 relative to max|g|; measured worst: 11 eps). A leak across the block-causal mask
    (a rejected token seeing the chosen one) moves gradients by a sizeable fraction of max|g|."""
    rows = random_rows(SHAPES)
    batch = collate_pairs(rows)
    weights = torch.randn(sum(batch.completion_lengths), generator=torch.Generator().manual_seed(1))

    model.zero_grad()
    unshared = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask, chunk_size=4)
    (unshared * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    shared = shared_prompt_logprobs(model, pack_pairs(rows), chunk_size=4)
    (shared * weights).sum().backward()
    torch.testing.assert_close(shared, unshared, rtol=0, atol=1e-5)
    tokens = int(batch.attention_mask.sum())
    assert tokens == 79
    for name, param in model.named_parameters():
        atol = tokens * torch.finfo(torch.float32).eps * float(expected[name].abs().max())
        torch.testing.assert_close(param.grad, expected[name], rtol=0, atol=atol, msg=name)


def test_selection_aware_head_on_shared_prompts(models):
    """Both levers at once: the selective loss's gradient through the shared forward and the
    selective head equals the plain path's."""
    from selpipe.pipeline.logprobs import to_padded
    from selpipe.pipeline.config import LossConfig
    from selpipe.pipeline.loss import selective_dpo_loss

    model = AutoModelForCausalLM.from_pretrained(models["policy"])
    rows = random_rows(SHAPES, seed=2)
    batch = collate_pairs(rows)

    def loss(flat):
        policy, mask = to_padded(flat, batch.completion_lengths)
        b = batch.pairs
        return selective_dpo_loss(policy[:b], policy[b:], batch.reference[:b], batch.reference[b:], mask[:b], mask[b:],
                                  LossConfig(top_k=0.4, beta=0.1)).losses.mean()

    loss(completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask, 4)).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss(shared_prompt_logprobs(model, pack_pairs(rows), 4, select=top_k_selector(batch, 0.4))).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_more_completions_per_prompt_and_rows_without_a_second():
    """The scorer's grouping: a prompt with three completions next to one with a single completion."""
    packed = pack_shared_prompts([[1, 2], [3]], [[[4], [5, 6], [7]], [[8, 9]]])
    assert packed.completions == [(0, 0), (1, 0), (0, 1), (0, 2)]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 2, 3, 2]
    assert packed.targets.tolist() == [4, 8, 9, 5, 6, 7]


def test_a_prompt_needs_a_token():
    with pytest.raises(ValueError, match="every prompt needs a token"):
        pack_shared_prompts([[]], [[[1], [2]]])


def stub(**config):
    return SimpleNamespace(config=SimpleNamespace(**config))


def test_attention_that_cannot_take_the_mask_is_refused():
    flash = stub(_attn_implementation="flash_attention_2", layer_types=["full_attention"])
    with pytest.raises(ConfigError, match="flash_attention_2: load it with attn_implementation='sdpa' or turn prefix sharing off"):
        check_shared_prompts(flash)
    assert not supports_shared_prompts(flash)
    rows = random_rows(SHAPES[:1])
    with pytest.raises(ConfigError, match="4D mask"):
        shared_prompt_logprobs(flash, pack_pairs(rows))


def test_sliding_windows_are_refused_unless_rows_fit_in_them():
    windowed = stub(_attn_implementation="sdpa", layer_types=["full_attention", "sliding_attention"], sliding_window=64)
    assert supports_shared_prompts(windowed, width=64)
    with pytest.raises(ConfigError, match="sliding window of 64 tokens \\(rows of 65 tokens\\)"):
        check_shared_prompts(windowed, width=65)
    assert not supports_shared_prompts(stub(_attn_implementation="sdpa", sliding_window=4096))  # Mistral-style, no width
    assert supports_shared_prompts(stub(_attn_implementation="sdpa", layer_types=["full_attention"], sliding_window=None))

