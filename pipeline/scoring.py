"""Reference log-probs of token-id requests with a transformers model: what stage one's hf backend
computes and what `selpipe verify` recomputes, so the two cannot drift apart.

A request is `(token_ids, prompt_length)`; its answer is the fp32 log-probs of
`token_ids[prompt_length:]`, each conditioned on everything before it. Requests are batched by a
token budget (rows x longest row, padding included) and only completion positions are projected
to the vocabulary (`selpipe.pipeline.logprobs.completion_logprobs`, the helper training uses for
the policy). With `share_prompts` each distinct prompt runs once for all of its requests
(`selpipe.pipeline.prefix`). Pure: the caller loads the model and decides the budget.
"""

from __future__ import annotations

import torch

from .logprobs import completion_logprobs, completion_target_mask, pad_sequences
from .prefix import pack_shared_prompts, shared_prompt_logprobs

Request = tuple[list[int], int]


def token_budget_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so each batch's padded size (rows x longest) stays within the budget.

    Sorted longest first, so padding is small and the largest batch (the one most likely to run
    out of memory) comes first.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_requests(model: torch.nn.Module, requests: list[Request], *, token_budget: int, chunk_size: int = 256,
                   pad_id: int = 0, share_prompts: bool = False) -> list[list[float]]:
    """The completion log-probs of every request, in request order (see the module docstring)."""
    if share_prompts:
        return _score_shared(model, requests, token_budget, chunk_size, pad_id)
    device = _device(model)
    results: list[list[float]] = [[] for _ in requests]
    for batch in token_budget_batches([len(ids) for ids, _ in requests], token_budget):
        sequences = [requests[i][0] for i in batch]
        prompt_lengths = [requests[i][1] for i in batch]
        completion_lengths = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
        input_ids, attention_mask = pad_sequences(sequences, pad_id)
        target = completion_target_mask(prompt_lengths, completion_lengths, input_ids.shape[1])
        flat = completion_logprobs(model, input_ids.to(device), attention_mask.to(device), target.to(device),
                                   chunk_size).cpu()
        for i, piece in zip(batch, flat.split(completion_lengths)):
            results[i] = piece.tolist()
    return results


def _score_shared(model: torch.nn.Module, requests: list[Request], token_budget: int, chunk_size: int,
                  pad_id: int) -> list[list[float]]:
    """One packed row per distinct prompt, holding every requested completion of it."""
    device = _device(model)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (ids, prompt_length) in enumerate(requests):
        groups.setdefault(tuple(ids[:prompt_length]), []).append(index)
    prompts, members = list(groups), list(groups.values())
    lengths = [len(p) + sum(len(requests[i][0]) - len(p) for i in m) for p, m in zip(prompts, members)]
    results: list[list[float]] = [[] for _ in requests]
    for batch in token_budget_batches(lengths, token_budget):
        packed = pack_shared_prompts([prompts[g] for g in batch],
                                     [[requests[i][0][len(prompts[g]):] for i in members[g]] for g in batch], pad_id)
        flat = shared_prompt_logprobs(model, packed.to(device), chunk_size).cpu()
        for (row, slot), piece in zip(packed.completions, flat.split(packed.completion_lengths)):
            results[members[batch[row]][slot]] = piece.tolist()
    return results
