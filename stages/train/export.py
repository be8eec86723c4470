"""Hugging Face models out of a run: `selpipe export` (a checkpoint as a model or a LoRA adapter) and
`merge_adapter` (`--merge-adapter`).

Where a DeepSpeed checkpoint keeps the weights depends on the ZeRO stage (measured, DeepSpeed 0.19):

    ZeRO 0     whole, in rank 0's mp_rank_00_model_states.pt under 'module'; there is no
               optimizer file of partitions, so DeepSpeed's zero_to_fp32 cannot read it
    ZeRO 1, 2  whole there too, and as fp32 master partitions in each rank's *_optim_states.pt
    ZeRO 3     only as partitions: the module file holds empty placeholders

So ZeRO 0 reads 'module' (under bf16 the weights the run computed with, as its final save writes
them; bf16's ZeRO-0 optimizer file has no stage for zero_to_fp32 either), and ZeRO 1 to 3 read the
fp32 master weights through zero_to_fp32 (on ZeRO 1 and 2 in fp32 both give the same tensors).
The names are the training wrapper's (`policy.` + the causal LM's name, see engine.PolicyLogprobs).
The weights are loaded strictly into the policy the run started from, loaded as it is stored, so
the export has its config, dtype and tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from selpipe.pipeline.config import ExportConfig, TrainConfig, build_config, setting_fields
from selpipe.pipeline import ownership
from selpipe.pipeline.errors import CacheError, ConfigError, first_line, storage_errors
from selpipe.pipeline.model import load_causal_lm
from selpipe.pipeline.tokenization import load_tokenizer

from .engine import add_adapter
from .model_io import PEFT_PREFIX, POLICY_PREFIX, write_pretrained
from .run_dir import RunDirectory



def export_checkpoint(cfg: ExportConfig) -> dict[str, Any]:
    """Write checkpoint `cfg.step` of the run `cfg.run` into `cfg.output`; returns what was written."""
    run = Path(cfg.run)
    saved = _run_config(run)
    train = _train_config(saved, cfg.policy)
    if cfg.merge and not train.model.lora_rank:
        raise ConfigError(f"--merge merges a LoRA adapter, but {run} trained every weight; its export is already a "
                          f"full model: drop --merge")
    # Never into the run (its model/, a checkpoint: a resumed run would delete it) or the policy.
    ownership.check_output(cfg.output, inputs={"RUN": run, "--policy": train.io.policy}, kind="new directory")
    with ownership.output_lease(cfg.output, "export"):  # a second export into it is refused, naming this one
        return _export(cfg, run, saved, train)


def _export(cfg: ExportConfig, run: Path, saved: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    steps = checkpoint_steps(run)
    step, value = _choose_step(cfg, run, steps)
    directory = run / "checkpoints" / f"step-{step}"
    stage = saved["deepspeed"].get("zero_optimization", {}).get("stage", 0)
    state = checkpoint_state(directory, stage, adapter_only=bool(train.model.lora_rank))
    tokenizer = load_tokenizer(train.io.policy)
    base = _load_base(train.io.policy)
    if train.model.lora_rank:
        model = _with_adapter(train, base, state, directory)
        kind = "merged" if cfg.merge else "adapter"
        exported = model.merge_and_unload() if cfg.merge else model
    else:
        _load_exactly(base, state, set(base.state_dict()), directory, train.io.policy)
        kind, exported = "model", base
    with storage_errors("write the exported model", cfg.output):
        write_pretrained(exported, tokenizer, Path(cfg.output))
    summary: dict[str, Any] = {"run": str(run), "step": step, "output": cfg.output, "kind": kind,
                               "policy": train.io.policy, "zero_stage": stage}
    if value is not None:
        summary[cfg.metric] = value
    return summary


# ---------------------------------------------------------------- what to export (all before any weight loads)


def _run_config(run: Path) -> dict[str, Any]:
    """The run's config.json (the resolved TrainConfig and DeepSpeed config), or a one-line refusal."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except FileNotFoundError:
        saved = None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{run / 'config.json'} cannot be read ({err}); it is the run's record of its "
                         f"settings") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) \
            or not isinstance(saved.get("deepspeed"), dict):
        raise ConfigError(f"RUN {run} is not a selpipe training run (no config.json written by `selpipe train`); give "
                          f"the --output directory of a run")
    return saved


def _train_config(saved: dict[str, Any], policy: str | None) -> TrainConfig:
    """The run's TrainConfig; a setting newer than the run had its default then."""
    known = {f.name for _, f, _ in setting_fields(TrainConfig)}
    train = build_config(TrainConfig, {k: v for k, v in saved["train"].items() if k in known})
    policy = policy or train.io.policy
    if not Path(policy).is_dir():
        raise ConfigError(f"the run's policy {policy} is not a directory here; the export needs the base model's "
                          f"config, tokenizer (and with LoRA its weights): pass --policy with where it is now")
    return dataclasses.replace(train, io=dataclasses.replace(train.io, policy=policy))


def checkpoint_steps(run: Path) -> list[int]:
    """The steps of the run's complete checkpoints: those up to the one `latest` names (a later
    step-N directory is what a kill during its save left behind)."""
    directory = RunDirectory(run, rank=0)
    latest = directory.latest_checkpoint()
    if latest is None:
        return []
    steps = (int(p.name[5:]) for p in directory.step_directories())
    return [step for step in steps if step <= int(latest[5:])]


