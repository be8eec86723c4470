"""Hugging Face models out of a run: merge an adapter into its base (`--merge-adapter`)."""

from __future__ import annotations

from pathlib import Path

from selpipe.pipeline.atomic import atomic_path


def merge_adapter(base: str, adapter: Path, directory: Path) -> None:
    """The base model with the LoRA adapter at `adapter` merged in, saved whole into `directory`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with atomic_path(directory) as staging:
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(adapter).save_pretrained(staging)
