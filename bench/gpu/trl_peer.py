"""TRL's DPOTrainer as the GPU proof's peer: its loss on a set of pairs, or a timed training run.

    python bench/gpu/trl_peer.py loss  --policy P --reference R --data PAIRS.jsonl --cache CACHE --output OUT.json ...
    python bench/gpu/trl_peer.py train --policy P --reference R --data PAIRS.jsonl --output OUT.json [--precompute] ...

Both build `DPOTrainer(policy, ref_model=reference)` with the models loaded in the run's
precision (bf16 weights with `bf16=True` on a GPU, fp32 on the CPU), gradient checkpointing off,
torch AdamW, sigmoid loss, TRL's own tokenization of the same strings selpipe's stage one read.

- `loss`: TRL's `_compute_loss` (no gradient, eval mode) on every pair, averaged over pairs, and
  a check that TRL tokenized each pair to exactly the ids in selpipe's cache `CACHE`.
- `train`: `trainer.train()` for `--steps` optimizer steps, timed per step as
  bench/trl_dpo_run.py times them (its `StepTimer` and token-counting collator); with
  `--precompute`, `precompute_ref_log_probs=True` (the reference runs once, before training, in
  the trainer's construction, timed apart as `setup_s`; a reference that is the policy itself is
  passed as `ref_model=None`, TRL's idiom, so no second model is kept). Writes the step times and tokens, the
  logged losses and the process's peak memory: `torch.cuda.max_memory_allocated` on a GPU, the
  resident high-water mark on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # bench/ (this folder is already first: the script's own)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peak_rss import peak_rss_mib  # noqa: E402  (bench/peak_rss.py)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl_dpo_run import StepTimer, TokenCountingCollator  # noqa: E402  (bench/trl_dpo_run.py)


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def build_trainer(args: argparse.Namespace, *, steps: int, accumulation: int, precompute: bool,
                  callbacks: list) -> DPOTrainer:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    # A reference that is the policy's own initial weights, precomputed: TRL's idiom is no ref_model
    # (it precomputes with the policy before training and keeps no second model in memory).
    same = precompute and Path(args.reference).resolve() == Path(args.policy).resolve()
    reference = None if same else AutoModelForCausalLM.from_pretrained(args.reference, dtype=dtype)
    rows = read_pairs(args.data)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = DPOConfig(
        output_dir=str(args.work_dir), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=args.learning_rate,
        beta=args.beta, max_length=args.max_length, precompute_ref_log_probs=precompute,
        # As selpipe trains: the run's precision, no activation checkpointing (DPOConfig turns it on by
        # default), torch AdamW, clipping at 1.0, cosine decay; no checkpoints or logging integrations.
        bf16=args.precision == "bf16", gradient_checkpointing=False, use_cpu=args.device == "cpu",
        optim="adamw_torch", max_grad_norm=1.0, lr_scheduler_type="cosine", save_strategy="no",
        report_to="none", logging_steps=1, dataloader_num_workers=0, seed=0,
    )
    return DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                      processing_class=AutoTokenizer.from_pretrained(args.policy), callbacks=callbacks)


def cache_rows(cache: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    return {row["id"]: row for part in sorted(cache.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()}


def loss(args: argparse.Namespace) -> dict:
    """TRL's sigmoid DPO loss on every pair, before any update."""
    trainer = build_trainer(args, steps=1, accumulation=1, precompute=False, callbacks=[])
    scored = cache_rows(args.cache)
    mismatched = [row["id"] for row, tokenized in zip(read_pairs(args.data), trainer.train_dataset, strict=True)
                  if [tokenized[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
                  != [scored[row["id"]][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]]
    trainer.model.eval()
    total, pairs = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():
            size = batch["input_ids"].shape[0] // 2  # rows are [chosen..., rejected...]
            total += trainer._compute_loss(trainer.model, batch, return_outputs=False).item() * size
            pairs += size
    return {"loss": total / pairs, "pairs": pairs, "tokenization_mismatches": mismatched}


def train(args: argparse.Namespace) -> dict:
    accumulation = args.global_batch_size // args.micro_batch_size
    timer = StepTimer()
    started = time.perf_counter()
    trainer = build_trainer(args, steps=args.steps, accumulation=accumulation, precompute=args.precompute,
                            callbacks=[timer])
    setup = time.perf_counter() - started
    counter = TokenCountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    gpu = torch.cuda.is_available() and args.device != "cpu"
    return {
        "step_seconds": [b - a for a, b in zip(timer.marks, timer.marks[1:])],
        "step_tokens": [sum(counter.tokens[i * accumulation:(i + 1) * accumulation]) for i in range(args.steps)],
        "pairs_per_step": args.global_batch_size, "setup_s": setup,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss_mib(),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if gpu else "peak RSS (VmHWM)",
        "precompute_ref_log_probs": args.precompute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("loss", "train"))
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--precision", choices=("bf16", "fp32"), required=True)
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--cache", type=Path, help="loss: the selpipe cache of the same pairs, to compare token ids")
    parser.add_argument("--global-batch-size", type=int, help="train: pairs per optimizer step")
    parser.add_argument("--steps", type=int, help="train: optimizer steps")
    parser.add_argument("--precompute", action="store_true", help="train: precompute_ref_log_probs=True")
    args = parser.parse_args()
    result = loss(args) if args.mode == "loss" else train(args)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
