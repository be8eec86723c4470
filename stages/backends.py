"""Reference scoring backends: token ids in, fp32 completion log-probs out.

A request is `(token_ids, prompt_length)`; its answer is the log-probs of
`token_ids[prompt_length:]`, each conditioned on everything before it. Both backends answer the
same requests with the same meaning, so the cache does not depend on which one wrote it beyond
float noise (which `selpipe verify` measures).
"""

from __future__ import annotations

from typing import Protocol

import torch

from selpipe.pipeline.logprobs import check_output_head, completion_logprobs, completion_target_mask, pad_sequences

Request = tuple[list[int], int]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Scorer(Protocol):
    name: str
    version: str

    def score(self, requests: list[Request]) -> list[list[float]]: ...

    def close(self) -> None: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


class HFScorer:
    """transformers backend: batched by token budget, log-softmax only at completion positions."""

    name = "hf"

    def __init__(self, model_path: str, *, revision: str | None = None, dtype: str = "float32",
                 device: str = "auto", token_budget: int = 16384, chunk_size: int = 256, pad_id: int = 0,
                 compile: bool = False):
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        self.device = resolve_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, revision=revision, dtype=TORCH_DTYPES[dtype]).to(self.device)
        self.model.eval()
        check_output_head(self.model)
        self.token_budget, self.chunk_size, self.pad_id = token_budget, chunk_size, pad_id
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

    @torch.inference_mode()
    def score(self, requests: list[Request]) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in requests]
        for batch in token_budget_batches([len(ids) for ids, _ in requests], self.token_budget):
            sequences = [requests[i][0] for i in batch]
            prompt_lengths = [requests[i][1] for i in batch]
            completion_lengths = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
            input_ids, attention_mask = pad_sequences(sequences, self.pad_id)
            target = completion_target_mask(prompt_lengths, completion_lengths, input_ids.shape[1])
            flat = completion_logprobs(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                                       target.to(self.device), self.chunk_size).cpu()
            for i, piece in zip(batch, flat.split(completion_lengths)):
                results[i] = piece.tolist()
        return results


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
                    token_budget=cfg.token_budget, chunk_size=cfg.logprob_chunk, compile=cfg.compile)
