import torch

from selpipe.stages.backends import HFScorer, choose_token_budget, token_budget_rates


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


def test_shared_prompts_score_what_separate_sequences_score(models):
    """Requests grouped by prompt (a pair, a prompt with three completions, a prompt of its own)
    give the unshared log-probs, each in its request's place."""
    generator = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 300, (n,), generator=generator).tolist()

    a, b, c = ids(4), ids(1), ids(9)
    requests = [(a + ids(6), 4), (b + ids(3), 1), (a + ids(11), 4), (c + ids(2), 9), (b + ids(7), 1), (b + ids(5), 1)]
    plain = HFScorer(str(models["reference"]), device="cpu", token_budget=64)
    shared = HFScorer(str(models["reference"]), device="cpu", token_budget=64, share_prompts=True)
    assert shared.info["share_prompts"]
    for fast, slow in zip(shared.score(requests), plain.score(requests), strict=True):
        assert len(fast) == len(slow)
        torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=0, atol=1e-5)


def test_the_budget_doubles_while_it_pays_and_keeps_the_smallest_near_the_best():
    """Rates 100, 150, 200, 205, 150 tokens/s at 128..2048: 512 -> 1024 gains under 5%, so
    measuring stops there (2048 is never run), and 512 is within 5% of the best."""
    rates = {128: 100.0, 256: 150.0, 512: 200.0, 1024: 205.0, 2048: 150.0}
    asked = []

    def measure(budget):
        asked.append(budget)
        return rates[budget]

    model = torch.nn.Linear(2, 2)
    assert token_budget_rates(model, 128, measure=measure) == {128: 100.0, 256: 150.0, 512: 200.0, 1024: 205.0}
    assert asked == [128, 128, 256, 512, 1024]  # a warm-up at the first budget, then each once
    assert choose_token_budget(model, 128, measure=rates.get) == 512
    assert choose_token_budget(model, 128, measure=rates.get, largest=256) == 256  # capped
    assert choose_token_budget(model, 128, measure=lambda budget: 100.0) == 128  # flat: the smallest


def test_an_auto_budget_is_measured_and_reported(models):
    scorer = HFScorer(str(models["reference"]), device="cpu", token_budget="auto", max_length=64)
    measured = [int(b) for b in scorer.info["token_budget_rates"]]
    assert scorer.token_budget == scorer.info["token_budget"] in measured
    assert measured[0] == 64 and all(b == 2 * a for a, b in zip(measured, measured[1:])) and measured[-1] <= 16384
