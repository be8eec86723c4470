"""The evaluator against a fake engine whose policy log-probs are the cache's own reference
log-probs plus a chosen offset: its metrics are then known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from selpipe.pipeline.cache import load_manifest
from selpipe.pipeline.config import TrainConfig, build_config
from selpipe.stages.train.evaluate import Evaluator


class ReferencePlus:
    """Policy log-prob = the reference's + `chosen` on chosen tokens, + `rejected` on rejected ones."""

    device = torch.device("cpu")

    def __init__(self, chosen: float = 0.0, rejected: float = 0.0, ramp: bool = False):
        self.chosen, self.rejected, self.ramp, self.mode = chosen, rejected, ramp, "train"

    def logprobs(self, batch, select=None, packed=None):
        pairs = batch.pairs
        offset = torch.zeros_like(batch.reference)
        offset[:pairs], offset[pairs:] = self.chosen, self.rejected
        if self.ramp:  # the j-th token's offset times (j + 1): no two scores of a response tie
            offset = offset * torch.arange(1, offset.shape[1] + 1)
        return (batch.reference + offset)[batch.completion_mask]

    def eval(self):
        self.mode = "eval"

    def train(self):
        self.mode = "train"


def evaluator(demo_cache, engine, **settings) -> Evaluator:
    cfg = build_config(TrainConfig, {"cache": str(demo_cache), "policy": "p", "output": "o", "global_batch_size": 8,
                                     "micro_batch_size": 4, "beta": 0.1, **settings})
    return Evaluator(str(demo_cache), load_manifest(demo_cache), engine, lambda tensor: None, 0, 1, cfg, 0)


def test_a_policy_equal_to_the_reference_scores_ln2_selects_every_token_and_reports_no_overlap(demo_cache):
    """p = r: every z = 0, loss = ln 2 for every pair; every score ties, so top-k keeps all tokens;
    an all-tied mask is not kept for the next eval's overlap."""
    engine = ReferencePlus()
    evaluate = evaluator(demo_cache, engine, top_k=0.4)
    first = evaluate(0)
    assert engine.mode == "train"  # back to training after the eval
    assert first["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["eval/selected_fraction/chosen"] == first["eval/selected_fraction/rejected"] == 1.0
    assert "eval/mask_overlap" not in evaluate(1)


def test_the_loss_follows_the_offsets_in_closed_form(demo_cache):
    """p - r = +0.5 on every chosen token, -0.25 on every rejected one. With k = 1 every token counts:
    z = beta (0.5 n_w + 0.25 n_l) > 0 for every pair, so preference accuracy is 1, and each pair's
    loss is -log sigmoid(z), averaged over the pairs."""
    engine = ReferencePlus(chosen=0.5, rejected=-0.25)
    evaluate = evaluator(demo_cache, engine, top_k=1.0)
    metrics = evaluate(0)
    rows = evaluate.rows
    expected = sum(-math.log(1 / (1 + math.exp(-0.1 * (0.5 * len(r["chosen_ids"]) + 0.25 * len(r["rejected_ids"])))))
                   for r in rows) / len(rows)
    assert metrics["eval/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval/preference_accuracy"] == 1.0


def test_the_mask_overlap_is_one_for_an_unchanged_policy_and_lower_for_a_changed_one(demo_cache):
    """k = 0.4 over scores that never tie: the same policy selects the same tokens (overlap 1);
    reversing the ramp's sign selects the other end of each response (overlap below 1)."""
    engine = ReferencePlus(chosen=0.01, rejected=0.01, ramp=True)
    evaluate = evaluator(demo_cache, engine, top_k=0.4)
    fraction = evaluate(0)["eval/selected_fraction/chosen"]
    assert 0.35 < fraction < 0.6
    assert evaluate(1)["eval/mask_overlap"] == 1.0
    engine.chosen = engine.rejected = -0.01
    assert evaluate(2)["eval/mask_overlap"] < 0.5
