"""Checkpoint files are loaded only if loading them cannot run code, and each is read once.

DeepSpeed reads its checkpoint files with `torch.load(..., weights_only=False)`, which unpickles
anything: a crafted file in a run directory would execute on `--resume`. So every file DeepSpeed
loads is read here instead, with `weights_only=True`, which accepts only tensors, plain Python
containers and numbers, and the few plain data classes DeepSpeed itself stores (listed below);
DeepSpeed is handed the checked object (`checked_loading`). A file that needs anything else is
refused, and nothing in it has run. The settings check before DeepSpeed loads shares the same
read (`CheckedReads`), so a resume reads each checkpoint file once.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.errors import CacheError, first_line

# Plain data classes DeepSpeed 0.15-0.19 writes into ZeRO optimizer states (measured: ZeRO 0-3,
# fp32 and fp16 loss scaling). None has custom unpickling logic.
DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_globals() -> list[Any]:
    found = []
    for dotted in DEEPSPEED_DATA_CLASSES:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # an older or newer DeepSpeed without it: then its files cannot hold it either
    return found


def load_tensors(path: str | Path, mmap: bool = True) -> Any:
    """`torch.load` that refuses, in one line, a file needing anything beyond tensors and plain data.

    `mmap`: tensors stay backed by the file (a check costs no copy in memory); pass False for
    what is handed to DeepSpeed, whose optimizer may keep the loaded tensors as its own state."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        reason = first_line(err)
        raise CacheError(f"{path}: refused to load this checkpoint file: it holds more than tensors and plain data, "
                         f"or is damaged ({reason[:200]}); delete the checkpoint directory and point "
                         f"{path.parent.parent / 'latest'} at an earlier one, or start a new --output") from None


def check_checkpoint_files(directory: Path) -> None:
    """Read every `.pt` file of a checkpoint safely (see module docstring); raise on the first refused."""
    for path in sorted(directory.rglob("*.pt")):
        load_tensors(path)


class CheckedReads:
    """Checkpoint files read once each, checked (`load_tensors`), and held until `release`: what
    selpipe reads before DeepSpeed loads (its settings), and what DeepSpeed itself reads twice (its
    loader opens the module-state file to check the list, then to load it), cost one read."""

    def __init__(self) -> None:
        self._held: dict[Path, Any] = {}

    def read(self, path: str | Path) -> Any:
        """The checked contents of `path`, read on the first call and held."""
        key = Path(path).resolve()
        if key not in self._held:
            self._held[key] = load_tensors(key, mmap=False)
        return self._held[key]

    def release(self) -> None:
        """Drop what is held (DeepSpeed has copied it into the engine)."""
        self._held.clear()


class _CheckedCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` answered from `CheckedReads`; the rest is its own."""

    def __init__(self, inner: Any, reads: CheckedReads):
        self._inner, self._reads = inner, reads

    def load(self, path: str, map_location: Any = None) -> Any:  # noqa: ARG002 (always to the CPU)
        return self._reads.read(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def checked_loading(ds_engine: Any, reads: CheckedReads) -> Iterator[None]:
    """Inside the block, every file `ds_engine.load_checkpoint` reads goes through `reads`.

    DeepSpeed reads each checkpoint file through its engine's `checkpoint_engine.load` (module and
    client state, optimizer state, ZeRO partitions: DeepSpeed 0.15-0.19)."""
    inner = ds_engine.checkpoint_engine
    ds_engine.checkpoint_engine = _CheckedCheckpointEngine(inner, reads)
    try:
        yield
    finally:
        ds_engine.checkpoint_engine = inner
        reads.release()
