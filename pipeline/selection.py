"""Token selection of Selective-DPO: alignment scores and the per-sequence top-k mask.

For each completion token t, with `p_t` the policy's and `r_t` the reference's log-prob:

    chosen side:    s_t = r_t - p_t    (tokens the policy under-rates)
    rejected side:  s_t = p_t - r_t    (tokens the policy over-rates)

Per sequence, over its completion tokens only, `tau = quantile(s, 1 - k)` with linear
interpolation (exactly `torch.quantile`'s default) and `m_t = 1[s_t >= tau]`, ties kept. At
least one token is always selected (tau never exceeds the maximum), and k = 1 selects all.
Everything here is computed without gradient: the mask is a constant of each step.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def alignment_scores(policy_logps: torch.Tensor, reference_logps: torch.Tensor, chosen: bool) -> torch.Tensor:
    """s = r - p on the chosen side, p - r on the rejected side; detached."""
    diff = reference_logps.detach() - policy_logps.detach()
    return diff if chosen else -diff


@torch.no_grad()
def quantile_threshold(scores: torch.Tensor, mask: torch.Tensor, top_k: float) -> torch.Tensor:
    """Per row, `torch.quantile(scores[row][mask[row]], 1 - top_k)` for a whole padded batch.

    scores, mask: [B, L]; every row needs at least one masked-in entry. Returns tau [B].
    Mirrors torch.quantile's arithmetic (rank = q * (n - 1) in the input dtype, then lerp
    between the neighbouring order statistics) so the two agree bit for bit.
    """
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        raise ValueError("every sequence needs at least one completion token to select from")
    ordered = scores.masked_fill(~mask, float("inf")).sort(dim=1).values
    q = torch.tensor(1.0 - top_k, dtype=scores.dtype, device=scores.device)
    ranks = q * (counts - 1).to(scores.dtype)
    below = ranks.long()
    above = ranks.ceil().long()
    values_below = ordered.gather(1, below.unsqueeze(1)).squeeze(1)
    values_above = ordered.gather(1, above.unsqueeze(1)).squeeze(1)
    return torch.lerp(values_below, values_above, ranks - below.to(scores.dtype))


@torch.no_grad()
def select_top_k(scores: torch.Tensor, mask: torch.Tensor, top_k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] bool selection, [B] thresholds): tokens whose score is at least their sequence's tau.

    At k = 1, tau is each sequence's minimum score, so every completion token is selected.
    """
    tau = quantile_threshold(scores, mask, top_k)
    return mask & (scores >= tau.unsqueeze(1)), tau


def top_k_mask(scores: torch.Tensor, mask: torch.Tensor, top_k: float) -> torch.Tensor:
    """[B, L] bool: completion tokens whose score is at least their sequence's threshold."""
    return select_top_k(scores, mask, top_k)[0]
