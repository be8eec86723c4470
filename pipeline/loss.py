"""The Selective-DPO loss and its DPO-family variants: pure functions of per-token log-probs and masks.

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

Other losses of the family (`LOSSES`, chosen by name) take the same mask the same way: every
sum over a response runs over its selected tokens only, and a length normalisation divides by
the number of selected tokens n = sum_t m_t (never by the response length). The scores, hence
the mask, always come from the scoring cache, also for the reference-free SimPO. Each loss
states its formula in its docstring; docs/losses.md compares them with TRL.

An optional RPO term adds `rpo_alpha` times the chosen response's mean per-token NLL to any of
them, over all its completion tokens (as TRL) or over its selected tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The loss's settings are one group of TrainConfig, defined (and checked, once) with the others.
from .config import LossConfig
from .selection import alignment_scores, select_top_k


@dataclass
class SelectiveDPOOutput:
    losses: torch.Tensor            # [B], the preference loss plus rpo_alpha * nll
    chosen_rewards: torch.Tensor    # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached
    chosen_selected: torch.Tensor   # [B, Lw] bool
    rejected_selected: torch.Tensor # [B, Ll] bool
    chosen_scores: torch.Tensor     # [B, Lw], detached
    rejected_scores: torch.Tensor   # [B, Ll], detached
    chosen_threshold: torch.Tensor  # [B] tau of each chosen response
    rejected_threshold: torch.Tensor  # [B] tau of each rejected response
    nll: torch.Tensor               # [B], detached: mean NLL of the chosen response over the rpo tokens


@dataclass(frozen=True)
class SelectedSums:
    """One side's per-pair sums over its selected tokens, each [B]."""

    logratio: torch.Tensor  # sum_t m_t (p_t - a_t)
    logps: torch.Tensor     # sum_t m_t p_t
    count: torch.Tensor     # n = sum_t m_t; at least 1, as selection keeps a token of every sequence

    @classmethod
    def of(cls, policy: torch.Tensor, anchor: torch.Tensor, selected: torch.Tensor) -> SelectedSums:
        return cls(
            logratio=((policy - anchor) * selected).sum(dim=1),
            logps=(policy * selected).sum(dim=1),
            count=selected.sum(dim=1).to(policy.dtype),
        )

    @property
    def mean_logratio(self) -> torch.Tensor:
        return self.logratio / self.count

    @property
    def mean_logps(self) -> torch.Tensor:
        return self.logps / self.count


class LossTerms(NamedTuple):
    losses: torch.Tensor            # [B]
    chosen_rewards: torch.Tensor    # [B], not yet detached
    rejected_rewards: torch.Tensor  # [B]


LossFunction = Callable[[SelectedSums, SelectedSums, LossConfig], LossTerms]


def sigmoid_loss(margins: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z), elementwise."""
    return -(1.0 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)


def _masked_rewards(chosen: SelectedSums, rejected: SelectedSums, s: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * sum_t m_t (p_t - a_t) per side: the reward every reference-based loss reports."""
    return s.beta * chosen.logratio, s.beta * rejected.logratio


def loss_sigmoid(chosen: SelectedSums, rejected: SelectedSums, s: LossConfig) -> LossTerms:
    """Sigmoid DPO (Rafailov et al.); with eps, conservative DPO (Mitchell).

        z    = beta * (sum_t m_t (p_t - a_t) over y_w  -  sum_t m_t (p_t - a_t) over y_l)
        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
    """
    rewards = _masked_rewards(chosen, rejected, s)
    margins = s.beta * (chosen.logratio - rejected.logratio)
    return LossTerms(sigmoid_loss(margins, s.label_smoothing), *rewards)


def loss_sigmoid_norm(chosen: SelectedSums, rejected: SelectedSums, s: LossConfig) -> LossTerms:
    """Length-normalised sigmoid DPO (open-instruct's `dpo_norm`, TRL's `sigmoid_norm`).

        z    = beta * (sum_t m_t (p_t - a_t) / n_w  -  sum_t m_t (p_t - a_t) / n_l),  n = sum_t m_t
        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)

    Each side's log-ratio is its mean over its selected tokens.
    """
    margins = s.beta * (chosen.mean_logratio - rejected.mean_logratio)
    return LossTerms(sigmoid_loss(margins, s.label_smoothing), *_masked_rewards(chosen, rejected, s))


def loss_ipo(chosen: SelectedSums, rejected: SelectedSums, s: LossConfig) -> LossTerms:
    """IPO (Azar et al., eq. 17, beta in the role of tau), length-normalised as in TRL.

        h    = sum_t m_t (p_t - a_t) / n_w  -  sum_t m_t (p_t - a_t) / n_l,  n = sum_t m_t
        loss = (h - 1 / (2 beta))^2

    Per-token means keep the squared target comparable across lengths (TRL's reading of the
    paper, confirmed with its authors); beta does not scale h.
    """
    h = chosen.mean_logratio - rejected.mean_logratio
    return LossTerms((h - 1.0 / (2.0 * s.beta)) ** 2, *_masked_rewards(chosen, rejected, s))


