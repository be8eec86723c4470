"""Shared prompts: each prompt is computed once and every completion of it attends to it.

Prefix sharing after Wang and Hegde, "Accelerating Direct Preference Optimization with Prefix
Sharing" (arXiv 2410.20305). A pair's chosen and rejected sequences repeat the prompt; packed
as one row `[prompt, chosen, rejected]`, the prompt's tokens go through the model once:

    row        p0 p1 p2 | c0 c1 c2 c3 | r0 r1
    position    0  1  2 |  3  4  5  6 |  3  4     each completion restarts at len(prompt)
    segment     0  0  0 |  1  1  1  1 |  2  2     padding is segment -1

Query t may attend key s when `s <= t` and segment(s) is 0 (the prompt) or segment(t): the
rejected tokens see the prompt and themselves, never the chosen ones. With the same positions
(rotary embeddings) and the same visible keys, every completion token's hidden state is the one
the unshared forward computes, up to float summation order; the prompt's hidden states feed both
completions, so its gradient is the sum of the two the unshared forward computes separately.

Unlike the paper's code (which repeats the prompt's last token before the rejected completion),
no token is added: the prompt's last hidden state predicts the first token of every completion.
A row may hold any number of completions of one prompt (the scorer groups requests by prompt).

The mask goes to the model as a 4D tensor, which transformers' `sdpa` and `eager` attention
take as is (sdpa as a boolean mask, eager as an additive one). FlashAttention kernels take only
padding masks, and a 4D mask replaces a sliding window (harmless only while rows fit in it);
such models are refused with a `ConfigError` (`check_shared_prompts`), and the caller runs the
unshared path instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import tensors_to
from .errors import ConfigError
from .logprobs import logprobs_from_hidden, output_head, selective_logprobs_from_hidden

MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class SharedPromptBatch:
    input_ids: torch.Tensor          # [R, T] prompt then its completions, right-padded
    position_ids: torch.Tensor       # [R, T] each completion restarts at len(prompt)
    allowed: torch.Tensor            # [R, 1, T, T] bool: query t may attend key s
    sources: torch.Tensor            # [N] index into the flattened [R * T] hidden states predicting each target
    targets: torch.Tensor            # [N] completion tokens
    completions: list[tuple[int, int]]  # (row, slot) of each completion, in output order
    completion_lengths: list[int]    # tokens of each completion, in output order

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        return tensors_to(self, device)


def pack_shared_prompts(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]], pad_id: int = 0,
) -> SharedPromptBatch:
    """One row per prompt: the prompt, then each of its completions (see the module docstring).

    Output order is slot-major: every row's first completion, then every row's second, and so
    on, each completion's tokens in order. For pairs (`completions[i] = [chosen, rejected]`)
    that is `completion_logprobs`' layout over `collate_pairs`' batch: chosen rows, then rejected.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs a token: its last hidden state predicts the first completion token")
    width = max(len(p) + sum(len(c) for c in cs) for p, cs in zip(prompts, completions))
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    segments = torch.full((rows, width), -1, dtype=torch.long)
    starts: dict[tuple[int, int], int] = {}
    for row, (prompt, slots) in enumerate(zip(prompts, completions)):
        ids, positions, segment = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        for slot, completion in enumerate(slots):
            starts[row, slot] = len(ids)
            ids += completion
            positions += range(len(prompt), len(prompt) + len(completion))
            segment += [slot + 1] * len(completion)
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[row, :len(ids)] = torch.tensor(positions, dtype=torch.long)
        segments[row, :len(ids)] = torch.tensor(segment, dtype=torch.long)

    order = [(row, slot) for slot in range(max(len(cs) for cs in completions))
             for row in range(rows) if slot < len(completions[row])]
    sources, targets = [], []
    for row, slot in order:
        start, completion = starts[row, slot], completions[row][slot]
        # Token 0 is predicted by the prompt's last state, token i > 0 by the completion's own token i - 1.
        predictors = [len(prompts[row]) - 1] + [start + i for i in range(len(completion) - 1)]
        sources += [row * width + p for p in predictors[:len(completion)]]
        targets += completion

    index = torch.arange(width)
    causal = index.unsqueeze(1) >= index.unsqueeze(0)
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    allowed = causal & ((key == 0) | (key == query))  # padding (-1) sees padding and the prompt: no empty row
    return SharedPromptBatch(
        input_ids=input_ids, position_ids=position_ids, allowed=allowed.unsqueeze(1),
        sources=torch.tensor(sources, dtype=torch.long), targets=torch.tensor(targets, dtype=torch.long),
        completions=order, completion_lengths=[len(completions[r][s]) for r, s in order],
    )


def pack_pairs(rows: list[dict[str, Any]], pad_id: int = 0) -> SharedPromptBatch:
    """Cache rows as `[prompt, chosen, rejected]` rows; log-probs come out in `collate_pairs`' layout."""
    return pack_shared_prompts([r["prompt_ids"] for r in rows],
                               [[r["chosen_ids"], r["rejected_ids"]] for r in rows], pad_id)


def check_shared_prompts(model: torch.nn.Module, width: int | None = None) -> None:
    """Refuse a model whose attention cannot take the block-causal mask, naming why and the fix.

    A 4D mask replaces a sliding window, which changes nothing only while every sequence fits
    in the window: a windowed model is accepted for packed rows of at most `width` tokens
    within its window, and refused when `width` is not given.
    """
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in MASKABLE_ATTENTION:
        raise ConfigError(f"prefix sharing needs attention that takes a 4D mask ({' or '.join(MASKABLE_ATTENTION)}); "
                          f"{type(model).__name__} runs {implementation}: load it with attn_implementation='sdpa' "
                          f"or turn prefix sharing off")
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    windowed = any(t != "full_attention" for t in layer_types) if layer_types is not None else window is not None
    if windowed and (width is None or window is None or width > window):
        raise ConfigError(f"prefix sharing's 4D mask would replace {type(model).__name__}'s sliding window of {window} "
                          f"tokens{'' if width is None else f' (rows of {width} tokens)'}; turn prefix sharing off "
                          f"for this model")


def supports_shared_prompts(model: torch.nn.Module, width: int | None = None) -> bool:
    try:
        check_shared_prompts(model, width)
    except ConfigError:
        return False
    return True


def shared_prompt_logprobs(
    model: torch.nn.Module,
    packed: SharedPromptBatch,
    chunk_size: int = 256,
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-probs of every completion token of `packed`, fp32 [N], in its output order.

    For `pack_pairs(rows)` this equals `completion_logprobs` over `collate_pairs(rows)` to float
    noise, values and gradients. With `select`, the head runs with gradient only where it says,
    as in `selective_completion_logprobs`.
    """
    check_shared_prompts(model, packed.input_ids.shape[1])
    allowed = packed.allowed
    if model.config._attn_implementation == "eager":  # adds the mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    hidden = model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=allowed,
                              use_cache=False).last_hidden_state
    states = hidden.flatten(0, 1)[packed.sources]
    if select is None:
        return logprobs_from_hidden(output_head(model), states, packed.targets, chunk_size)
    return selective_logprobs_from_hidden(output_head(model), states, packed.targets, select, chunk_size)
