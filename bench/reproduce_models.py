"""The models of the planted-task reproduction, trained from scratch on CPU with one tokenizer.

Three roles, all Qwen2-style causal LMs built by `data/demo.py`'s `build_model` and trained here
with plain supervised fine-tuning on correct demonstrations of the planted task
(`data/planted.py`):

- strong reference: larger, trained until it solves held-out prompts (or its step budget ends);
- weak reference: smaller and trained briefly;
- policy start: trained briefly, so it knows the response format but often gets the answer wrong,
  which is where a preference-trained policy has something to learn.

Only the completion tokens carry loss, and they are tokenized the way selpipe tokenizes a
standard row (prompt alone, completion alone plus EOS), so what the models learn is exactly what
the score cache will hold. Weights go under the run directory, never into the repository.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data.demo import build_model, build_tokenizer
from data.planted import RULES, check, completion_token_ids, corpus, generate_demonstrations

TOKENIZER_VOCAB = 384  # enough merges that every filler word and every letter is one token


@dataclass(frozen=True)
class ModelSpec:
    """Size and supervised-training budget of one model role."""

    name: str
    layers: int
    hidden_size: int
    heads: int
    intermediate_size: int
    max_steps: int
    learning_rate: float = 1e-3
    batch_size: int = 32
    eval_every: int = 250
    target_accuracy: float = 1.0  # stop early once greedy task accuracy reaches this
    seed: int = 0


def build_task_tokenizer(out: Path):
    from transformers import AutoTokenizer

    if (out / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(out)
    return build_tokenizer(out, corpus(), vocab_size=TOKENIZER_VOCAB)


def encode_demonstration(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, labels): prompt then completion, loss on the completion only."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids, _ = completion_token_ids(tokenizer, response)
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(target)
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


@torch.no_grad()
def greedy_responses(model: Any, tokenizer: Any, prompts: list[str], batch_size: int = 128, max_new_tokens: int = 40) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), special tokens stripped."""
    model.eval()
    tokenizer.padding_side = "left"
    responses = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=True)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        responses += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return responses


def task_accuracy_by_rule(model: Any, tokenizer: Any, prompts: list[str]) -> dict[str, float]:
    """Fraction of prompts whose greedy response `data.planted.check` accepts: overall ("all") and per rule.

    Per rule because the rules differ in difficulty, and an overall number can hide a policy
    that has mastered one rule and not learnt the other.
    """
    correct = [check(p, r) for p, r in zip(prompts, greedy_responses(model, tokenizer, prompts))]
    accuracy = {"all": sum(correct) / len(prompts)}
    for rule in RULES:
        mine = [ok for p, ok in zip(prompts, correct) if p.startswith(f"{rule} :")]
        accuracy[rule] = sum(mine) / len(mine) if mine else float("nan")
    return accuracy


def task_accuracy(model: Any, tokenizer: Any, prompts: list[str]) -> float:
    return task_accuracy_by_rule(model, tokenizer, prompts)["all"]


def train_model(spec: ModelSpec, tokenizer: Any, out: Path, demos: list[tuple[str, str]], eval_prompts: list[str]) -> dict[str, Any]:
    """Build `spec` from random weights, fine-tune it on `demos`, save it to `out`; returns its record.

    Reuses a model already saved there with the same spec (the run directory is a cache).
    """
    record_path = out / "training.json"
    if record_path.exists() and json.loads(record_path.read_text())["spec"] == asdict(spec):
        return json.loads(record_path.read_text())
    from transformers import AutoModelForCausalLM

    build_model(out, tokenizer, hidden_size=spec.hidden_size, layers=spec.layers, heads=spec.heads,
                kv_heads=spec.heads, intermediate_size=spec.intermediate_size, seed=spec.seed)
    model = AutoModelForCausalLM.from_pretrained(out)
    encoded = [encode_demonstration(tokenizer, p, r) for p, r in demos]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    warmup = max(1, spec.max_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    started, history, step = time.perf_counter(), [], 0
    while step < spec.max_steps:
        model.train()
        batch = _collate(rng.sample(encoded, spec.batch_size), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % spec.eval_every == 0 or step == spec.max_steps:
            accuracy = task_accuracy(model, tokenizer, eval_prompts)
            history.append({"step": step, "loss": round(loss.item(), 4), "task_accuracy": accuracy})
            if accuracy >= spec.target_accuracy:
                break
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"spec": asdict(spec), "steps": step, "seconds": round(time.perf_counter() - started, 1),
              "parameters": sum(p.numel() for p in model.parameters()), "history": history,
              "task_accuracy": history[-1]["task_accuracy"]}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def train_models(models_dir: Path, specs: list[ModelSpec], demo_count: int, eval_prompts: list[str], seed: int) -> dict[str, dict[str, Any]]:
    """The tokenizer and every model of `specs`, each under `models_dir/<name>`."""
    tokenizer = build_task_tokenizer(models_dir / "tokenizer")
    demos = generate_demonstrations(demo_count, seed)
    return {spec.name: train_model(spec, tokenizer, models_dir / spec.name, demos, eval_prompts) for spec in specs}
