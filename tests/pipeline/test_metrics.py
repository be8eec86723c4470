"""The metrics table: golden sums of one micro batch, and sums reduced before dividing."""

import math

import pytest
import torch

from selpipe.pipeline.metrics import METRICS, SUM_NAMES, add_sums, pair_sums, reduce_sums


def two_pairs(weights=(1.0, 1.0)):
    """Pair 0: chosen policy (-1, -2) anchor (-2, -2), all selected; rejected policy (-1) anchor (-0.5).
    Pair 1: chosen policy (-3) anchor (-1), selected; rejected policy (-1, -3) anchor (-2, -1), only the first selected.
    beta = 0.5. Scores are made up (only their means and quantiles are read)."""
    t = torch.tensor
    policy = {"chosen": t([[-1.0, -2.0], [-3.0, 0.0]]), "rejected": t([[-1.0, 0.0], [-1.0, -3.0]])}
    anchor = {"chosen": t([[-2.0, -2.0], [-1.0, 0.0]]), "rejected": t([[-0.5, 0.0], [-2.0, -1.0]])}
    mask = {"chosen": t([[True, True], [True, False]]), "rejected": t([[True, False], [True, True]])}
    selected = {"chosen": mask["chosen"].clone(), "rejected": t([[True, False], [True, False]])}
    scores = {"chosen": t([[1.0, 3.0], [2.0, 0.0]]), "rejected": t([[0.5, 0.0], [1.0, -1.0]])}
    threshold = {"chosen": t([1.0, 2.0]), "rejected": t([0.5, 0.0])}
    # The loss's own rewards: beta * the selected tokens' log-ratio sums (see the golden test).
    loss_rewards = {side: 0.5 * ((policy[side] - anchor[side]) * mask[side] * selected[side]).sum(1) for side in policy}
    return pair_sums(losses=t([0.25, 0.75]), weights=t(weights), beta=0.5, policy=policy, anchor=anchor, mask=mask,
                     selected=selected, scores=scores, threshold=threshold, loss_rewards=loss_rewards,
                     nll=t([1.5, 3.0]), tokens=t(9))


def test_golden_metrics_of_two_pairs():
    """Whole-response log-ratios: pair 0 chosen (1 + 0) = 1, rejected -0.5; pair 1 chosen -2,
    rejected (1 - 2) = -1. Times beta 0.5, TRL's rewards: chosen (0.5, -1) -> mean -0.25;
    rejected (-0.25, -0.5) -> -0.375; margins (0.75, -0.5) -> 0.125; accuracies (1, 0) -> 0.5.
    Selected tokens only (the loss's rewards): pair 1's rejected keeps its first token, ratio 1:
    selective/rejected (-0.25, 0.5) -> 0.125; selective/margins (0.75, -1.5) -> -0.375.
    logps: chosen (-3, -3) -> -3; rejected (-1, -4) -> -2.5.
    Selected fraction: chosen 3/3, rejected 2/3. dpo_loss: mean of -log sig(0.75), -log sig(-0.5).
    """
    metrics = reduce_sums(two_pairs(), all_reduce=lambda t: None)
    assert metrics["loss"] == pytest.approx(0.5)
    assert metrics["rewards/chosen"] == pytest.approx(-0.25) and metrics["rewards/rejected"] == pytest.approx(-0.375)
    assert metrics["rewards/margins"] == pytest.approx(0.125) and metrics["rewards/accuracies"] == 0.5
    assert metrics["selective/rejected"] == pytest.approx(0.125) and metrics["selective/margins"] == pytest.approx(-0.375)
    assert metrics["selective/accuracies"] == 0.5
    assert metrics["logps/chosen"] == pytest.approx(-3.0) and metrics["logps/rejected"] == pytest.approx(-2.5)
    assert metrics["selected_fraction/chosen"] == 1.0 and metrics["selected_fraction/rejected"] == pytest.approx(2 / 3)
    dpo = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert metrics["dpo_loss"] == pytest.approx(dpo)
    assert metrics["scores/chosen_mean"] == pytest.approx(6 / 3) and metrics["scores/chosen_threshold"] == pytest.approx(1.5)
    assert (metrics["pairs"], metrics["tokens"]) == (2.0, 9.0) and metrics["nll_loss"] == pytest.approx(2.25)


def test_a_padding_pair_of_weight_zero_counts_nowhere():
    one = reduce_sums(two_pairs(weights=(1.0, 0.0)), all_reduce=lambda t: None)
    assert one["pairs"] == 1.0 and one["rewards/margins"] == pytest.approx(0.75) and one["loss"] == pytest.approx(0.25)


def test_sums_are_reduced_across_ranks_before_dividing():
    """Two ranks with 1 and 3 pairs: the mean is over the 4 pairs, not the mean of two rank means."""
    rank_a, rank_b = two_pairs(weights=(1.0, 0.0)), {}
    for _ in range(3):
        add_sums(rank_b, two_pairs(weights=(0.0, 1.0)))
    other = torch.stack([rank_b[name].float() for name in SUM_NAMES])
    metrics = reduce_sums(rank_a, all_reduce=lambda vector: vector.add_(other))
    assert metrics["pairs"] == 4.0
    assert metrics["loss"] == pytest.approx((0.25 + 3 * 0.75) / 4)
    assert metrics["rewards/margins"] == pytest.approx((0.75 - 3 * 0.5) / 4)


def test_every_metric_names_sums_that_exist():
    assert {m.total for m in METRICS} | {m.per for m in METRICS} <= set(SUM_NAMES)
    assert len({m.name for m in METRICS}) == len(METRICS)
