"""Collate cache rows into the tensors one policy forward needs.

Chosen and rejected sequences of B pairs go through the model as one batch of 2B right-padded
rows (chosen first). Per-token values are laid out per side as [B, L] with a completion mask,
aligned with the completion tokens (not with sequence positions), which is what the loss takes.

Every row of a micro batch is padded to its longest sequence, so which pairs share a micro batch
decides how much of the forward is padding. `order_for_micro_batches` groups a rank's rows of
one global batch by length before they are cut into micro batches (the optimizer step sees the
same pairs), and `length_bucketed_order` goes one step further for the stream's shuffle window
(the global batches themselves are made of similar lengths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from .cache import CacheError
from .logprobs import completion_target_mask, pad_sequences, to_padded
from .selection import alignment_scores, top_k_mask


def tensors_to(batch: Any, device: torch.device | str) -> Any:
    """A copy of a dataclass of tensors (and plain values) with every tensor on `device`."""
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


@dataclass
class PairBatch:
    input_ids: torch.Tensor          # [2B, T]
    attention_mask: torch.Tensor     # [2B, T]
    target_mask: torch.Tensor        # [2B, T] completion tokens
    reference: torch.Tensor          # [2B, L] scoring log-probs, completion-aligned
    anchor: torch.Tensor             # [2B, L] anchor log-probs (the reference unless a second cache)
    completion_mask: torch.Tensor    # [2B, L]
    weights: torch.Tensor            # [B] 1 for real pairs, 0 for padding pairs (eval only)
    completion_lengths: list[int]    # 2B

    @property
    def pairs(self) -> int:
        return self.weights.shape[0]

    def to(self, device: torch.device | str) -> PairBatch:
        return tensors_to(self, device)


def collate_pairs(rows: list[dict[str, Any]], pad_id: int = 0, weights: list[float] | None = None) -> PairBatch:
    sides = ("chosen", "rejected")
    sequences, prompt_lengths, completion_lengths, reference, anchor = [], [], [], [], []
    for side in sides:
        for row in rows:
            for key in (f"{side}_ref_logps", f"{side}_anchor_logps"):
                if key in row and len(row[key]) != len(row[f"{side}_ids"]):
                    # Misaligned values would silently shift onto the next row's tokens.
                    raise CacheError(f"row {row['id']}: {key} has {len(row[key])} values for {len(row[f'{side}_ids'])} tokens")
            sequences.append(list(row["prompt_ids"]) + list(row[f"{side}_ids"]))
            prompt_lengths.append(len(row["prompt_ids"]))
            completion_lengths.append(len(row[f"{side}_ids"]))
            reference.extend(row[f"{side}_ref_logps"])
            anchor.extend(row.get(f"{side}_anchor_logps") or row[f"{side}_ref_logps"])
    input_ids, attention_mask = pad_sequences(sequences, pad_id)
    target_mask = completion_target_mask(prompt_lengths, completion_lengths, input_ids.shape[1])
    reference_padded, completion_mask = to_padded(torch.tensor(reference, dtype=torch.float32), completion_lengths)
    anchor_padded, _ = to_padded(torch.tensor(anchor, dtype=torch.float32), completion_lengths)
    return PairBatch(
        input_ids=input_ids, attention_mask=attention_mask, target_mask=target_mask,
        reference=reference_padded, anchor=anchor_padded, completion_mask=completion_mask,
        weights=torch.tensor(weights if weights is not None else [1.0] * len(rows), dtype=torch.float32),
        completion_lengths=completion_lengths,
    )


def top_k_selector(batch: PairBatch, top_k: float, all_chosen: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `select` of `selective_completion_logprobs` for this batch: the tokens that
    `selective_dpo_loss` will select from these log-probs, as a flat bool [N].

    Same scores (the scoring reference, not the anchor), same per-sequence threshold, same
    layout: `to_padded` over the completion lengths, chosen rows first. Every loss of
    `LOSSES` has a zero gradient off this selection; an RPO term over all chosen tokens
    (`rpo_tokens="all"`) does not, and needs `all_chosen`: every chosen token then keeps its
    gradient path (the rejected side is still cut to its top k).
    """
    pairs, lengths = batch.pairs, batch.completion_lengths

    def select(flat: torch.Tensor) -> torch.Tensor:
        policy, mask = to_padded(flat, lengths)
        reference = batch.reference.to(flat.device)
        chosen = (mask[:pairs] if all_chosen else
                  top_k_mask(alignment_scores(policy[:pairs], reference[:pairs], chosen=True), mask[:pairs], top_k))
        rejected = top_k_mask(alignment_scores(policy[pairs:], reference[pairs:], chosen=False), mask[pairs:], top_k)
        return torch.cat([chosen, rejected])[mask]

    return select


def pair_width(row: dict[str, Any], shared_prompts: bool = False) -> int:
    """The padded width a pair forces on its micro batch: its prompt plus its longer completion,
    or, packed as one row with its prompt shared (`pipeline/prefix.py`), prompt plus both."""
    chosen, rejected = len(row["chosen_ids"]), len(row["rejected_ids"])
    return len(row["prompt_ids"]) + (chosen + rejected if shared_prompts else max(chosen, rejected))


def order_for_micro_batches(rows: list[dict[str, Any]], shared_prompts: bool = False) -> list[dict[str, Any]]:
    """This rank's rows of one global batch, widest first, ready to be cut into micro batches.

    Sorted by `pair_width` (the micro batch pads to its widest pair; `shared_prompts` when the
    pairs go through `pack_pairs`), then total tokens, then id, so the order is deterministic.
    The step's gradient is unchanged: every micro batch holds the same number of pairs, its loss
    is their mean, and the step sums the micro batches' gradients; only the summation order
    differs. Widest first puts the step's peak memory in its first micro batch, where a
    too-large setting fails at once.
    """
    def key(row: dict[str, Any]) -> tuple[int, int, str]:
        total = 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
        return -pair_width(row, shared_prompts), -total, str(row["id"])

    return sorted(rows, key=key)


def length_bucketed_order(widths: Sequence[int], batch_size: int, generator: np.random.Generator,
                          offset: int = 0) -> list[int]:
    """A permutation of a shuffle window's rows in which every global batch holds similar widths.

    `offset` is the stream position of the window's first row: global batches start at multiples
    of `batch_size`, so the window's first `(-offset) % batch_size` rows complete a batch begun in
    the previous window, and its last rows begin one that the next window completes. Those rows
    are drawn at random. The others are shuffled, stably sorted by width (equal widths stay in
    random order), cut into blocks of `batch_size`, and the blocks shuffled: each global batch
    wholly inside the window is a random block of neighbouring widths, in random block order.
    Deterministic given `generator`'s seed.

    Unlike `order_for_micro_batches`, this changes which pairs train together (a batch's
    composition now correlates with length), which is why it is opt-in.
    """
    shuffled = generator.permutation(len(widths))
    head = min((-offset) % batch_size, len(shuffled))
    tail = (len(shuffled) - head) % batch_size
    middle = shuffled[head:len(shuffled) - tail]
    by_width = middle[np.argsort(np.asarray(widths)[middle], kind="stable")]
    blocks = by_width.reshape(-1, batch_size)[generator.permutation(len(by_width) // batch_size)]
    return [int(i) for i in np.concatenate([shuffled[:head], blocks.ravel(), shuffled[len(shuffled) - tail:]])]