def loss_hinge(chosen: SelectedSums, rejected: SelectedSums, s: LossConfig) -> LossTerms:
    """Hinge loss (SLiC-HF's calibration loss on the DPO margin).

        z    = beta * (sum_t m_t (p_t - a_t) over y_w  -  sum_t m_t (p_t - a_t) over y_l)
        loss = max(0, 1 - z)

    A pair whose margin exceeds 1 gives no gradient at all.
    """
    margins = s.beta * (chosen.logratio - rejected.logratio)
    return LossTerms(torch.relu(1.0 - margins), *_masked_rewards(chosen, rejected, s))


def loss_robust(chosen: SelectedSums, rejected: SelectedSums, s: LossConfig) -> LossTerms:
    """Robust DPO (Chowdhury et al.): unbiased under labels flipped with probability eps < 1/2.

        z    = beta * (sum_t m_t (p_t - a_t) over y_w  -  sum_t m_t (p_t - a_t) over y_l)
        loss = (-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)

    At eps = 0 this is sigmoid DPO.
    """
    eps = s.label_smoothing
    margins = s.beta * (chosen.logratio - rejected.logratio)
    losses = (-(1.0 - eps) * F.logsigmoid(margins) + eps * F.logsigmoid(-margins)) / (1.0 - 2.0 * eps)
    return LossTerms(losses, *_masked_rewards(chosen, rejected, s))


def loss_simpo(chosen: SelectedSums, rejected: SelectedSums, s: LossConfig) -> LossTerms:
    """SimPO (Meng et al.): reference-free, the reward is the mean selected policy log-prob.

        R    = beta * sum_t m_t p_t / n,  n = sum_t m_t       (also the reported reward)
        z    = R_w - R_l - gamma
        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)

    gamma is the paper's margin (TRL's `simpo_gamma`; TRL writes beta * (... - gamma / beta)).
    The anchor does not enter; the scoring reference still chooses the tokens.
    """
    chosen_rewards, rejected_rewards = s.beta * chosen.mean_logps, s.beta * rejected.mean_logps
    margins = chosen_rewards - rejected_rewards - s.simpo_gamma
    return LossTerms(sigmoid_loss(margins, s.label_smoothing), chosen_rewards, rejected_rewards)


LOSSES: Mapping[str, LossFunction] = MappingProxyType({
    "sigmoid": loss_sigmoid,
    "sigmoid_norm": loss_sigmoid_norm,
    "ipo": loss_ipo,
    "hinge": loss_hinge,
    "robust": loss_robust,
    "simpo": loss_simpo,
})


def chosen_nll(policy_chosen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B] per-pair mean NLL of the chosen response: -sum_t c_t p_t / sum_t c_t over the tokens c.

    Per pair, as the RPO paper (Pang et al.) normalises; TRL's `sft` term is instead the mean over
    every chosen token of the batch, which weights each pair by its length (docs/losses.md).
    """
    return -(policy_chosen * tokens).sum(dim=1) / tokens.sum(dim=1).to(policy_chosen.dtype)


def selective_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    settings: LossConfig = LossConfig(),
    *,
    anchor_chosen: torch.Tensor | None = None,
    anchor_rejected: torch.Tensor | None = None,
) -> SelectiveDPOOutput:
    """Per-pair Selective-DPO losses; see the module docstring for the math.

    All per-token tensors are [B, L_side] fp32, zero-padded, with `*_mask` marking completion
    tokens. `reference_*` score the tokens; `anchor_*` (default: the reference) anchor the
    reward. `settings` (k, the loss type and its hyperparameters) were checked when built.
    Returns per-pair losses; average them over the global batch.
    """
    anchor_chosen = reference_chosen if anchor_chosen is None else anchor_chosen
    anchor_rejected = reference_rejected if anchor_rejected is None else anchor_rejected
    chosen_scores = alignment_scores(policy_chosen, reference_chosen, chosen=True)
    rejected_scores = alignment_scores(policy_rejected, reference_rejected, chosen=False)
    chosen_selected, chosen_threshold = select_top_k(chosen_scores, chosen_mask, settings.top_k)
    rejected_selected, rejected_threshold = select_top_k(rejected_scores, rejected_mask, settings.top_k)
    terms = LOSSES[settings.loss_type](SelectedSums.of(policy_chosen, anchor_chosen, chosen_selected),
                                       SelectedSums.of(policy_rejected, anchor_rejected, rejected_selected), settings)
    nll = chosen_nll(policy_chosen, chosen_mask if settings.rpo_tokens == "all" else chosen_selected)
    # Skipped at 0 rather than multiplied by 0, so the default loss is exactly the bare loss.
    losses = terms.losses + settings.rpo_alpha * nll if settings.rpo_alpha else terms.losses
    return SelectiveDPOOutput(
        losses=losses,
        chosen_rewards=terms.chosen_rewards.detach(),
        rejected_rewards=terms.rejected_rewards.detach(),
        chosen_selected=chosen_selected,
        rejected_selected=rejected_selected,
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        chosen_threshold=chosen_threshold,
        rejected_threshold=rejected_threshold,
        nll=nll.detach(),
    )
