"""The training loop: `fit`, handed finished parts (engine, stream, evaluator, run directory).

One loop, one condition for evaluating and one for saving; the last step takes the same path
as the periodic ones (a `last_step` flag, as in nanochat), so a finished run is evaluated and
checkpointed exactly once whether it ran straight through, was resumed, or is rerun.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from selpipe.pipeline.batching import PairBatch, order_for_micro_batches
from selpipe.pipeline.config import BatchConfig, LossConfig, ScheduleConfig, TrainConfig
from selpipe.pipeline.errors import SelpipeError
from selpipe.pipeline.forward import PolicyForward
from selpipe.pipeline.logprobs import to_padded
from selpipe.pipeline.loss import SelectiveDPOOutput, selective_dpo_loss
from selpipe.pipeline.metrics import SIDES, add_sums, pair_sums, reduce_sums
from selpipe.pipeline.prefix import SharedPromptBatch
from selpipe.pipeline.stream import StreamPosition

from .run_dir import TrainState


class TrainingDiverged(SelpipeError):
    """A non-finite loss or gradient norm; the run stops before anything non-finite is saved."""


class Engine(Protocol):
    device: torch.device

    def logprobs(self, batch: PairBatch, select: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 packed: SharedPromptBatch | None = None) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def lr(self) -> float: ...
    def step(self) -> float | None: ...
    def weights_finite(self) -> bool: ...


def micro_batches(rows: list[dict[str, Any]], batching: BatchConfig, forward: PolicyForward, pad_id: int,
                  device: torch.device, weights: list[float] | None = None
                  ) -> Iterator[tuple[PairBatch, SharedPromptBatch | None]]:
    """A step's rows cut into micro batches (ordered by length first, if asked: the same pairs, less
    padding), each collated for the loss and, with prefix sharing, packed for the forward."""
    size = batching.micro_batch_size
    if batching.length_sorted_micro_batches and weights is None:
        rows = order_for_micro_batches(rows, shared_prompts=forward.prefix_sharing)
    for start in range(0, len(rows), size):
        yield forward.inputs(rows[start:start + size], pad_id, device,
                             None if weights is None else weights[start:start + size])


def forward_loss(engine: Engine, batch: PairBatch, packed: SharedPromptBatch | None, loss: LossConfig,
                 forward: PolicyForward) -> tuple[torch.Tensor, dict[str, torch.Tensor], SelectiveDPOOutput]:
    """Mean loss of the micro batch's real pairs, the sums its metrics are made of, and the loss's output."""
    flat = engine.logprobs(batch, select=forward.selector(batch), packed=packed)
    policy, _ = to_padded(flat, batch.completion_lengths)
    pairs = batch.pairs
    mask = batch.completion_mask
    out = selective_dpo_loss(policy[:pairs], policy[pairs:], batch.reference[:pairs], batch.reference[pairs:],
                             mask[:pairs], mask[pairs:], loss,
                             anchor_chosen=batch.anchor[:pairs], anchor_rejected=batch.anchor[pairs:])
    w = batch.weights
    mean = (out.losses * w).sum() / w.sum().clamp(min=1)
    halves = {"chosen": slice(None, pairs), "rejected": slice(pairs, None)}
    sums = pair_sums(
        losses=out.losses, weights=w, beta=loss.beta,
        policy={s: policy[halves[s]] for s in SIDES}, anchor={s: batch.anchor[halves[s]] for s in SIDES},
        mask={s: mask[halves[s]] for s in SIDES},
        selected={"chosen": out.chosen_selected, "rejected": out.rejected_selected},
        scores={"chosen": out.chosen_scores, "rejected": out.rejected_scores},
        threshold={"chosen": out.chosen_threshold, "rejected": out.rejected_threshold},
        loss_rewards={"chosen": out.chosen_rewards, "rejected": out.rejected_rewards}, nll=out.nll,
        tokens=batch.attention_mask.sum(),
    )
    return mean, sums, out


def _check_finite(step: int, metrics: dict[str, float], grad_norm: float | None, rows: list[dict[str, Any]]) -> None:
    """Stop on a non-finite loss or gradient norm (the values are reduced, so every rank agrees)."""
    bad = [f"loss {metrics['loss']}"] if not math.isfinite(metrics["loss"]) else []
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"gradient norm {grad_norm}")
    if bad:
        ids = ", ".join(str(r["id"]) for r in rows[:16]) + (", ..." if len(rows) > 16 else "")
        raise TrainingDiverged(f"step {step}: {' and '.join(bad)} (this rank's rows: {ids}); nothing of this step was "
                               f"saved, the last checkpoint is the resume point: lower --learning-rate or check these rows")


def _check_weights(engine: Engine, all_reduce: Callable[[torch.Tensor], None], step: int) -> None:
    """Refuse to checkpoint weights an update made non-finite (a finite loss and gradient can still
    overflow a weight at a huge learning rate); every rank takes part, so all agree."""
    bad = torch.tensor([0.0 if engine.weights_finite() else 1.0], device=engine.device)
    all_reduce(bad)
    if bad.item():
        raise TrainingDiverged(f"step {step}: the update left NaN or infinite weights; nothing of this step was saved, "
                               f"the last checkpoint is the resume point: lower --learning-rate or clip gradients")


@dataclass(frozen=True)
class StepSettings:
    """The groups one optimizer step reads: the loss, the micro batches, the forward."""

    loss: LossConfig
    batching: BatchConfig
    forward: PolicyForward

    @classmethod
    def of(cls, cfg: TrainConfig) -> StepSettings:
        return cls(cfg.loss, cfg.batch, PolicyForward.of(cfg.model, cfg.loss))


def train_step(engine: Engine, rows: list[dict[str, Any]], step: StepSettings, pad_id: int,
               all_reduce: Callable[[torch.Tensor], None]) -> tuple[dict[str, float], float, float | None]:
    """One optimizer step over a step's rows: (its reduced metrics, the learning rate it applied,
    the gradient norm DeepSpeed reports at the boundary)."""
    sums: dict[str, torch.Tensor] = {}
    count = -(-len(rows) // step.batching.micro_batch_size)
    for micro, (batch, packed) in enumerate(micro_batches(rows, step.batching, step.forward, pad_id, engine.device)):
        loss, micro_sums, _ = forward_loss(engine, batch, packed, step.loss, step.forward)
        engine.backward(loss)
        if micro == count - 1:
            lr = engine.lr()  # the rate this step applies (the scheduler moves on in step())
        grad_norm = engine.step()
        add_sums(sums, micro_sums)
    return reduce_sums(sums, all_reduce), lr, grad_norm


def _evaluate_and_save(state: TrainState, last_step: bool, schedule: ScheduleConfig, engine: Engine,
                       all_reduce: Callable[[torch.Tensor], None], log: Callable[[int, dict[str, Any]], None],
                       save: Callable[[TrainState], None], evaluate: Callable[[int], dict[str, float]] | None) -> None:
    """Evaluate and checkpoint where the schedule says, never twice at one step (a resumed run
    restarts at a step it already evaluated and saved)."""
    history = state.history
    periodic_eval = schedule.eval_every and state.step % schedule.eval_every == 0
    if evaluate is not None and (state.step == 0 or last_step or periodic_eval) and history.last_eval_step != state.step:
        # Evaluate before checkpointing, so a checkpoint at step N holds the eval of step N.
        history.last_eval, history.last_eval_step = evaluate(state.step), state.step
        if state.step == 0:
            history.first_eval = history.last_eval
        log(state.step, history.last_eval)
    periodic_save = schedule.save_every and state.step % schedule.save_every == 0
    if state.step > 0 and (last_step or periodic_save) and state.checkpoint_step != state.step:
        _check_weights(engine, all_reduce, state.step)
        save(state)


def fit(
    *,
    engine: Engine,
    all_reduce: Callable[[torch.Tensor], None],
    batches: Iterator[tuple[StreamPosition, list[dict[str, Any]]]],
    step: StepSettings,
    schedule: ScheduleConfig,
    state: TrainState,
    total_steps: int,
    pad_id: int,
    log: Callable[[int, dict[str, Any]], None],
    save: Callable[[TrainState], None],
    evaluate: Callable[[int], dict[str, float]] | None = None,
    on_step: Callable[[dict[str, Any]], None] = lambda metrics: None,
    stop: Callable[[], bool] = lambda: False,
) -> TrainState:
    """Train from `state` to `total_steps` optimizer steps; returns the final state.

    Evaluates at step 0, every `eval_every` steps and at the last step; checkpoints every
    `save_every` steps and at the last step; never twice at one step. `stop` is asked once at
    each step boundary (every rank asks: it may be a collective); when it says so, the current
    step is checkpointed (not evaluated: an uninterrupted run would not evaluate there) and the
    state returned early, so a resume continues as if nothing had happened.
    """
    while True:
        last_step = state.step == total_steps
        _evaluate_and_save(state, last_step, schedule, engine, all_reduce, log, save, evaluate)
        if last_step:
            return state
        if stop():
            if state.step > 0 and state.checkpoint_step != state.step:
                _check_weights(engine, all_reduce, state.step)
                save(state)
            return state
        started = time.perf_counter()
        position, rows = next(batches)
        metrics, lr, grad_norm = train_step(engine, rows, step, pad_id, all_reduce)
        elapsed = time.perf_counter() - started
        _check_finite(state.step + 1, metrics, grad_norm, rows)
        state.step, state.position = state.step + 1, position
        state.history.last_step_metrics = step_metrics = {
            **{k: v for k, v in metrics.items() if k not in ("pairs", "tokens")},
            "lr": lr, "grad_norm": grad_norm,
            "tokens_per_second": metrics["tokens"] / elapsed, "pairs_per_second": metrics["pairs"] / elapsed,
            "epoch": position.epoch,
        }
        if state.step % schedule.log_every == 0 or state.step == total_steps:
            log(state.step, step_metrics)
        on_step(step_metrics)
