"""Collate cache rows into the tensors one policy forward needs.

Chosen and rejected sequences of B pairs go through the model as one batch of 2B right-padded
rows (chosen first). Per-token values are laid out per side as [B, L] with a completion mask,
aligned with the completion tokens (not with sequence positions), which is what the loss takes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .cache import CacheError
from .logprobs import completion_target_mask, pad_sequences, to_padded


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
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return PairBatch(**moved)


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
