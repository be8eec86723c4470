"""Hugging Face models in and out of stage two: the trained policy saved by `train`, the checkpoint
written by `export`, and the LoRA adapter merged into its base (`--merge-adapter`, `export --merge`).

Both the run (run.py) and the export command (export.py) use these, so neither imports the other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.atomic import atomic_path

# How the weights are named: DeepSpeed's module is `engine.PolicyLogprobs`, which holds the causal
# LM as `policy`; PEFT holds it as `base_model.model`.
POLICY_PREFIX, PEFT_PREFIX = "policy.", "base_model.model."


def gathered_state(ds_engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3 the whole model's weights gathered onto rank 0 (a collective: every rank calls it),
    named as in the causal LM; None elsewhere (the model's own parameters are whole)."""
    if ds_engine.zero_optimization_stage() != 3:
        return None
    state = ds_engine._zero3_consolidated_16bit_state_dict()
    return {k.removeprefix(POLICY_PREFIX): v for k, v in state.items()} if rank == 0 else None


def write_pretrained(model: Any, tokenizer: Any, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """`model.save_pretrained` (with `state` as its weights, if given) and the tokenizer, written
    beside `directory` and renamed into place, so the directory is always whole."""
    with atomic_path(directory) as staging:
        try:
            model.save_pretrained(staging, state_dict=state)
        except Exception as err:
            storage = _storage_failure(err, staging)
            if storage is None:
                raise
            raise storage from None
        tokenizer.save_pretrained(staging)


def _storage_failure(err: Exception, path: Path) -> OSError | None:
    """safetensors reports a failed write (a full disk) as `SafetensorError: ... I/O error: ...
    (os error 28)`, not as an OSError: the OSError it stands for, so it reads as the storage failure it is."""
    found = re.search(r"I/O error: .*\(os error (\d+)\)", str(err))
    if type(err).__name__ != "SafetensorError" or found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def save_pretrained(model: Any, peft_model: Any, tokenizer: Any, state: dict[str, torch.Tensor] | None,
                    directory: Path) -> None:
    """The trained policy as a Hugging Face directory: the adapter alone with LoRA, else the model.
    `state`: gathered ZeRO-3 weights, named as in the causal LM."""
    if peft_model is None:
        write_pretrained(model, tokenizer, directory, state)
        return
    # PEFT keeps the adapter's weights only, under its own names.
    adapter_state = {PEFT_PREFIX + k: v for k, v in state.items()} if state is not None else None
    write_pretrained(peft_model, tokenizer, directory, adapter_state)


def merge_adapter(base: str, adapter: Path, directory: Path) -> None:
    """The base model with the LoRA adapter at `adapter` merged in, saved whole into `directory`
    (the base loads as stored: the merged model keeps its dtype)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from selpipe.pipeline.model import load_causal_lm

    model = load_causal_lm(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    write_pretrained(merged, AutoTokenizer.from_pretrained(adapter), directory)
