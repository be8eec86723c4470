"""`run_train(cfg)`: set up the parts, `fit`, finish. Reads top to bottom as what a run does."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.cache import TrainingCaches, cache_identity, open_training_caches
from selpipe.pipeline.config import TrainConfig, to_dict
from selpipe.pipeline.errors import ConfigError, first_line, storage_errors
from selpipe.pipeline.stream import CacheStream
from selpipe.pipeline.tokenization import load_tokenizer, pad_id, tokenizer_fingerprint

from .engine import (
    Comm, TrainEngine, abandon, build_engine, compute_dtype, deepspeed_config, four_bit_config, gathered_state,
    load_policy, save_pretrained, teardown,
)
from .export import merge_adapter
from .evaluate import Evaluator
from .loop import StepSettings, fit
from .run_dir import RunDirectory, TrainState, check_output


def policy_vocab_size(policy: str, tokenizer: Any) -> int:
    """The policy's vocabulary size, read from its config before any weight loads; it must cover the tokenizer."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(policy)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--policy {policy}: cannot read the model's config ({first_line(err)[:300]}); give a local model "
                          f"directory") from None
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < len(tokenizer):
        raise ConfigError(f"--policy {policy}: the model's vocabulary ({vocab}) is smaller than its tokenizer's "
                          f"({len(tokenizer)}); resize the model's embeddings or use the tokenizer it was trained with")
    return vocab


@dataclass
class Setup:
    comm: Comm
    run: RunDirectory
    tokenizer: Any
    caches: TrainingCaches
    ds_config: dict[str, Any]
    stream: CacheStream
    total_steps: int
    identity: dict[str, str | None]
    cache_check_seconds: float


def setup(cfg: TrainConfig, comm: Comm) -> Setup:
    """Checks of the settings, the output and every cache, before anything is written; then the claim.
    (A model that cannot load is refused after the claim: the run directory then holds only its
    marker, and a corrected rerun into it is accepted.)"""
    check_output(cfg)
    ds_config = deepspeed_config(cfg, comm.world_size)
    if cfg.model.load_in_4bit:
        four_bit_config(zero3=ds_config["zero_optimization"].get("stage") == 3)  # refuses where it cannot run
    run = RunDirectory(cfg.io.output, comm.rank)
    if not cfg.io.resume and run.latest_checkpoint() is not None:
        raise ConfigError(f"--output {cfg.io.output} already holds a run; pass --resume to continue it or choose a new --output")
    tokenizer = load_tokenizer(cfg.io.policy)
    vocab = policy_vocab_size(cfg.io.policy, tokenizer)
    started = time.perf_counter()
    caches = open_training_caches(cfg.io.cache, cfg.io.anchor_scores, cfg.io.eval_cache, tokenizer_fingerprint(tokenizer), vocab)
    cache_check_seconds = time.perf_counter() - started
    train_dtype = str(compute_dtype(ds_config)).removeprefix("torch.")
    if comm.rank == 0 and caches.train["reference"]["dtype"] != train_dtype:
        # At step 0 p - r is then precision noise, and top-k picks its extremes: a biased margin.
        warnings.warn(f"the cache was scored in {caches.train['reference']['dtype']} but the policy trains in "
                      f"{train_dtype}; alignment scores start as precision noise. Score in the training precision.")
    stream = CacheStream(cfg.io.cache, caches.train, rank=comm.rank, world_size=comm.world_size,
                         global_batch_size=cfg.batch.global_batch_size, seed=cfg.batch.seed, shuffle_window=cfg.batch.shuffle_window,
                         anchor=(cfg.io.anchor_scores, caches.anchor) if caches.anchor else None,
                         length_bucketing=cfg.batch.length_bucketing)
    # Content digests: a resume must see the same scores (and evaluate on the same rows) as the run it continues.
    identity = {name: manifest and cache_identity(manifest) for name, manifest in
                (("cache", caches.train), ("anchor_scores", caches.anchor), ("eval_cache", caches.eval))}
    # Every rank has checked the output before rank 0 marks it as a run.
    comm.barrier()
    run.claim()
    return Setup(comm, run, tokenizer, caches, ds_config, stream, cfg.schedule.max_steps or cfg.schedule.epochs * stream.batches_per_epoch,
                 identity, cache_check_seconds)


@dataclass
class Policy:
    """The model being trained: the causal LM, its PEFT wrapper with LoRA, and its tokenizer."""

    model: Any
    peft_model: Any
    tokenizer: Any

    def save(self, engine: TrainEngine, rank: int, directory: Path) -> None:
        """`save_pretrained` into `directory` (every rank calls it: under ZeRO-3 the weights are gathered)."""
        state = gathered_state(engine, rank)
        if rank == 0:
            save_pretrained(self.model, self.peft_model, self.tokenizer, state, directory)


