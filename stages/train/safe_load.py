"""Checkpoint files are loaded only if loading them cannot run code.

DeepSpeed reads its checkpoint files with `torch.load(..., weights_only=False)`, which unpickles
anything: a crafted file in a run directory would execute on `--resume`. So before DeepSpeed
touches a checkpoint, every file it may load is first read with `weights_only=True`, which
accepts only tensors, plain Python containers and numbers, and the few plain data classes
DeepSpeed itself stores (listed below). A file that needs anything else is refused, and
nothing in it has run.
"""

from __future__ import annotations

import importlib
import pickle
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


def load_tensors(path: Path) -> Any:
    """`torch.load` that refuses, in one line, a file needing anything beyond tensors and plain data."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            # mmap: the check costs no second copy of a large optimizer state in memory.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        reason = first_line(err)
        raise CacheError(f"{path}: refused to load this checkpoint file: it holds more than tensors and plain data, "
                         f"or is damaged ({reason[:200]}); delete the checkpoint directory and point "
                         f"{path.parent.parent / 'latest'} at an earlier one, or start a new --output") from None


def check_checkpoint_files(directory: Path) -> None:
    """Read every `.pt` file of a checkpoint safely (see module docstring); raise on the first refused."""
    for path in sorted(directory.rglob("*.pt")):
        load_tensors(path)
