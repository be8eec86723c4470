"""`run_train(cfg)`: setup, fit, finish. Reads top to bottom as what a run does."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.cache import TrainingCaches, cache_identity, open_training_caches
from selpipe.pipeline.config import TrainConfig, to_dict
from selpipe.pipeline.errors import ConfigError, storage_errors
from selpipe.pipeline.model import load_model_config
from selpipe.pipeline.stream import CacheStream
from selpipe.pipeline.tokenization import load_tokenizer, pad_id, tokenizer_fingerprint

from .engine import (
    Comm, TrainEngine, abandon, build_engine, compute_dtype, deepspeed_config, four_bit_config, load_policy, teardown,
    weight_shapes,
)
from .evaluate import Evaluator
from .loop import StepSettings, fit
from .model_io import gathered_state, merge_adapter, save_pretrained
from .preemption import Preempted, StopRequests, preempted_message
from .run_dir import RunDirectory, TrainState, check_output


def policy_vocab_size(policy: str, tokenizer: Any) -> int:
    """The policy's vocabulary size, read from its config before any weight loads; it must cover the tokenizer."""
    config = load_model_config(policy, "--policy")
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


def open_caches(cfg: TrainConfig, comm: Comm, tokenizer: Any, vocab: int) -> tuple[TrainingCaches, float]:
    """Rank 0 checks every cache end to end; the other ranks get its verdict (the same one-line
    error) and its manifests as JSON, so no rank but rank 0 reads a cache byte at start-up."""
    started = time.perf_counter()
    caches = open_training_caches(cfg.io.cache, cfg.io.anchor_scores, cfg.io.eval_cache, tokenizer_fingerprint(tokenizer),
                                  vocab, rank=comm.rank, broadcast=comm.broadcast_text)
    return caches, time.perf_counter() - started


def setup(cfg: TrainConfig, comm: Comm, held: ExitStack) -> Setup:
    """Checks of the settings, the output and every cache, before anything is written; then the claim.
    Rank 0 holds the run directory's lease from here to the end (`held` releases it).
    (A model that cannot load is refused after the claim: the run directory then holds only its
    marker, and a corrected rerun into it is accepted.)"""
    check_output(cfg)
    ds_config = deepspeed_config(cfg, comm.world_size)
    if cfg.model.load_in_4bit:
        four_bit_config(zero3=ds_config["zero_optimization"].get("stage") == 3)  # refuses where it cannot run
    run = RunDirectory(cfg.io.output, comm.rank)
    lease = comm.on_rank_zero(lambda: run.take(cfg.io.resume))
    if lease is not None:
        held.callback(lease.release)
    tokenizer = load_tokenizer(cfg.io.policy)
    caches, cache_check_seconds = open_caches(cfg, comm, tokenizer, policy_vocab_size(cfg.io.policy, tokenizer))
    train_dtype = str(compute_dtype(ds_config)).removeprefix("torch.")
    if comm.rank == 0 and caches.train["reference"]["dtype"] != train_dtype:
        # At step 0 p - r is then precision noise, and top-k picks its extremes: a biased margin.
        warnings.warn(f"the cache was scored in {caches.train['reference']['dtype']} but the policy trains in "
                      f"{train_dtype}; alignment scores start as precision noise. Score in the training precision.")
    stream = CacheStream(cfg.io.cache, caches.train, rank=comm.rank, world_size=comm.world_size,
                         global_batch_size=cfg.batch.global_batch_size, seed=cfg.batch.seed,
                         shuffle_window=cfg.batch.shuffle_window,
                         anchor=(cfg.io.anchor_scores, caches.anchor) if caches.anchor else None,
                         length_bucketing=cfg.batch.length_bucketing,
                         row_groups=caches.row_groups["train"])  # from the checked bytes: no rank re-reads footers
    # Content digests: a resume must see the same scores (and evaluate on the same rows) as the run it continues.
    identity = {name: manifest and cache_identity(manifest) for name, manifest in
                (("cache", caches.train), ("anchor_scores", caches.anchor), ("eval_cache", caches.eval))}
    # Every rank has checked the output before rank 0 marks it as a run.
    comm.barrier()
    run.claim()
    total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * stream.batches_per_epoch
    return Setup(comm, run, tokenizer, caches, ds_config, stream, total_steps, identity, cache_check_seconds)


