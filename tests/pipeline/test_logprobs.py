import pytest
import torch
from transformers import AutoModelForCausalLM

from selpipe.pipeline.logprobs import completion_logprobs, completion_target_mask, pad_sequences, to_padded


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
