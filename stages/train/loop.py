"""The training loop: `fit`, handed finished parts (engine, stream, evaluator, run directory).

One loop, one condition for evaluating and one for saving; the last step takes the same path
as the periodic ones (a `last_step` flag, as in nanochat), so a finished run is evaluated and
checkpointed exactly once whether it ran straight through, was resumed, or is rerun.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from selpipe.pipeline.batching import PairBatch, collate_pairs, order_for_micro_batches, top_k_selector
from selpipe.pipeline.config import TrainConfig
from selpipe.pipeline.errors import SelpipeError
from selpipe.pipeline.logprobs import to_padded
from selpipe.pipeline.loss import SelectiveDPOOutput, selective_dpo_loss
from selpipe.pipeline.metrics import SIDES, add_sums, pair_sums, reduce_sums
from selpipe.pipeline.prefix import SharedPromptBatch, pack_pairs
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


def micro_batches(rows: list[dict[str, Any]], cfg: TrainConfig, pad_id: int, device: torch.device,
                  weights: list[float] | None = None) -> Iterator[tuple[PairBatch, SharedPromptBatch | None]]:
    """A step's rows cut into micro batches (ordered by length first, if asked: the same pairs, less
    padding), each collated for the loss and, with prefix sharing, packed for the forward."""
    size = cfg.micro_batch_size
    if cfg.length_sorted_micro_batches and weights is None:
        rows = order_for_micro_batches(rows, shared_prompts=cfg.prefix_sharing)
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        batch = collate_pairs(chunk, pad_id, None if weights is None else weights[start:start + size]).to(device)
        packed = pack_pairs(chunk, pad_id).to(device) if cfg.prefix_sharing else None
        yield batch, packed


def forward_loss(engine: Engine, batch: PairBatch, cfg: TrainConfig, packed: SharedPromptBatch | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], SelectiveDPOOutput]:
    """Mean loss of the micro batch's real pairs, the sums its metrics are made of, and the loss's output."""
    select = None
    if cfg.selective_head and cfg.top_k < 1 and torch.is_grad_enabled():
        # The head's gradient only where the loss has one: the selected tokens (every chosen token
        # when an RPO term averages over all of them).
        select = top_k_selector(batch, cfg.top_k, all_chosen=cfg.rpo_alpha > 0 and cfg.rpo_tokens == "all")
    policy, _ = to_padded(engine.logprobs(batch, select=select, packed=packed), batch.completion_lengths)
    pairs = batch.pairs
    mask = batch.completion_mask
    out = selective_dpo_loss(
        policy[:pairs], policy[pairs:], batch.reference[:pairs], batch.reference[pairs:], mask[:pairs], mask[pairs:],
        top_k=cfg.top_k, beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type,
        simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha, rpo_tokens=cfg.rpo_tokens,
        anchor_chosen=batch.anchor[:pairs], anchor_rejected=batch.anchor[pairs:],
    )
    w = batch.weights
    loss = (out.losses * w).sum() / w.sum().clamp(min=1)
    halves = {"chosen": slice(None, pairs), "rejected": slice(pairs, None)}
    sums = pair_sums(
        losses=out.losses, weights=w, beta=cfg.beta,
        policy={s: policy[halves[s]] for s in SIDES}, anchor={s: batch.anchor[halves[s]] for s in SIDES},
        mask={s: mask[halves[s]] for s in SIDES},
        selected={"chosen": out.chosen_selected, "rejected": out.rejected_selected},
        scores={"chosen": out.chosen_scores, "rejected": out.rejected_scores},
        threshold={"chosen": out.chosen_threshold, "rejected": out.rejected_threshold},
        loss_rewards={"chosen": out.chosen_rewards, "rejected": out.rejected_rewards}, nll=out.nll,
        tokens=batch.attention_mask.sum(),
    )
    return loss, sums, out


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


def fit(
    *,
    engine: Engine,
    all_reduce: Callable[[torch.Tensor], None],
    batches: Iterator[tuple[StreamPosition, list[dict[str, Any]]]],
    cfg: TrainConfig,
    state: TrainState,
    total_steps: int,
    pad_id: int,
    log: Callable[[int, dict[str, Any]], None],
    save: Callable[[TrainState], None],
    evaluate: Callable[[int], dict[str, float]] | None = None,
    on_step: Callable[[dict[str, Any]], None] = lambda metrics: None,
) -> TrainState:
    """Train from `state` to `total_steps` optimizer steps; returns the final state.

    Evaluates at step 0, every `eval_every` steps and at the last step; checkpoints every
    `save_every` steps and at the last step; never twice at one step (a resumed run restarts at a
    step it already evaluated and saved).
    """
    history = state.history
    while True:
        last_step = state.step == total_steps
        periodic_eval = cfg.eval_every and state.step % cfg.eval_every == 0
        if evaluate is not None and (state.step == 0 or last_step or periodic_eval) and history.last_eval_step != state.step:
            # Evaluate before checkpointing, so a checkpoint at step N holds the eval of step N.
            history.last_eval, history.last_eval_step = evaluate(state.step), state.step
            if state.step == 0:
                history.first_eval = history.last_eval
            log(state.step, history.last_eval)
        periodic_save = cfg.save_every and state.step % cfg.save_every == 0
        if state.step > 0 and (last_step or periodic_save) and state.checkpoint_step != state.step:
            _check_weights(engine, all_reduce, state.step)
            save(state)
        if last_step:
            return state

        started = time.perf_counter()
        position, rows = next(batches)
        sums: dict[str, torch.Tensor] = {}
        count = -(-len(rows) // cfg.micro_batch_size)
        for micro, (batch, packed) in enumerate(micro_batches(rows, cfg, pad_id, engine.device)):
            loss, micro_sums, _ = forward_loss(engine, batch, cfg, packed)
            engine.backward(loss)
            if micro == count - 1:
                lr = engine.lr()  # the rate this step applies (the scheduler moves on in step())
            grad_norm = engine.step()
            add_sums(sums, micro_sums)
        metrics = reduce_sums(sums, all_reduce)
        elapsed = time.perf_counter() - started
        _check_finite(state.step + 1, metrics, grad_norm, rows)
        state.step, state.position = state.step + 1, position
        history.last_step_metrics = step_metrics = {
            **{k: v for k, v in metrics.items() if k not in ("pairs", "tokens")},
            "lr": lr, "grad_norm": grad_norm,
            "tokens_per_second": metrics["tokens"] / elapsed, "pairs_per_second": metrics["pairs"] / elapsed,
            "epoch": position.epoch,
        }
        if state.step % cfg.log_every == 0 or state.step == total_steps:
            log(state.step, step_metrics)
        on_step(step_metrics)
