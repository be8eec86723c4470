import torch

from selpipe.pipeline.selection import alignment_scores, quantile_threshold, top_k_mask


def test_threshold_equals_torch_quantile_row_by_row():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 37, generator=generator)
    lengths = torch.randint(1, 38, (64,), generator=generator)
    mask = torch.arange(37).unsqueeze(0) < lengths.unsqueeze(1)
    for k in (0.05, 0.2, 0.4, 0.5, 0.77, 1.0):
        tau = quantile_threshold(scores, mask, k)
        expected = torch.stack([torch.quantile(scores[i][mask[i]], 1 - k) for i in range(64)])
        assert torch.equal(tau, expected), k


def test_golden_mask_with_ties_and_a_one_token_response():
    """Rows (k = 0.25, so q = 0.75; rank = q * (n - 1) between sorted neighbours):

    row 0: s = [2, 2, 2, 1]: sorted [1, 2, 2, 2], rank 2.25 -> tau = 2; all three 2s are kept (ties),
           so 3 of 4 tokens are selected although k is 1/4.
    row 1: s = [0.5] (one token): rank 0 -> tau = 0.5, the token is selected.
    row 2: s = [3, -1, 0, 1, 2] : sorted [-1, 0, 1, 2, 3], rank 3 -> tau = 2; selects 3 and 2.
    Padding (mask 0) is never selected even where its score would pass.
    """
    scores = torch.tensor([[2.0, 2.0, 2.0, 1.0, 0.0], [0.5, 9.0, 9.0, 9.0, 9.0], [3.0, -1.0, 0.0, 1.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert quantile_threshold(scores, mask, 0.25).tolist() == [2.0, 0.5, 2.0]
    assert top_k_mask(scores, mask, 0.25).int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 1]]


def test_k_one_selects_every_completion_token_and_never_padding():
    scores = torch.randn(4, 6)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    assert torch.equal(top_k_mask(scores, mask, 1.0), mask)


def test_alignment_scores_signs_and_no_gradient():
    policy = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    reference = torch.tensor([[-2.0, -1.0]])
    assert alignment_scores(policy, reference, chosen=True).tolist() == [[-1.0, 1.0]]   # r - p
    assert alignment_scores(policy, reference, chosen=False).tolist() == [[1.0, -1.0]]  # p - r
    assert not alignment_scores(policy, reference, chosen=True).requires_grad
