"""One TRL `DPOTrainer` run, timed per optimizer step: live reference, or reference log-probs precomputed.

    python bench/trl_dpo_run.py --policy P --reference R --data pairs.jsonl --output OUT.json ...
        [--precompute-ref-log-probs]

The peer side of `train_throughput.py`, run in its own process as selpipe's training is. It
writes {"step_seconds": [...], "step_tokens": [...], "pairs_per_step": G, "precompute_seconds": ...}.
A step's time runs from the end of the previous step (or the start of training) to the end of
this one, so it holds everything the loop does: data loading, policy (and, live, reference)
forwards, backward, optimizer. Tokens are counted from the collated batches (prompt +
completion, both sides).

With `--precompute-ref-log-probs` (`DPOConfig(precompute_ref_log_probs=True)`), TRL runs the
reference over the whole data set inside `DPOTrainer.__init__` (summed log-probs per sequence,
`precompute_ref_batch_size` = the micro batch) and trains against those: TRL's own answer to
paying the reference once. That pass is timed apart (`precompute_seconds`), and the reference is
released before training, as it would be with no `ref_model` kept.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())


class PrecomputeTimer:
    """Times `DPOTrainer._precompute_ref_logps` (the reference pass over the data set) while active."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        self.original = original = DPOTrainer._precompute_ref_logps

        def timed(trainer, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        DPOTrainer._precompute_ref_logps = timed
        return self

    def __exit__(self, *exc) -> None:
        DPOTrainer._precompute_ref_logps = self.original


class TokenCountingCollator:
    """TRL's own collator, counting the real tokens of each micro batch it builds."""

    def __init__(self, collator) -> None:
        self.collator, self.tokens = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--global-batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--precompute-ref-log-probs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    config = DPOConfig(
        output_dir=args.work_dir, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // args.micro_batch_size, max_steps=args.steps,
        learning_rate=args.learning_rate, beta=args.beta, max_length=args.max_length,
        # Like selpipe's run: fp32 on CPU, no activation checkpointing (DPOConfig defaults to both),
        # torch AdamW, clipping at 1.0, cosine decay, no checkpoints or logging integrations.
        bf16=False, gradient_checkpointing=False, use_cpu=True, optim="adamw_torch", max_grad_norm=1.0,
        lr_scheduler_type="cosine", save_strategy="no", report_to="none", logging_steps=args.steps,
        dataloader_num_workers=0, seed=0, precompute_ref_log_probs=args.precompute_ref_log_probs,
    )
    timer = StepTimer()
    precompute = PrecomputeTimer()
    with precompute:
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[timer])
    if args.precompute_ref_log_probs:
        trainer.ref_model = reference = None  # only the precomputed log-probs are read from here on
        gc.collect()
    counter = TokenCountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()

    accumulation = config.gradient_accumulation_steps
    step_tokens = [sum(counter.tokens[i * accumulation:(i + 1) * accumulation]) for i in range(args.steps)]
    result = {
        "step_seconds": [b - a for a, b in zip(timer.marks, timer.marks[1:])],
        "step_tokens": step_tokens, "pairs_per_step": args.global_batch_size,
        "torch_threads": torch.get_num_threads(),
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
        "precompute_seconds": precompute.seconds if args.precompute_ref_log_probs else None,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
