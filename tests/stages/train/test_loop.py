"""`fit` in-process against a fake engine: no DeepSpeed, no subprocess, no model.

The fake policy gives every completion token the log-prob `theta` (one trainable scalar), so the
loss, its gradient and every metric are known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

from selpipe.pipeline.config import BatchConfig, LossConfig, ScheduleConfig
from selpipe.pipeline.stream import StreamPosition
from selpipe.pipeline.forward import PolicyForward
from selpipe.stages.train.loop import StepSettings, TrainingDiverged, fit
from selpipe.stages.train.run_dir import TrainState


class FakeEngine:
    """One parameter theta; every completion token's log-prob is theta; plain SGD with lr 0.1."""

    def __init__(self, theta: float = -1.0, poison_at_step: int | None = None):
        self.theta = torch.tensor(theta, requires_grad=True)
        self.device = torch.device("cpu")
        self.steps = 0
        self.poison_at_step = poison_at_step

    def logprobs(self, batch, select=None, packed=None):
        count = int(batch.target_mask.sum())
        value = self.theta * torch.ones(count)
        if self.poison_at_step is not None and self.steps + 1 == self.poison_at_step:
            value = value * float("nan")
        return value

    def backward(self, loss):
        loss.backward()

    def lr(self):
        return 0.1

    def step(self):
        with torch.no_grad():
            self.theta -= 0.1 * self.theta.grad
        norm = float(self.theta.grad.abs())
        self.theta.grad = None
        self.steps += 1
        return norm

    def weights_finite(self):
        return bool(torch.isfinite(self.theta))

    def train(self):
        pass

    def eval(self):
        pass


def row(i: int) -> dict:
    return {"id": f"r{i}", "prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5],
            "chosen_ref_logps": [-1.0, -2.0], "rejected_ref_logps": [-1.5]}


def batches():
    step = 0
    while True:
        step += 1
        yield StreamPosition(0, 2 * step), [row(2 * step), row(2 * step + 1)]


# Two pairs a step in one micro batch, plain DPO with beta 1: no cache, policy or run directory needed.
STEP = StepSettings(LossConfig(top_k=1.0, beta=1.0), BatchConfig(global_batch_size=2, micro_batch_size=2), PolicyForward())


def run_fit(schedule, total_steps, state=None, engine=None, with_eval=True):
    engine = engine or FakeEngine()
    logged, saved, evaluated = [], [], []

    def evaluate(step):
        evaluated.append(step)
        return {"eval/loss": 0.5}

    state = fit(engine=engine, all_reduce=lambda t: None, batches=batches(), step=STEP, schedule=schedule,
                state=state or TrainState(),
                total_steps=total_steps, pad_id=0, log=lambda step, m: logged.append((step, m)),
                save=lambda s: saved.append(s.step), evaluate=evaluate if with_eval else None)
    return state, logged, saved, evaluated, engine


def test_steps_evaluations_and_saves_happen_once_at_their_steps():
    state, logged, saved, evaluated, engine = run_fit(ScheduleConfig(eval_every=4, save_every=3), total_steps=10)
    assert state.step == 10 and engine.steps == 10 and state.position == StreamPosition(0, 20)
    assert evaluated == [0, 4, 8, 10]
    assert saved == [3, 6, 9, 10]
    assert [step for step, m in logged if "loss" in m] == list(range(1, 11))
    assert [step for step, m in logged if "eval/loss" in m] == [0, 4, 8, 10]
    assert state.history.first_eval == {"eval/loss": 0.5} and state.history.last_eval_step == 10


def test_a_resumed_run_neither_evaluates_nor_saves_its_checkpoint_step_again():
    resumed = TrainState(step=6, position=StreamPosition(0, 12), checkpoint_step=6)
    resumed.history.last_eval_step = 4
    state, logged, saved, evaluated, _ = run_fit(ScheduleConfig(eval_every=4, save_every=3), total_steps=10, state=resumed)
    assert evaluated == [8, 10] and saved == [9, 10] and logged[0][0] == 7


def test_a_finished_run_rerun_does_nothing():
    done = TrainState(step=10, checkpoint_step=10)
    done.history.last_eval_step = 10
    state, logged, saved, evaluated, engine = run_fit(ScheduleConfig(eval_every=4, save_every=3), total_steps=10, state=done)
    assert (logged, saved, evaluated, engine.steps) == ([], [], [], 0)


