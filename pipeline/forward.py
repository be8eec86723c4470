"""The policy's forward for the loss: one object owns how completion log-probs are computed.

Three ways, chosen here and nowhere else:

- plain: every completion position through the output head, in chunks
  (`logprobs.completion_logprobs`);
- selective head: the head recomputed with gradient only at the tokens the loss can select
  (`logprobs.selective_completion_logprobs`; the same gradient, less head work at k < 1);
- prefix sharing: each pair's prompt forwarded once for both responses, one packed row with a
  block-causal mask (`prefix.shared_prompt_logprobs`), with or without the selective head.

Pure: tensors in, tensors out; no process groups, no I/O. The training engine wraps the model
and calls `logprobs` inside DeepSpeed's forward (so ZeRO-3's parameter hooks see it); the loop
calls `inputs` and `selector` around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .batching import PairBatch, collate_pairs, top_k_selector
from .config import LossConfig, ModelConfig
from .logprobs import completion_logprobs, selective_completion_logprobs
from .prefix import SharedPromptBatch, pack_pairs, shared_prompt_logprobs

Selector = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PolicyForward:
    """How a micro batch's completion log-probs are computed (see the module docstring).

    `top_k` and `head_on_all_chosen` are the loss's: which tokens the head's gradient is needed at.
    """

    chunk_size: int = 256
    selective_head: bool = True
    prefix_sharing: bool = False
    top_k: float = 1.0
    head_on_all_chosen: bool = False

    @classmethod
    def of(cls, model: ModelConfig, loss: LossConfig) -> PolicyForward:
        return cls(chunk_size=model.logprob_chunk, selective_head=model.selective_head,
                   prefix_sharing=model.prefix_sharing, top_k=loss.top_k, head_on_all_chosen=loss.head_on_all_chosen)

    def inputs(self, rows: list[dict[str, Any]], pad_id: int, device: torch.device,
               weights: list[float] | None = None) -> tuple[PairBatch, SharedPromptBatch | None]:
        """One micro batch's rows collated for the loss and, with prefix sharing, packed for the forward."""
        batch = collate_pairs(rows, pad_id, weights).to(device)
        packed = pack_pairs(rows, pad_id).to(device) if self.prefix_sharing else None
        return batch, packed

    def selector(self, batch: PairBatch) -> Selector | None:
        """The tokens the head needs a gradient at: the selected ones (every chosen token when an RPO
        term averages over all of them); None where every token needs one, or no gradient is taken."""
        if self.selective_head and self.top_k < 1 and torch.is_grad_enabled():
            return top_k_selector(batch, self.top_k, all_chosen=self.head_on_all_chosen)
        return None

    def logprobs(self, policy: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_mask: torch.Tensor, select: Selector | None = None,
                 packed: SharedPromptBatch | None = None) -> torch.Tensor:
        """Flat fp32 log-probs of the completion tokens, row-major: chosen rows, then rejected."""
        if packed is not None:
            return shared_prompt_logprobs(policy, packed, self.chunk_size, select=select)
        if select is not None:
            return selective_completion_logprobs(policy, input_ids, attention_mask, target_mask, select,
                                                 self.chunk_size)
        return completion_logprobs(policy, input_ids, attention_mask, target_mask, self.chunk_size)
