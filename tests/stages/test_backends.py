import torch

from selpipe.stages.backends import HFScorer, token_budget_batches


def test_token_budget_batches_longest_first_within_the_budget():
    """Lengths [3, 9, 5, 9, 2] with budget 18: sorted longest first (1, 3, 2, 0, 4); 1 and 3 fill
    2 x 9 = 18; 2 then 0 make 2 x 5 = 10 and adding 4 makes 3 x 5 = 15 <= 18."""
    assert token_budget_batches([3, 9, 5, 9, 2], 18) == [[1, 3], [2, 0, 4]]


def test_compiled_scorer_gives_the_eager_log_probs(models):
    """`--compile` changes kernels, not the math: the same log-probs to float noise, over batches of
    varying size and length (dynamic shapes), with every request's completion length kept."""
    generator = torch.Generator().manual_seed(0)
    requests = [(torch.randint(3, 300, (n,), generator=generator).tolist(), max(1, n // 3)) for n in (5, 17, 30, 64, 9, 41, 2)]
    eager = HFScorer(str(models["reference"]), device="cpu", token_budget=64).score(requests)
    compiled = HFScorer(str(models["reference"]), device="cpu", token_budget=64, compile=True).score(requests)
    assert [len(r) for r in compiled] == [len(ids) - prompt for ids, prompt in requests]
    for fast, slow in zip(compiled, eager, strict=True):
        torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=0, atol=1e-5)