@dataclass
class Policy:
    """The model being trained: the causal LM, its PEFT wrapper with LoRA, its tokenizer, and the
    ZeRO-3 context it was built in (kept alive while the engine runs)."""

    model: Any
    peft_model: Any
    tokenizer: Any
    zero3: Any

    def save(self, engine: TrainEngine, rank: int, directory: Path) -> None:
        """`save_pretrained` into `directory` (every rank calls it: under ZeRO-3 the weights are gathered)."""
        state = gathered_state(engine.ds, rank)
        if rank == 0:
            save_pretrained(self.model, self.peft_model, self.tokenizer, state, directory)


def start(cfg: TrainConfig, parts: Setup) -> tuple[TrainEngine, Policy]:
    """The policy loaded and handed to DeepSpeed."""
    torch.manual_seed(cfg.batch.seed)
    # The longest row prefix sharing packs: a prompt and two responses within the cache's limit each.
    max_length = parts.caches.train["tokenization"].get("max_length")
    model, peft_model, zero3 = load_policy(cfg, parts.ds_config, 2 * max_length if max_length else None)
    parts.identity["policy"] = weight_shapes(model)  # a resume refuses a policy of another size
    engine = build_engine(cfg, model, parts.ds_config, parts.total_steps)
    return engine, Policy(model, peft_model, parts.tokenizer, zero3)


