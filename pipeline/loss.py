"""The Selective-DPO loss: a pure function of per-token log-probs and masks.

For a pair (x, y_w, y_l), per-token policy log-probs p_t, scoring log-probs r_t and anchor
log-probs a_t (the anchor is the scoring reference unless a second cache is given):

    m_t  = top-k mask of the alignment scores (see `selection`), no gradient
    R_w  = beta * sum_t m_t (p_t - a_t)  over y_w        ("rewards/chosen")
    R_l  = beta * sum_t m_t (p_t - a_t)  over y_l        ("rewards/rejected")
    z    = R_w - R_l                                     ("rewards/margins")
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

Sums, not means: no length normalisation. With k = 1 every token is selected and this is the
sigmoid DPO loss of Rafailov et al. (with eps, the conservative DPO of Mitchell). With the
policy equal to the anchor, z = 0 and the loss is ln 2 whatever the mask. A token outside the
mask contributes nothing to z, so its log-prob receives a gradient of exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .selection import alignment_scores, select_top_k


@dataclass
class SelectiveDPOOutput:
    losses: torch.Tensor            # [B]
    chosen_rewards: torch.Tensor    # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached
    chosen_selected: torch.Tensor   # [B, Lw] bool
    rejected_selected: torch.Tensor # [B, Ll] bool
    chosen_scores: torch.Tensor     # [B, Lw], detached
    rejected_scores: torch.Tensor   # [B, Ll], detached
    chosen_threshold: torch.Tensor  # [B] tau of each chosen response
    rejected_threshold: torch.Tensor  # [B] tau of each rejected response


def sigmoid_loss(margins: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z), elementwise."""
    return -(1.0 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)


def selective_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    top_k: float = 0.4,
    beta: float = 0.01,
    label_smoothing: float = 0.0,
    anchor_chosen: torch.Tensor | None = None,
    anchor_rejected: torch.Tensor | None = None,
) -> SelectiveDPOOutput:
    """Per-pair Selective-DPO losses; see the module docstring for the math.

    All per-token tensors are [B, L_side] fp32, zero-padded, with `*_mask` marking completion
    tokens. `reference_*` score the tokens; `anchor_*` (default: the reference) anchor the
    reward. Returns per-pair losses; average them over the global batch.
    """
    anchor_chosen = reference_chosen if anchor_chosen is None else anchor_chosen
    anchor_rejected = reference_rejected if anchor_rejected is None else anchor_rejected
    chosen_scores = alignment_scores(policy_chosen, reference_chosen, chosen=True)
    rejected_scores = alignment_scores(policy_rejected, reference_rejected, chosen=False)
    chosen_selected, chosen_threshold = select_top_k(chosen_scores, chosen_mask, top_k)
    rejected_selected, rejected_threshold = select_top_k(rejected_scores, rejected_mask, top_k)
    chosen_logratio = ((policy_chosen - anchor_chosen) * chosen_selected).sum(dim=1)
    rejected_logratio = ((policy_rejected - anchor_rejected) * rejected_selected).sum(dim=1)
    margins = beta * (chosen_logratio - rejected_logratio)
    return SelectiveDPOOutput(
        losses=sigmoid_loss(margins, label_smoothing),
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
        chosen_selected=chosen_selected,
        rejected_selected=rejected_selected,
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        chosen_threshold=chosen_threshold,
        rejected_threshold=rejected_threshold,
    )
