"""Per-token log-probabilities at completion positions: the one helper both stages use.

`log p(y_t | y_<t)` is read from the final hidden state at position t-1. Only positions whose
target is a completion token are projected to the vocabulary, in chunks of `chunk_size`
positions, and each chunk's fp32 log-softmax is wrapped in activation checkpointing when
gradients flow. So neither the forward nor the saved-for-backward state ever holds a
`[tokens, vocab]` tensor of the whole batch: the peak is `[chunk_size, vocab]` in fp32.

Selective-DPO's loss has a zero gradient at every token outside its top-k mask, so the head's
backward (and, under checkpointing, its recompute) over those positions is wasted work.
`selective_completion_logprobs` computes every log-prob once without gradient, asks which
positions need one, and runs the head with gradient on those alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError


def _chunk_logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def logprobs_from_hidden(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """`log_softmax(head(hidden))[targets]` in fp32, `chunk_size` rows at a time.

    hidden: [N, H] states that predict `targets` [N]. Returns [N] fp32.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if recompute:
            pieces.append(checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, h, t))
    return torch.cat(pieces)


def selective_logprobs_from_hidden(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """`logprobs_from_hidden`, with a gradient path only at the positions `select` picks.

    1. All N log-probs are computed without gradient, in chunks (one head forward, nothing kept).
    2. `select(values)` gets them detached ([N] fp32) and returns a bool [N]: the positions
       whose log-prob the loss will differentiate.
    3. The head and log-softmax run again with gradient on those positions only, in chunks under
       activation checkpointing as `logprobs_from_hidden` does, except when they all fit in one
       chunk: then that one chunk's log-softmax is simply kept for backward. It is the same
       `[chunk_size, vocab]` fp32 buffer the checkpointed recompute would rebuild in backward,
       so the peak memory `--logprob-chunk` promises still holds and the recompute is saved.

    The result holds exactly the values of step 1 (so a selection recomputed from it, as
    `selective_dpo_loss` does, agrees with `select` bit for bit) and carries the gradient of
    step 3: for a loss whose gradient is zero off the selected positions it is the gradient of
    `logprobs_from_hidden`. Unselected positions have no gradient path at all.
    Without gradient (evaluation, scoring) this is `logprobs_from_hidden` and `select` is not called.

    Cost of the head, in units of one head forward over N positions, with k the selected
    fraction: 1 + 3k, plus k for the recompute when checkpointed, against 4 for
    `logprobs_from_hidden` (forward, recompute, and a backward of twice a forward). At k = 0.4
    that is 2.2 or 2.6 instead of 4.
    """
    with torch.no_grad():
        values = logprobs_from_hidden(head, hidden.detach(), targets, chunk_size)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return values
    selected = select(values)
    if selected.shape != values.shape or selected.dtype != torch.bool:
        raise ValueError(f"select must return a bool tensor of shape {tuple(values.shape)}; "
                         f"got {selected.dtype} {tuple(selected.shape)}")
    rows = selected.nonzero().squeeze(1)
    if rows.numel() <= chunk_size:
        recomputed = _chunk_logprobs(head, hidden[rows], targets[rows])
    else:
        recomputed = logprobs_from_hidden(head, hidden[rows], targets[rows], chunk_size)
    # Value of step 1 exactly (x - x is 0 exactly), gradient of step 3.
    exact = values[rows] + (recomputed - recomputed.detach())
    return values.index_put((rows,), exact)


def output_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from final hidden states to logits, with the transforms some architectures add
    after the head: Cohere's `logit_scale` (x), Granite's `logits_scaling` (/), Gemma-2's soft-cap.
    `check_output_head` catches any other."""
    lm_head = model.get_output_embeddings()
    config = model.config
    scale = getattr(config, "logit_scale", None) or 1.0
    divide = getattr(config, "logits_scaling", None) or 1.0
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale == 1.0 and divide == 1.0 and not softcap:
        return lm_head

    def transformed(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden) * scale / divide
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return transformed


@torch.no_grad()
def check_output_head(model: torch.nn.Module) -> None:
    """Refuse a model whose own logits this module's head path does not reproduce."""
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device).remainder(model.config.vocab_size).unsqueeze(0)
    mask = torch.ones_like(ids)
    reference = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = torch.log_softmax(output_head(model)(hidden).float(), -1)
    if not torch.allclose(reference, ours, atol=1e-3):
        raise ConfigError(f"{type(model).__name__} transforms its logits in a way selpipe does not reproduce; "
                         f"its log-probs would be wrong")


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Log-probs of the tokens where `target_mask` is set, in row-major order, fp32 [N].

    input_ids, attention_mask, target_mask: [B, T], right-padded. target_mask marks completion
    tokens; column 0 must be unset (the first token has no prediction).
    """
    hidden, targets = _completion_states(model, input_ids, attention_mask, target_mask)
    return logprobs_from_hidden(output_head(model), hidden, targets, chunk_size)


def selective_completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 256,
) -> torch.Tensor:
    """`completion_logprobs` whose gradient flows only through the positions `select` picks.

    `select` takes the detached fp32 log-probs [N] (row-major over target_mask, the layout of
    `completion_logprobs`) and returns a bool [N]. Values equal `completion_logprobs`' exactly;
    the gradient equals its gradient for any loss whose gradient is zero off the selected
    positions. See `selective_logprobs_from_hidden` for the cost and memory.
    """
    hidden, targets = _completion_states(model, input_ids, attention_mask, target_mask)
    return selective_logprobs_from_hidden(output_head(model), hidden, targets, select, chunk_size)


def _completion_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, H] final hidden states that predict the completion tokens, [N] those tokens), row-major."""
    if target_mask[:, 0].any():
        raise ValueError("target_mask marks position 0, which no hidden state predicts; sequences need a prompt")
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    predicts = target_mask[:, 1:]
    return hidden[:, :-1][predicts], input_ids[:, 1:][predicts]


def pad_sequences(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids, attention_mask) [B, T]."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask


def completion_target_mask(prompt_lengths: list[int], completion_lengths: list[int], width: int) -> torch.Tensor:
    """[B, T] bool: True at the completion tokens of right-padded prompt+completion rows."""
    positions = torch.arange(width)
    start = torch.tensor(prompt_lengths).unsqueeze(1)
    end = start + torch.tensor(completion_lengths).unsqueeze(1)
    return (positions >= start) & (positions < end)


def to_padded(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a row-major flat [sum(lengths)] into ([B, max_len] values, [B, max_len] bool mask).

    Differentiable with respect to `flat`; padding holds 0.
    """
    width = max(lengths) if lengths else 0
    mask = torch.arange(width, device=flat.device).unsqueeze(0) < torch.tensor(lengths, device=flat.device).unsqueeze(1)
    padded = flat.new_zeros(mask.shape)
    return padded.masked_scatter(mask, flat), mask
