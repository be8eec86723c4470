"""pipeline/scoring.py: the completion log-probs both score-ref's hf backend and verify compute."""

import torch
from transformers import AutoModelForCausalLM

from selpipe.pipeline.scoring import score_requests, token_budget_batches


def test_token_budget_batches_longest_first_within_the_budget():
    """Lengths [3, 9, 5, 9, 2] with budget 18: sorted longest first (1, 3, 2, 0, 4); 1 and 3 fill
    2 x 9 = 18; 2 then 0 make 2 x 5 = 10 and adding 4 makes 3 x 5 = 15 <= 18."""
    assert token_budget_batches([3, 9, 5, 9, 2], 18) == [[1, 3], [2, 0, 4]]


def test_each_request_gets_the_log_softmax_of_its_own_unpadded_forward(models):
    """Golden values from the plainest computation: one unpadded forward per request, fp32
    log_softmax of the full logits, the completion tokens gathered. Batching by a budget of 64
    pads rows up to 30 tokens; padding sits after each row (right-padded, causal), so it cannot
    change a row's values beyond float summation order: fp32 log-probs of magnitude < 20 agree to
    ~1e-5 (a few ulps of the logits summed over 64-wide dot products)."""
    model = AutoModelForCausalLM.from_pretrained(models["reference"], dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    requests = [(torch.randint(3, 300, (n,), generator=generator).tolist(), max(1, n // 3)) for n in (5, 17, 30, 2, 9)]
    got = score_requests(model, requests, token_budget=64)
    for (ids, prompt), values in zip(requests, got, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[torch.arange(prompt - 1, len(ids) - 1), torch.tensor(ids[prompt:])]
        assert len(values) == len(ids) - prompt
        torch.testing.assert_close(torch.tensor(values), expected, rtol=0, atol=1e-5)
    shared = score_requests(model, requests + [(requests[1][0][:5] + [7, 8, 9], 5)], token_budget=64, share_prompts=True)
    for fast, slow in zip(shared, got):
        torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=0, atol=1e-5)
