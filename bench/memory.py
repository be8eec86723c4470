"""Peak memory of the policy's per-token log-prob computation + backward: selpipe vs TRL.

    .venv/bin/python bench/memory.py [--reduced]

What is measured, per (method, vocabulary, sequence length), each in a fresh process: one pair
(chosen and rejected rows of `seq_len` tokens, the first quarter the prompt they share) through a narrow
Qwen2-style model where the output head dominates, the per-token log-probs of the completion
tokens, their sum, and `backward()`. That is the part of a DPO step whose memory grows with
vocabulary x tokens; the loss on top of it is a few scalars per sequence. Methods:

- `selpipe`: `selpipe.pipeline.logprobs.completion_logprobs` (completion positions only,
  chunks of fp32 log-softmax under activation checkpointing), with `selpipe train`'s default
  `--logprob-chunk` (256); `selpipe_chunk1024` is the same with `--logprob-chunk 1024`.
- `selpipe_selective_head`: `selective_completion_logprobs` with 40% of the completion tokens
  selected (the lowest log-probs, standing in for top-k by alignment score) and a loss over
  those only, as Selective-DPO's is: the head's backward runs on the selected rows alone.
- `selpipe_prefix_sharing`: `shared_prompt_logprobs`: the pair packed as one row
  [prompt, chosen, rejected] with a block-causal mask, the prompt computed once.
- `trl`: TRL 1.16's own path, `add_fused_lm_head` + `model(..., labels, fused_lm_head=True)`
  `.log_probs`, exactly the policy forward `DPOTrainer._compute_loss` makes.
- `full_logits`: `log_softmax(model(...).logits.float())` gathered at the labels, the
  concatenated forward of TRL before 1.0 and of the Selective-DPO authors' code. Skipped where
  its logits alone would pass `--full-logits-limit-gib` (the machine has no room for them).

On CPU the peak is the process's resident high-water mark (`VmHWM`), reset after one warm-up
step, minus the resident memory before the measured step; on a GPU it is
`torch.cuda.max_memory_allocated` minus the allocation before the step. So the number is
what the step adds on top of the model, its gradients from the warm-up, and the inputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchlib import THREADS, print_table, set_threads, thread_env, write_results

from selpipe.pipeline.config import ModelConfig

SETTINGS = {
    "reduced": {"vocabs": [32000, 151936], "seq_lens": [512]},
    "full": {"vocabs": [32000, 151936], "seq_lens": [512, 1024, 2048, 4096]},
}
MODEL = {"hidden": 128, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 256}
METHODS = ("selpipe", "selpipe_chunk1024", "selpipe_selective_head", "selpipe_prefix_sharing", "trl", "full_logits")
SELPIPE_CHUNKS = {"selpipe": ModelConfig.logprob_chunk, "selpipe_chunk1024": 1024}


def build(vocab: int, seq_len: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=MODEL["hidden"], intermediate_size=MODEL["intermediate"],
                         num_hidden_layers=MODEL["layers"], num_attention_heads=MODEL["heads"],
                         num_key_value_heads=MODEL["kv_heads"], max_position_embeddings=seq_len,
                         tie_word_embeddings=False, use_cache=False)
    model = Qwen2ForCausalLM(config)
    input_ids = torch.randint(0, vocab, (2, seq_len))
    input_ids[1, :seq_len // 4] = input_ids[0, :seq_len // 4]  # one pair: both rows start with its prompt
    attention_mask = torch.ones_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    target_mask[:, seq_len // 4:] = True
    return model, input_ids, attention_mask, target_mask


def step_function(method: str, model, input_ids, attention_mask, target_mask):
    """One log-prob forward + backward of `method`; returns a callable."""
    import torch

    if method in SELPIPE_CHUNKS:
        from selpipe.pipeline.logprobs import completion_logprobs

        def step():
            completion_logprobs(model, input_ids, attention_mask, target_mask, SELPIPE_CHUNKS[method]).sum().backward()
    elif method == "selpipe_selective_head":
        from selpipe.pipeline.logprobs import selective_completion_logprobs

        selected = {}

        def lowest_40_percent(values):
            selected["mask"] = values <= torch.quantile(values, 0.4)
            return selected["mask"]

        def step():
            flat = selective_completion_logprobs(model, input_ids, attention_mask, target_mask, lowest_40_percent,
                                                 ModelConfig.logprob_chunk)
            (flat * selected["mask"]).sum().backward()
    elif method == "selpipe_prefix_sharing":
        from selpipe.pipeline.prefix import pack_shared_prompts, shared_prompt_logprobs

        prompt = input_ids.shape[1] // 4
        ids = input_ids.tolist()
        packed = pack_shared_prompts([ids[0][:prompt]], [[ids[0][prompt:], ids[1][prompt:]]]).to(input_ids.device)

        def step():
            shared_prompt_logprobs(model, packed, ModelConfig.logprob_chunk).sum().backward()
    elif method == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        labels = input_ids.masked_fill(~target_mask, -100)

        def step():
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).log_probs.sum().backward()
    else:
        def step():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            (logps * target_mask[:, 1:]).sum().backward()
    return step


def resident_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_one(method: str, vocab: int, seq_len: int) -> dict:
    """Runs in its own process: warm-up step, reset the peak, measured step."""
    import torch

    set_threads()
    model, input_ids, attention_mask, target_mask = build(vocab, seq_len)
    gpu = torch.cuda.is_available()
    if gpu:
        model = model.cuda()
        input_ids, attention_mask, target_mask = input_ids.cuda(), attention_mask.cuda(), target_mask.cuda()
    step = step_function(method, model, input_ids, attention_mask, target_mask)
    step()  # warm-up: gradients allocated, kernels and allocator caches primed
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = resident_mib("VmRSS")
    started = time.perf_counter()
    step()
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else resident_mib("VmHWM")
    return {"method": method, "vocab": vocab, "seq_len": seq_len, "peak_mib": peak, "before_mib": before,
            "step_peak_mib": peak - before, "step_seconds": seconds, "device": "cuda" if gpu else "cpu"}


def run_config(method: str, vocab: int, seq_len: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--one", method, str(vocab), str(seq_len)],
                            capture_output=True, text=True, env=thread_env())
    if result.returncode != 0:
        raise RuntimeError(f"memory worker {method} {vocab} {seq_len} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="one sequence length (a minute or two on 2 cores)")
    parser.add_argument("--full-logits-limit-gib", type=float, default=4.0,
                        help="skip full_logits where its fp32 logits alone would exceed this")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "VOCAB", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, vocab, seq_len = args.one
        print(json.dumps(measure_one(method, int(vocab), int(seq_len))))
        return

    setting = "reduced" if args.reduced else "full"
    s = SETTINGS[setting]
    started = time.perf_counter()
    rows = []
    for vocab in s["vocabs"]:
        for seq_len in s["seq_lens"]:
            measured = {}
            for method in METHODS:
                logits_gib = 2 * seq_len * vocab * 4 / 2**30
                if method == "full_logits" and logits_gib > args.full_logits_limit_gib:
                    print(f"skip full_logits vocab {vocab} seq {seq_len}: its logits alone are {logits_gib:.1f} GiB")
                    continue
                measured[method] = run_config(method, vocab, seq_len)
                print(json.dumps(measured[method]), flush=True)
            full = measured.get("full_logits")
            rows.append({
                "vocab": vocab, "seq_len": seq_len,
                **{f"{m}_step_peak_mib": r["step_peak_mib"] for m, r in measured.items()},
                **{f"{m}_step_s": r["step_seconds"] for m, r in measured.items()},
                "ratio_selpipe_over_trl": measured["selpipe"]["step_peak_mib"] / measured["trl"]["step_peak_mib"],
                "ratio_selpipe_chunk1024_over_trl":
                    measured["selpipe_chunk1024"]["step_peak_mib"] / measured["trl"]["step_peak_mib"],
                "ratio_selpipe_over_full_logits": measured["selpipe"]["step_peak_mib"] / full["step_peak_mib"] if full else None,
                **{f"time_{lever}_over_selpipe": measured[f"selpipe_{lever}"]["step_seconds"] / measured["selpipe"]["step_seconds"]
                   for lever in ("selective_head", "prefix_sharing")},
                "device": measured["selpipe"]["device"],
            })
    settings = {"setting": setting, **s, "model": MODEL, "pairs": 1, "prompt_fraction": 0.25,
                "selpipe_chunks": SELPIPE_CHUNKS, "full_logits_limit_gib": args.full_logits_limit_gib, "threads": THREADS,
                "measured": "log-prob forward + backward of one pair, peak minus memory before the step"}
    path = write_results("memory", settings, rows, started)
    print(f"model hidden {MODEL['hidden']}, {MODEL['layers']} layer, one pair (2 rows), prompt = 1/4 of each row; "
          f"{THREADS} threads")
    print_table(rows, ["vocab", "seq_len", "selpipe_step_peak_mib", "selpipe_chunk1024_step_peak_mib", "trl_step_peak_mib",
                       "full_logits_step_peak_mib", "ratio_selpipe_over_trl", "ratio_selpipe_chunk1024_over_trl",
                       "ratio_selpipe_over_full_logits", "selpipe_step_s", "trl_step_s", "full_logits_step_s"],
                "peak memory added by one log-prob forward + backward (MiB), and its time (s)")
    print_table(rows, ["vocab", "seq_len", "selpipe_step_s", "selpipe_selective_head_step_s", "selpipe_prefix_sharing_step_s",
                       "time_selective_head_over_selpipe", "time_prefix_sharing_over_selpipe",
                       "selpipe_selective_head_step_peak_mib", "selpipe_prefix_sharing_step_peak_mib"],
                "levers of issue 11 on the same step: time (s), time relative to selpipe, peak memory (MiB)")
    print(f"\nrows written to {path}")


if __name__ == "__main__":
    main()
