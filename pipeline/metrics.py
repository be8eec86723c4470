"""Training metrics as one table: what is summed per pair or token, and what it is divided by.

Every micro batch contributes *sums* (`pair_sums`); a step (or an eval pass) adds them up, the
trainer reduces the whole vector across ranks once, and only then divides (`reduce_sums`). So a
token mean is the mean over every token of the global batch, not a mean of per-rank means.

Names follow TRL's `DPOTrainer` where TRL has the quantity, so dashboards compare across tools:
`rewards/*` and `logps/*` count every completion token. The masked rewards the Selective-DPO loss
actually uses are `selective/*`. The table in docs/architecture.md maps each name to TRL's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .selection import quantile_threshold

SIDES = ("chosen", "rejected")
# Quantiles of each response's alignment scores, logged as their mean over responses.
SCORE_QUANTILES = {"q10": 0.1, "q50": 0.5, "q90": 0.9}


@dataclass(frozen=True)
class Metric:
    name: str   # as logged
    total: str  # the summed quantity
    per: str    # the summed quantity it is divided by


def _sided(name: str, total: str, per: str) -> tuple[Metric, ...]:
    return tuple(Metric(name.format(side=s), total.format(side=s), per.format(side=s)) for s in SIDES)


METRICS: tuple[Metric, ...] = (
    Metric("loss", "loss", "pairs"),
    # TRL's rewards: beta * sum over every completion token of (policy - anchor).
    *_sided("rewards/{side}", "reward/{side}", "pairs"),
    Metric("rewards/margins", "reward/margin", "pairs"),
    Metric("rewards/accuracies", "reward/correct", "pairs"),
    *_sided("logps/{side}", "logp/{side}", "pairs"),
    # The rewards the loss uses: the same sum over the selected tokens only (SimPO: its own reward).
    *_sided("selective/{side}", "selective/{side}", "pairs"),
    Metric("selective/margins", "selective/margin", "pairs"),
    Metric("selective/accuracies", "selective/correct", "pairs"),
    # Whole-response accuracy with a tie (policy still equal to the anchor) counted as a coin flip.
    Metric("preference_accuracy", "reward/correct_or_half", "pairs"),
    # Plain DPO's loss on the same pairs: comparable across runs of different k, unlike `loss`.
    Metric("dpo_loss", "dpo_loss", "pairs"),
    # The chosen response's mean negative log-likelihood: RPO's term before its weight (TRL: nll_loss).
    Metric("nll_loss", "nll", "pairs"),
    *_sided("selected_fraction/{side}", "selected/{side}", "tokens/{side}"),
    *_sided("scores/{side}_mean", "score/{side}", "tokens/{side}"),
    # tau, the (1 - k) quantile of each response's scores, averaged over responses.
    *_sided("scores/{side}_threshold", "threshold/{side}", "pairs"),
    *(m for q in SCORE_QUANTILES for m in _sided(f"scores/{{side}}_{q}", f"{q}/{{side}}", "pairs")),
)
# Counters the trainer reads for throughput (pairs, tokens) besides the metrics' own.
COUNTERS = ("pairs", "tokens")
SUM_NAMES: tuple[str, ...] = tuple(dict.fromkeys([*(m.total for m in METRICS), *(m.per for m in METRICS), *COUNTERS]))


@torch.no_grad()
def pair_sums(*, losses: torch.Tensor, weights: torch.Tensor, beta: float,
              policy: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mask: dict[str, torch.Tensor],
              selected: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], threshold: dict[str, torch.Tensor],
              loss_rewards: dict[str, torch.Tensor], nll: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums one micro batch contributes, keyed by `SUM_NAMES`.

    Per side, `policy`, `anchor`, `mask`, `selected` and `scores` are [B, L] (completion-aligned,
    zero-padded), `threshold` and `loss_rewards` (the rewards the loss used: `beta * sum m (p - a)`,
    SimPO's own reward for SimPO) are [B]; `losses`, `nll` (the chosen response's mean negative
    log-likelihood, RPO's term) and `weights` (1 real pair, 0 padding) are [B]; `tokens` counts
    the batch's attended positions.
    """
    w = weights
    sums: dict[str, torch.Tensor] = {"pairs": w.sum(), "loss": (losses.detach() * w).sum(), "tokens": tokens.float(),
                                     "nll": (nll.detach() * w).sum()}
    reward, masked = {}, {}
    for side in SIDES:
        ratio = (policy[side].detach() - anchor[side]) * mask[side]
        reward[side] = beta * ratio.sum(1)
        masked[side] = loss_rewards[side].detach()
        sums[f"reward/{side}"] = (reward[side] * w).sum()
        sums[f"selective/{side}"] = (masked[side] * w).sum()
        sums[f"logp/{side}"] = ((policy[side].detach() * mask[side]).sum(1) * w).sum()
        sums[f"selected/{side}"] = (selected[side].sum(1) * w).sum()
        sums[f"tokens/{side}"] = (mask[side].sum(1) * w).sum()
        sums[f"score/{side}"] = ((scores[side] * mask[side]).sum(1) * w).sum()
        sums[f"threshold/{side}"] = (threshold[side] * w).sum()
        for name, q in SCORE_QUANTILES.items():
            # The q-quantile is the threshold of top-k with k = 1 - q.
            sums[f"{name}/{side}"] = (quantile_threshold(scores[side], mask[side], 1.0 - q) * w).sum()
    margin = reward["chosen"] - reward["rejected"]
    selective_margin = masked["chosen"] - masked["rejected"]
    sums["reward/margin"] = (margin * w).sum()
    sums["reward/correct"] = ((margin > 0).float() * w).sum()
    sums["reward/correct_or_half"] = (((margin > 0).float() + 0.5 * (margin == 0).float()) * w).sum()
    sums["selective/margin"] = (selective_margin * w).sum()
    sums["selective/correct"] = ((selective_margin > 0).float() * w).sum()
    sums["dpo_loss"] = (-F.logsigmoid(margin) * w).sum()
    return sums


def add_sums(into: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    """Accumulate one micro batch's sums into a step's."""
    for key, value in sums.items():
        into[key] = into.get(key, torch.zeros((), device=value.device)) + value.detach()


def reduce_sums(sums: dict[str, torch.Tensor], all_reduce: Callable[[torch.Tensor], None]) -> dict[str, float]:
    """Sum every counter across ranks (`all_reduce` sums a tensor in place), then divide per `METRICS`.

    Returns every metric plus the raw `COUNTERS`.
    """
    device = next(iter(sums.values())).device
    vector = torch.stack([sums[name].float().to(device) for name in SUM_NAMES])
    all_reduce(vector)
    total = dict(zip(SUM_NAMES, vector.tolist()))
    metrics = {m.name: total[m.total] / max(total[m.per], 1.0) for m in METRICS}
    return {**metrics, **{name: total[name] for name in COUNTERS}}
