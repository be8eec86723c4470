"""score-ref's reference scoring backends: token ids in, fp32 completion log-probs out.

A request is `(token_ids, prompt_length)`; its answer is the log-probs of
`token_ids[prompt_length:]`, each conditioned on everything before it. Both backends answer the
same requests with the same meaning, so the cache does not depend on which one wrote it beyond
float noise (which `selpipe verify` measures). The hf backend's forward is
`selpipe.pipeline.scoring.score_requests`, shared with `selpipe verify`; this module adds what
only score-ref needs: the token budget measured at start-up, `torch.compile`, and vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from selpipe.pipeline.model import load_causal_lm
from selpipe.pipeline.logprobs import check_output_head, completion_logprobs, completion_target_mask
from selpipe.pipeline.prefix import check_shared_prompts
from selpipe.pipeline.scoring import Request, score_requests

# A doubled token budget must score this much faster to count as faster (timing noise is ~5%).
BUDGET_GAIN = 1.05

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Scorer(Protocol):
    name: str
    version: str
    info: dict[str, Any]  # settings the backend chose itself, for the run's summary

    def score(self, requests: list[Request]) -> list[list[float]]: ...

    def close(self) -> None: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def token_budget_rates(
    model: torch.nn.Module, max_length: int, *, chunk_size: int = 256, largest: int | None = None,
    gain: float = BUDGET_GAIN, measure: Callable[[int], float] | None = None,
) -> dict[int, float]:
    """Scoring tokens/s at doubling token budgets, from one `max_length` row up, while doubling pays.

    Each budget is timed on one batch of `budget // max_length` rows of `max_length` random
    tokens (the widest batch the budget allows, so also its peak memory), the last three quarters
    of each row scored as completion. Measuring stops at the first budget that is not `gain`
    times faster than the best before it, at `largest` (16,384 tokens on CPU, the old fixed
    default; 65,536 on a GPU), or when a GPU runs out of memory. `measure(budget) -> tokens/s`
    replaces the timing (tests).

    Why measure: on CPU a small model's activations at 16,384 tokens overflow the caches and
    bigger batches run slower per token (1.36x slower than at 1,024 tokens in the audit), while a
    large model is GEMM-bound and indifferent; on a GPU bigger batches fill the device. Doubling
    from one row costs a few forwards of at most twice the chosen budget.
    """
    device = next(model.parameters()).device
    largest = largest or (65536 if device.type == "cuda" else 16384)
    measure = measure or (lambda budget: _scoring_rate(model, max_length, budget, chunk_size))
    measure(max_length)  # warm-up: kernels, allocator, thread pool
    rates: dict[int, float] = {}
    budget = max_length
    while budget <= largest:
        try:
            rate = measure(budget)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        best = max(rates.values(), default=0.0)
        rates[budget] = rate
        if best and rate < gain * best:
            break
        budget *= 2
    return rates


def choose_token_budget(model: torch.nn.Module, max_length: int, *, chunk_size: int = 256, largest: int | None = None,
                        gain: float = BUDGET_GAIN, measure: Callable[[int], float] | None = None) -> int:
    """The smallest measured budget within `gain` of the fastest (less memory for the same speed);
    see `token_budget_rates`."""
    return _smallest_near_best(token_budget_rates(model, max_length, chunk_size=chunk_size, largest=largest,
                                                  gain=gain, measure=measure), gain)


def _smallest_near_best(rates: dict[int, float], gain: float) -> int:
    best = max(rates.values())
    return min(budget for budget, rate in rates.items() if rate * gain >= best)


@torch.inference_mode()
def _scoring_rate(model: torch.nn.Module, max_length: int, budget: int, chunk_size: int) -> float:
    device = next(model.parameters()).device
    rows = budget // max_length
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (rows, max_length), generator=generator).to(device)
    prompt = max_length // 4
    target = completion_target_mask([prompt] * rows, [max_length - prompt] * rows, max_length).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    completion_logprobs(model, input_ids, torch.ones_like(input_ids), target, chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return rows * max_length / (time.perf_counter() - started)


class HFScorer:
    """transformers backend: batched by token budget, log-softmax only at completion positions.

    `token_budget="auto"` measures the fastest budget for this model on this device at start-up
    (`choose_token_budget`; needs `max_length`). `share_prompts` runs each prompt once for all
    the requests that share it (`selpipe.pipeline.prefix`), refusing at start-up a model whose
    attention cannot take the mask. `info` records what was chosen.
    """

    name = "hf"

    def __init__(self, model_path: str, *, revision: str | None = None, dtype: str = "float32",
                 device: str = "auto", token_budget: int | str = 16384, chunk_size: int = 256, pad_id: int = 0,
                 compile: bool = False, share_prompts: bool = False, max_length: int | None = None):
        import transformers

        self.version = transformers.__version__
        self.device = resolve_device(device)
        self.model = load_causal_lm(model_path, dtype=TORCH_DTYPES[dtype], flag="--model", revision=revision).to(self.device)
        self.model.eval()
        check_output_head(self.model)
        if share_prompts:
            check_shared_prompts(self.model)
        self.chunk_size, self.pad_id, self.share_prompts = chunk_size, pad_id, share_prompts
        self.info: dict[str, Any] = {"share_prompts": share_prompts}
        if token_budget == "auto":
            if max_length is None:
                raise ValueError("token_budget='auto' measures batches of max_length tokens; give max_length")
            rates = token_budget_rates(self.model, max_length, chunk_size=chunk_size)
            token_budget = _smallest_near_best(rates, BUDGET_GAIN)
            self.info["token_budget_rates"] = {str(b): round(r, 1) for b, r in rates.items()}
        self.token_budget = self.info["token_budget"] = int(token_budget)
        if compile:
            self._compile()

    def _compile(self) -> None:
        """Compile the trunk and the head (the GEMMs that are the backend's time) with inductor.

        Frozen weights let inductor constant-fold them and, on CPU, pre-pack them for oneDNN's
        matmuls. Shapes are dynamic: batches vary in size and length.
        """
        options = {"freezing": True}  # for these two modules only, not for the process
        model = self.model
        setattr(model, model.base_model_prefix, torch.compile(model.base_model, dynamic=True, options=options))
        model.set_output_embeddings(torch.compile(model.get_output_embeddings(), dynamic=True, options=options))

    def close(self) -> None:
        """Nothing to release: the model is an ordinary object of this process."""

    def score(self, requests: list[Request]) -> list[list[float]]:
        return score_requests(self.model, requests, token_budget=self.token_budget, chunk_size=self.chunk_size,
                              pad_id=self.pad_id, share_prompts=self.share_prompts)


class VLLMScorer:
    """vLLM backend: token ids in, `prompt_logprobs=0` (the log-prob of each given token).

    Prefix caching is off: prompt log-probs are only computed for positions the engine runs,
    and the chosen and rejected sequences share their prompt.
    """

    name = "vllm"

    def __init__(self, model_path: str, *, revision: str | None = None, dtype: str = "float32",
                 max_model_len: int = 1024, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, kv_cache_memory_bytes: int | None = None, seed: int = 0,
                 enforce_eager: bool = False):
        import vllm

        self.version = vllm.__version__
        self.info: dict[str, Any] = {}
        options = dict(
            model=model_path, revision=revision, dtype=dtype, seed=seed,
            max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=False, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
        )
        if kv_cache_memory_bytes is not None:
            options["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        self.llm = vllm.LLM(**options)
        self.sampling = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)

    def close(self) -> None:
        """Stop the engine's processes now, rather than in interpreter teardown."""
        self.llm.llm_engine.engine_core.shutdown()

    def score(self, requests: list[Request]) -> list[list[float]]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in requests]
        outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
        results = []
        for (ids, prompt_length), output in zip(requests, outputs):
            per_position = output.prompt_logprobs
            results.append([float(per_position[t][ids[t]].logprob) for t in range(prompt_length, len(ids))])
        return results


def make_scorer(cfg) -> Scorer:  # cfg: ScoreConfig
    if cfg.backend == "vllm":
        return VLLMScorer(cfg.model, revision=cfg.revision, dtype=cfg.dtype, max_model_len=cfg.max_length + 1,  # + the one token vLLM must sample
                          tensor_parallel_size=cfg.tensor_parallel_size,
                          gpu_memory_utilization=cfg.gpu_memory_utilization,
                          kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, enforce_eager=cfg.enforce_eager)
    return HFScorer(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=cfg.device,
                    token_budget=cfg.token_budget, chunk_size=cfg.logprob_chunk, compile=cfg.compile,
                    max_length=cfg.max_length, share_prompts=cfg.share_prompts)