def run_train(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train; returns the run's summary on rank 0 (None on the other ranks, which have nothing to add).
    A stop signal ends it with `Preempted` after a checkpoint of the step reached (see preemption.py)."""
    comm = Comm()
    engine: TrainEngine | None = None
    with ExitStack() as held:  # the run directory's lease, released when everything is written
        try:
            with storage_errors("write the run directory", cfg.io.output):
                parts = setup(cfg, comm, held)
                engine, policy = start(cfg, parts)
                state, first_step, seconds = train(cfg, parts, engine, policy)
                return finish(cfg, parts, engine, policy, state, first_step, seconds)
        except BaseException:
            # No barrier here: another rank may never reach one. (Nothing to release after a teardown.)
            abandon(engine, comm)
            raise


def resume_state(cfg: TrainConfig, parts: Setup, engine: TrainEngine) -> tuple[TrainState, int | None]:
    """(where training starts, the checkpoint's step or None on a fresh start)."""
    comm, run = parts.comm, parts.run
    if cfg.io.resume and run.latest_checkpoint():
        state = run.load_checkpoint(engine, comm, cfg, parts.identity)
        return state, state.step
    if cfg.io.resume and comm.rank == 0:
        print(f"--resume: no checkpoint in {run.checkpoints}, starting fresh", flush=True)
    return TrainState(), None


@contextmanager
def progress(cfg: TrainConfig, rank: int, total: int, initial: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """The progress bar (rank 0, --progress) as `fit`'s `on_step`."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="train", disable=not (cfg.io.progress and rank == 0),
               dynamic_ncols=True)

    def on_step(metrics: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.4f}",
                        pairs_s=f"{metrics['pairs_per_second']:.1f}")

    try:
        yield on_step
    finally:
        bar.close()


def checkpoint_saver(cfg: TrainConfig, parts: Setup, engine: TrainEngine, policy: Policy) -> Callable[[TrainState], None]:
    """`fit`'s `save`: a DeepSpeed checkpoint, with --save-hf-checkpoints a Hugging Face copy beside it."""
    comm = parts.comm

    def hf_copy(directory: Path) -> None:
        policy.save(engine, comm.rank, directory / "hf")

    also = hf_copy if cfg.io.save_hf_checkpoints else None
    return lambda state: parts.run.save_checkpoint(engine, comm, state, cfg, parts.identity, also=also)


def train(cfg: TrainConfig, parts: Setup, engine: TrainEngine, policy: Policy) -> tuple[TrainState, int, float]:
    """Resume or start, then `fit` to the last step; returns (the final state, the step this run
    started at, seconds spent fitting). A stop signal raises `Preempted` once its step is saved."""
    comm, run = parts.comm, parts.run
    state, resumed_from = resume_state(cfg, parts, engine)
    resolved = {"train": to_dict(cfg), "deepspeed": parts.ds_config, "world_size": comm.world_size,
                "total_steps": parts.total_steps, "cache_rows": parts.stream.total_rows}
    run.write_json("config.json", resolved)
    run.open_logs(resumed_from, cfg.io.trackers(), resolved)
    padding = pad_id(parts.tokenizer)
    evaluator = (Evaluator(cfg.io.eval_cache, parts.caches.eval, engine, comm.all_reduce, comm.rank, comm.world_size,
                           cfg, padding) if parts.caches.eval else None)
    first_step, started = state.step, time.perf_counter()
    with progress(cfg, comm.rank, parts.total_steps, state.step) as on_step, \
            StopRequests(comm.all_reduce, engine.device) as stop:
        try:
            state = fit(engine=engine, all_reduce=comm.all_reduce, batches=parts.stream.batches(state.position),
                        step=StepSettings.of(cfg), schedule=cfg.schedule, state=state, total_steps=parts.total_steps,
                        pad_id=padding, log=run.log, save=checkpoint_saver(cfg, parts, engine, policy),
                        evaluate=evaluator, on_step=on_step, stop=stop.agreed)
        finally:
            run.close()
    if state.step < parts.total_steps:
        # Every rank stopped at this step and saved it: leave in order, as after a finished run.
        teardown(engine, comm)
        raise Preempted(preempted_message(stop.describe(), state.step, cfg.io.output))
    return state, first_step, time.perf_counter() - started


def finish(cfg: TrainConfig, parts: Setup, engine: TrainEngine, policy: Policy, state: TrainState, first_step: int,
           seconds: float) -> dict[str, Any] | None:
    """Save the model, write the summary, tear the engine down, merge the adapter (--merge-adapter)."""
    comm = parts.comm
    # A rerun of a finished run trains nothing; its model is already there, unless the kill came before it was.
    # Rank 0 decides for all: under ZeRO-3 the save is a collective gather.
    model_dir = Path(cfg.io.output) / "model"
    model_saved = cfg.io.save_model and comm.agreed(state.step > first_step or not model_dir.exists(), engine.device)
    if model_saved:
        policy.save(engine, comm.rank, model_dir)
    history = state.history
    summary = {
        "output": cfg.io.output, "steps": state.step, "steps_this_run": state.step - first_step,
        "world_size": comm.world_size, "seconds": round(seconds, 2),
        "cache_check_seconds": round(parts.cache_check_seconds, 3), "model_saved": model_saved,
        "final": history.last_step_metrics or {},
    }
    if history.first_eval is not None:
        summary["eval_before"] = history.first_eval
    if history.last_eval is not None:
        summary["eval_after"] = history.last_eval
    parts.run.write_json("summary.json", summary)
    teardown(engine, comm)
    policy.zero3 = None  # merging loads the base whole, outside ZeRO-3's partitioned construction
    if cfg.io.merge_adapter and comm.rank == 0 and model_saved:
        merged = Path(cfg.io.output) / "model-merged"
        with storage_errors("write the merged model", merged):
            merge_adapter(cfg.io.policy, model_dir, merged)
    return summary if comm.rank == 0 else None