def _choose_step(cfg: ExportConfig, run: Path, steps: list[int]) -> tuple[int, float | None]:
    """(the step to export, its --metric value where --step best chose it)."""
    kept = ", ".join(map(str, steps)) or "none"
    if not steps:
        raise ConfigError(f"RUN {run} holds no complete checkpoint (it stopped before its first save); nothing to "
                          f"export")
    if cfg.step == "latest":
        return steps[-1], None
    if cfg.step == "best":
        return best_step(run / "metrics.jsonl", cfg.metric, steps, cfg.greater_is_better)
    if cfg.step not in steps:
        raise ConfigError(f"--step {cfg.step}: {run} has no checkpoint of that step; its checkpoints are at steps "
                          f"{kept} (--keep-checkpoints keeps the most recent)")
    return cfg.step, None


def best_step(metrics: Path, metric: str, steps: list[int], greater_is_better: bool) -> tuple[int, float]:
    """The checkpoint whose logged `metric` is best (the earliest on a tie), and that value.

    An eval at step N runs before the checkpoint at N is saved, so it describes that checkpoint.
    """
    values: dict[int, float] = {}
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
            step, value = row["step"], row[metric]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # another metric's row, or a line a kill cut short
        if step in steps and isinstance(value, (int, float)) and math.isfinite(value):
            values[step] = float(value)  # a later row of the same step is the rerun's (resume keeps one)
    if not values:
        raise ConfigError(f"--step best: {metrics} logs no {metric} at a kept checkpoint (steps "
                          f"{', '.join(map(str, steps))}); train with --eval-cache and an --eval-every that divides "
                          f"--save-every, or export a --step N")
    sign = -1.0 if greater_is_better else 1.0
    best = min(sorted(values), key=lambda s: sign * values[s])
    return best, values[best]


# ---------------------------------------------------------------- the weights


def checkpoint_state(directory: Path, zero_stage: int, adapter_only: bool) -> dict[str, Any]:
    """The weights of checkpoint `directory`, named as in the causal LM; with `adapter_only`, only
    the LoRA adapter's (the base is frozen, so the policy's own files hold it)."""
    from .safe_load import check_checkpoint_files, load_tensors

    # DeepSpeed's readers unpickle freely: every file is first read as tensors and plain data only.
    check_checkpoint_files(directory)
    if zero_stage == 0:
        raw = load_tensors(directory / "mp_rank_00_model_states.pt").get("module")
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints its progress; stdout is the command's summary.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                raw = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name,
                                                               exclude_frozen_parameters=adapter_only)
            except (FileNotFoundError, ValueError, KeyError) as err:
                raise CacheError(f"{directory}: DeepSpeed cannot join this ZeRO-{zero_stage} checkpoint's partitions "
                                 f"({first_line(err)[:200]}); export another --step") from None
    if not isinstance(raw, dict) or not raw or \
            not all(isinstance(k, str) and k.startswith(POLICY_PREFIX) for k in raw):
        raise CacheError(f"{directory}: holds no selpipe policy weights (names starting {POLICY_PREFIX!r}); export a "
                         f"checkpoint that `selpipe train` wrote")
    state = {k.removeprefix(POLICY_PREFIX): v for k, v in raw.items()}
    return {k: v for k, v in state.items() if "lora_" in k} if adapter_only else state


def _load_base(policy: str) -> Any:
    # As stored: the export keeps the policy's dtype.
    return load_causal_lm(policy, dtype="auto", flag="--policy")


def _load_exactly(module: Any, state: dict[str, Any], expected: set[str], directory: Path, policy: str) -> None:
    """Load `state` into `module`; its names must be exactly `expected` and every shape must fit
    (strict loading, refused in one line: the run trained another model than `policy`)."""
    def names(keys: set[str]) -> str:
        listed = sorted(keys)
        return ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")

    missing, unexpected = expected - state.keys(), state.keys() - expected
    reason = "; ".join(([f"missing {names(missing)}"] if missing else []) +
                       ([f"unexpected {names(unexpected)}"] if unexpected else []))
    if not reason:
        try:
            module.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes that differ: torch lists one per line below its heading
            details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
            reason = details[0][:200] + (f" and {len(details) - 1} more" if len(details) > 1 else "")
    if reason:
        raise CacheError(f"{directory}: its weights do not fit the policy {policy} ({reason}); pass as --policy the "
                         f"model this run trained")


def _with_adapter(train: TrainConfig, base: Any, adapter: dict[str, Any], directory: Path) -> Any:
    """`base` with the run's LoRA adapter (built as training built it) holding the checkpoint's adapter weights."""

    # The same LoraConfig as in training; the base loads as stored (a QLoRA adapter merges into the full base).
    peft_model = add_adapter(dataclasses.replace(train.model, load_in_4bit=False, gradient_checkpointing=False), base)
    named = {PEFT_PREFIX + k: v for k, v in adapter.items()}
    _load_exactly(peft_model, named, {k for k in peft_model.state_dict() if "lora_" in k}, directory, train.io.policy)
    return peft_model