def test_log_every_keeps_the_last_step():
    _, logged, _, _, _ = run_fit(ScheduleConfig(log_every=4), total_steps=10, with_eval=False)
    assert [step for step, _ in logged] == [4, 8, 10]


def test_the_first_step_metrics_in_closed_form():
    """theta = -1, k = 1, beta = 1, per pair: chosen tokens (-1, -2), rejected (-1.5), policy -1 each.

    chosen log-ratio  = (-1 - -1) + (-1 - -2) = 1;  rejected = -1 - -1.5 = 0.5;  z = 0.5
    loss = -log sigmoid(0.5) = 0.474077;  logps/chosen = -2, logps/rejected = -1
    dloss/dtheta = -sigmoid(-0.5) * (2 - 1) = -0.377541 per pair (mean over 2 equal pairs)
    """
    _, logged, _, _, _ = run_fit(ScheduleConfig(), total_steps=1, with_eval=False)
    step, metrics = logged[0]
    assert step == 1
    assert metrics["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.5) and metrics["rewards/accuracies"] == 1.0
    assert (metrics["logps/chosen"], metrics["logps/rejected"]) == (pytest.approx(-2.0), pytest.approx(-1.0))
    assert metrics["grad_norm"] == pytest.approx(1 / (1 + math.exp(0.5)), abs=1e-6)
    assert metrics["lr"] == 0.1 and metrics["selected_fraction/chosen"] == 1.0


def test_a_non_finite_loss_stops_the_run_before_any_save_naming_the_step_and_rows():
    saved = []
    engine = FakeEngine(poison_at_step=3)
    with pytest.raises(TrainingDiverged, match=r"step 3: loss nan and gradient norm nan \(this rank's rows: r6, r7\); nothing of this step was saved"):
        fit(engine=engine, all_reduce=lambda t: None, batches=batches(), step=STEP, schedule=ScheduleConfig(save_every=1),
            state=TrainState(),
            total_steps=10, pad_id=0, log=lambda s, m: None, save=lambda s: saved.append(s.step))
    assert saved == [1, 2]


def test_weights_an_update_made_non_finite_are_never_checkpointed():
    """A finite loss and gradient with an overflowing update: the save at that step is refused."""
    engine = FakeEngine()
    saved = []
    original_step = engine.step

    def overflowing_step():
        norm = original_step()
        if engine.steps == 2:
            with torch.no_grad():
                engine.theta.fill_(float("inf"))
        return norm

    engine.step = overflowing_step
    with pytest.raises(TrainingDiverged, match="step 2: the update left NaN or infinite weights"):
        fit(engine=engine, all_reduce=lambda t: None, batches=batches(), step=STEP, schedule=ScheduleConfig(save_every=1),
            state=TrainState(),
            total_steps=10, pad_id=0, log=lambda s, m: None, save=lambda s: saved.append(s.step))
    assert saved == [1]


def saver(saved):
    """A save as the run directory's: records the step and marks it checkpointed."""
    def save(state):
        saved.append(state.step)
        state.checkpoint_step = state.step
    return save


def test_a_stop_request_checkpoints_the_current_step_and_returns_without_evaluating():
    """Asked at every boundary; saying stop after step 5 saves step 5 (not an eval step) and returns."""
    asked = []

    def stop():
        asked.append(len(asked))
        return len(asked) == 6  # the boundaries after steps 0..5

    engine = FakeEngine()
    saved, evaluated = [], []
    state = fit(engine=engine, all_reduce=lambda t: None, batches=batches(), step=STEP,
                schedule=ScheduleConfig(eval_every=4, save_every=4), state=TrainState(), total_steps=10, pad_id=0,
                log=lambda s, m: None, save=saver(saved), evaluate=lambda s: evaluated.append(s) or {},
                stop=stop)
    assert (state.step, engine.steps, saved, evaluated) == (5, 5, [4, 5], [0, 4])


def test_a_stop_at_a_step_just_saved_saves_nothing_twice():
    saved = []
    fit(engine=FakeEngine(), all_reduce=lambda t: None, batches=batches(), step=STEP,
        schedule=ScheduleConfig(save_every=2), state=TrainState(), total_steps=10, pad_id=0,
        log=lambda s, m: None, save=saver(saved), stop=iter([False, False, True]).__next__)
    assert saved == [2]
