"""The practical ceiling of `selpipe train`: its math in a bare torch loop, timed per optimizer step.

    python bench/torch_loop_run.py --policy P --cache C --output OUT.json ... [--length-sorted-micro-batches]
        [--selective-head] [--prefix-sharing]

Same rows (the score cache, read whole into memory and shuffled once), same micro and global
batches, same math (`collate_pairs`, policy log-probs at completion positions in chunks,
`selective_dpo_loss` averaged per micro batch and summed over the step, clipping at 1.0,
torch AdamW with a cosine decay), fp32, one process. What it leaves out is everything the
trainer adds around the math: DeepSpeed, the stream, metrics, logging, checkpoints. The
gap between it and `selpipe train` is therefore the trainer's overhead.

The three levers run here from the pure functions, as `selpipe train` runs them under its flags:
`--length-sorted-micro-batches` (`order_for_micro_batches`), `--selective-head`
(`selective_completion_logprobs` with `top_k_selector`), `--prefix-sharing` (`pack_pairs` +
`shared_prompt_logprobs`). Writes {"step_seconds", "step_tokens", "pairs_per_step", ...} as
`trl_dpo_run.py` does; a step is timed from the end of the previous one (collation included).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from selpipe.pipeline.batching import collate_pairs, order_for_micro_batches, top_k_selector
from selpipe.pipeline.cache import load_manifest, read_rows
from selpipe.pipeline.logprobs import completion_logprobs, selective_completion_logprobs, to_padded
from selpipe.pipeline.config import LossConfig
from selpipe.pipeline.loss import selective_dpo_loss
from selpipe.pipeline.prefix import pack_pairs, shared_prompt_logprobs


def policy_logprobs(model, rows, batch, args) -> torch.Tensor:
    """Flat completion log-probs of the micro batch, by the path the levers pick."""
    select = top_k_selector(batch, args.top_k) if args.selective_head else None
    if args.prefix_sharing:
        return shared_prompt_logprobs(model, pack_pairs(rows), args.logprob_chunk, select=select)
    inputs = (model, batch.input_ids, batch.attention_mask, batch.target_mask)
    if select is not None:
        return selective_completion_logprobs(*inputs, select=select, chunk_size=args.logprob_chunk)
    return completion_logprobs(*inputs, chunk_size=args.logprob_chunk)


def micro_batch_loss(model, rows, args) -> torch.Tensor:
    batch = collate_pairs(rows)
    policy, mask = to_padded(policy_logprobs(model, rows, batch, args), batch.completion_lengths)
    b = batch.pairs
    out = selective_dpo_loss(policy[:b], policy[b:], batch.reference[:b], batch.reference[b:], mask[:b], mask[b:],
                             LossConfig(top_k=args.top_k, beta=args.beta))
    return out.losses.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--policy", "--cache", "--output"):
        parser.add_argument(name, required=True)
    for name in ("--micro-batch-size", "--global-batch-size", "--steps", "--threads"):
        parser.add_argument(name, type=int, required=True)
    for name in ("--learning-rate", "--beta", "--top-k"):
        parser.add_argument(name, type=float, required=True)
    parser.add_argument("--logprob-chunk", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    for lever in ("--length-sorted-micro-batches", "--selective-head", "--prefix-sharing"):
        parser.add_argument(lever, action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    rows = list(read_rows(args.cache, load_manifest(args.cache)))
    random.Random(args.seed).shuffle(rows)
    size, accumulation = args.micro_batch_size, args.global_batch_size // args.micro_batch_size
    if args.steps * args.global_batch_size > len(rows):
        raise SystemExit(f"{args.steps} steps of {args.global_batch_size} pairs need {args.steps * args.global_batch_size} "
                         f"rows; the cache holds {len(rows)}")

    marks, step_tokens = [time.perf_counter()], []
    for step in range(args.steps):
        step_rows = rows[step * args.global_batch_size:(step + 1) * args.global_batch_size]
        if args.length_sorted_micro_batches:
            step_rows = order_for_micro_batches(step_rows, shared_prompts=args.prefix_sharing)
        for start in range(0, len(step_rows), size):
            (micro_batch_loss(model, step_rows[start:start + size], args) / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        # Tokens as selpipe counts them (both sequences of each pair, prompt included), whatever the path.
        step_tokens.append(sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in step_rows))

    levers = {name: getattr(args, name) for name in ("length_sorted_micro_batches", "selective_head", "prefix_sharing")}
    Path(args.output).write_text(json.dumps({
        "step_seconds": [b - a for a, b in zip(marks, marks[1:])], "step_tokens": step_tokens,
        "pairs_per_step": args.global_batch_size, "torch_threads": torch.get_num_threads(), "levers": levers,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