def run_train(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train; returns the run's summary on rank 0 (None on the other ranks, which have nothing to add)."""
    comm = Comm()
    rank = comm.rank
    engine: TrainEngine | None = None
    try:
        with storage_errors("write the run directory", cfg.io.output):
            parts = setup(cfg, comm)
            torch.manual_seed(cfg.batch.seed)
            # The longest row prefix sharing packs: a prompt and two responses within the cache's limit each.
            max_length = parts.caches.train["tokenization"].get("max_length")
            model, peft_model, zero3_context = load_policy(cfg, parts.ds_config, 2 * max_length if max_length else None)
            engine = build_engine(cfg, model, parts.ds_config, parts.total_steps)
            summary = _train(cfg, parts, engine, Policy(model, peft_model, parts.tokenizer))
    except BaseException:
        # No barrier here: another rank may never reach one.
        abandon(engine, comm)
        raise
    teardown(engine, comm)
    del zero3_context  # merging below loads the base whole, outside ZeRO-3's partitioned construction
    if cfg.io.merge_adapter and rank == 0 and summary["model_saved"]:
        merged = Path(cfg.io.output) / "model-merged"
        with storage_errors("write the merged model", merged):
            merge_adapter(cfg.io.policy, Path(cfg.io.output) / "model", merged)
    return summary if rank == 0 else None


def _train(cfg: TrainConfig, parts: Setup, engine: TrainEngine, policy: Policy) -> dict[str, Any]:
    from tqdm import tqdm

    comm, run = parts.comm, parts.run
    if cfg.io.resume and run.latest_checkpoint():
        state = run.load_checkpoint(engine, comm, cfg, parts.identity)
        resumed_from: int | None = state.step
    else:
        if cfg.io.resume and comm.rank == 0:
            print(f"--resume: no checkpoint in {run.checkpoints}, starting fresh", flush=True)
        state, resumed_from = TrainState(), None
    resolved = {"train": to_dict(cfg), "deepspeed": parts.ds_config, "world_size": comm.world_size,
                "total_steps": parts.total_steps, "cache_rows": parts.stream.total_rows}
    run.write_json("config.json", resolved)
    run.open_logs(resumed_from, cfg.io.trackers(), resolved)
    padding = pad_id(parts.tokenizer)
    evaluator = (Evaluator(cfg.io.eval_cache, parts.caches.eval, engine, comm.all_reduce, comm.rank, comm.world_size, cfg,
                           padding) if parts.caches.eval else None)
    first_step = state.step
    bar = tqdm(total=parts.total_steps, initial=state.step, desc="train", disable=not (cfg.io.progress and comm.rank == 0),
               dynamic_ncols=True)

    def on_step(metrics: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.4f}",
                        pairs_s=f"{metrics['pairs_per_second']:.1f}")

    def hf_copy(directory: Path) -> None:
        policy.save(engine, comm.rank, directory / "hf")

    hf_copy = hf_copy if cfg.io.save_hf_checkpoints else None
    started = time.perf_counter()
    try:
        state = fit(engine=engine, all_reduce=comm.all_reduce, batches=parts.stream.batches(state.position),
                    step=StepSettings.of(cfg), schedule=cfg.schedule,
                    state=state, total_steps=parts.total_steps, pad_id=padding, log=run.log,
                    save=lambda s: run.save_checkpoint(engine, comm, s, cfg, parts.identity, also=hf_copy),
                    evaluate=evaluator,
                    on_step=on_step)
    finally:
        bar.close()
        run.close()
    elapsed = time.perf_counter() - started
    # A rerun of a finished run trains nothing; its model is already there, unless the kill came before it was.
    # Rank 0 decides for all: under ZeRO-3 the save is a collective gather.
    model_dir = Path(cfg.io.output) / "model"
    model_saved = cfg.io.save_model and comm.agreed(state.step > first_step or not model_dir.exists(), engine.device)
    if model_saved:
        policy.save(engine, comm.rank, model_dir)
    history = state.history
    summary = {
        "output": cfg.io.output, "steps": state.step, "steps_this_run": state.step - first_step,
        "world_size": comm.world_size, "seconds": round(elapsed, 2),
        "cache_check_seconds": round(parts.cache_check_seconds, 3), "model_saved": model_saved,
        "final": history.last_step_metrics or {},
    }
    if history.first_eval is not None:
        summary["eval_before"] = history.first_eval
    if history.last_eval is not None:
        summary["eval_after"] = history.last_eval
    run.write_json("summary.json", summary)
    return summary
