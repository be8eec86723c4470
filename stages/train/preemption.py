"""Preemption: a signal asks the run to stop; every rank stops after the same step, with a checkpoint.

Slurm sends SIGTERM before it kills a preempted or cancelled job, and the signal `sbatch --signal`
names (`B:USR1@120` in configs/slurm/train.sbatch: USR1 to the batch shell 120 s before the time
limit, which forwards it) ahead of the time limit. The handler only records the signal. At each
step boundary every rank contributes what it received and all agree (a sum over ranks: one rank
signalled is enough), so all save the same step, the checkpoint a `--resume` continues from bit
for bit, and leave with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from selpipe.pipeline.errors import SelpipeError

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry" -- with --resume.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SelpipeError):
    """Stopped by a signal after saving a checkpoint of the step reached; the CLI exits `exit_code`."""

    exit_code = EXIT_PREEMPTED


class StopRequests:
    """Records SIGTERM and SIGUSR1 while installed (a `with` block); `agreed` is the collective check."""

    def __init__(self, all_reduce: Callable[[torch.Tensor], None], device: torch.device,
                 signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.all_reduce, self.device, self.signals = all_reduce, device, signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self.received = signal.Signals(signum)

    def __enter__(self) -> StopRequests:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> bool:
        """Whether any rank has received a stop signal (every rank calls this at each step boundary)."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.device)
        self.all_reduce(flag)
        return bool(flag.item() > 0)

    def describe(self) -> str:
        """The signal, as the one-line notice names it (another rank's when this one got none)."""
        return self.received.name if self.received is not None else "a stop signal to another rank"


def preempted_message(signal_name: str, step: int, output: str) -> str:
    where = f"checkpoint of step {step} saved" if step else "no step was taken, nothing to save"
    return (f"stopped by {signal_name} after step {step} ({where}); rerun the same command with --resume to continue "
            f"(exit {EXIT_PREEMPTED}, {output})")

