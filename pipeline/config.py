"""Typed settings: the one source of truth for every option.

Each setting is a dataclass field made by `setting(...)`, whose metadata carries its help text,
its range and whether it is part of an output's identity. The CLI builds its flags from these
fields (see `selpipe.cli.options`), config files are JSON or YAML mappings with the same keys,
and `docs/configuration.md` is generated from them. Validation lives in `__post_init__`
(`check_settings` reads the metadata), so a config is valid however it was built: from flags,
a file or Python, and is checked once, when it is built.

Stage two's settings come in groups (`TrainConfig.io`, `.loss`, `.batch`, `.schedule`,
`.model`), each a dataclass that validates itself, so each function takes only the group it
uses. Flags, config-file keys and the saved `config.json` stay flat (`--top-k`, `top_k`): the
names are unique across groups, and `build_config`, `to_dict` and the CLI walk the groups
(`setting_fields`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from .errors import ConfigError

Backend = Literal["hf", "vllm"]
DType = Literal["float32", "bfloat16", "float16"]
Truncation = Literal["truncate", "skip"]
OnBadRow = Literal["error", "skip"]
# transformers.get_scheduler's names; each warms up linearly over --warmup-steps first.
Schedule = Literal["linear", "cosine", "cosine_with_min_lr", "constant"]
LossType = Literal["sigmoid", "sigmoid_norm", "ipo", "hinge", "robust", "simpo"]  # pipeline/loss.py's LOSSES
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
RpoTokens = Literal["all", "selected"]
RPO_TOKENS: tuple[str, ...] = get_args(RpoTokens)
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "none"]
ExportStep = Literal["best", "latest"]


def setting(default: Any, help: str, *, identity: bool = False, argument: bool = False, required: str | bool = False,
            minimum: float | None = None, above: float | None = None, maximum: float | None = None,
            below: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field with its help text and what `check_settings` checks.

    `identity`: a rerun or resume must agree on it. For score-ref, the settings that change what
    lands in the cache (the model and the input are compared by content instead, since one may
    be mounted at another path); for train, what fixes the row order, the loss, the adapter and
    the optimizer state a checkpoint holds. `identity_settings` collects them.
    `required`: the setting must be given (a string says what to give). `minimum`/`maximum`
    bound a number inclusively, `above`/`below` exclusively; every number must also be finite.
    `argument` makes the setting a positional command-line argument instead of a flag.
    """
    metadata = {"help": help, "identity": identity, "argument": argument, "required": required,
                "minimum": minimum, "above": above, "maximum": maximum, "below": below}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def flag_name(f: dataclasses.Field) -> str:
    """How the user names a setting: `--top-k`, or `CACHE` for a positional argument."""
    return f.name.upper() if f.metadata.get("argument") else f"--{f.name.replace('_', '-')}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _members(hint: Any) -> tuple[Any, ...]:
    """A type's alternatives: (int, Literal['auto']) for `int | Literal['auto']`; None left out."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(m for m in typing.get_args(hint) if m is not type(None))
    return (hint,)


def _words(hint: Any) -> tuple[Any, ...]:
    return tuple(w for m in _members(hint) if typing.get_origin(m) is Literal for w in typing.get_args(m))


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def _kinds(hint: Any) -> str:
    """What a setting may be, in words: "an integer or 'auto'" for `int | Literal['auto']`."""
    kinds = [_KIND_WORDS.get(typing.get_origin(m) or m, getattr(m, "__name__", str(m)))
             for m in _members(hint) if typing.get_origin(m) is not Literal]
    return " or ".join(kinds + [repr(w) for w in _words(hint)])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_text(meta: dict[str, Any]) -> str | None:
    """'in (0, 1]', 'at least 0', 'positive', ... from the metadata's bounds; None when unbounded."""
    low = ("[", meta["minimum"]) if meta["minimum"] is not None else ("(", meta["above"])
    high = ("]", meta["maximum"]) if meta["maximum"] is not None else (")", meta["below"])
    if low[1] is not None and high[1] is not None:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low[1] is not None:
        if low[0] == "(":
            return "positive" if low[1] == 0 else f"above {low[1]:g}"
        return f"at least {low[1]:g}"
    if high[1] is not None:
        return f"at most {high[1]:g}" if high[0] == "]" else f"below {high[1]:g}"
    return None


def _in_range(value: float, meta: dict[str, Any]) -> bool:
    return ((meta["minimum"] is None or value >= meta["minimum"]) and (meta["above"] is None or value > meta["above"])
            and (meta["maximum"] is None or value <= meta["maximum"]) and (meta["below"] is None or value < meta["below"]))


def check_setting(cfg: Any, f: dataclasses.Field) -> None:
    """One setting against its metadata and type: given if required, one of its words, a finite
    number in its range. Raises a one-line ConfigError naming the flag."""
    value, meta, name = getattr(cfg, f.name), f.metadata, flag_name(f)
    if meta["required"] and value in ("", None):
        how = f": {meta['required']}" if isinstance(meta["required"], str) else ""
        raise ConfigError(f"{name} is required{how}")
    hint = _hints(type(cfg))[f.name]
    words = _words(hint)
    numeric = any(m in (int, float) for m in _members(hint))
    if value is None:
        return
    if isinstance(value, bool):
        if bool not in _members(hint):
            raise ConfigError(f"{name} must be {_kinds(hint)}; got {value!r}")
        return
    if words and not numeric and value not in words:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, words))}; got {value!r}")
    if words and numeric and not _is_number(value) and value not in words:
        raise ConfigError(f"{name} must be {_kinds(hint)}; got {value!r}")
    if not _is_number(value):
        return
    if isinstance(value, float) and int in _members(hint) and float not in _members(hint):
        raise ConfigError(f"{name} must be an integer; got {value}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value}")
    if not _in_range(value, meta):
        raise ConfigError(f"{name} must be {_range_text(meta)}; got {value}")


DEVICE_WORDS = ("auto", "cpu", "cuda", "mps")


def check_device(device: str, flag: str = "--device") -> None:
    """A device torch can place a model on here: auto, cpu, mps, cuda or cuda:N, with CUDA (and GPU N)
    present when named, so a typo or a GPU-less host is one line before the model loads, not a
    traceback from `model.to` after it. torch is imported only when CUDA is asked for."""
    kind, _, index = device.partition(":")
    if kind not in DEVICE_WORDS or (index and (kind != "cuda" or not index.isdigit())) or device.endswith(":"):
        raise ConfigError(f"{flag} must be auto, cpu, mps, cuda or cuda:N; got {device!r}")
    if kind != "cuda":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{flag} {device}: this machine has no CUDA device torch can use; use --device cpu or auto")
    if index and int(index) >= count:
        raise ConfigError(f"{flag} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def check_settings(cfg: Any) -> None:
    """`check_setting` for each setting of one dataclass (a group checks its own; see `__post_init__`)."""
    for f in dataclasses.fields(cfg):
        if not _is_group(_hints(type(cfg))[f.name]):
            check_setting(cfg, f)


def _is_group(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def setting_fields(cls: type) -> Iterator[tuple[str | None, dataclasses.Field, Any]]:
    """Every setting of a config class as (its group's field name or None, the field, its type),
    walking into the groups in order: the flat view flags, config files and docs are made of."""
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if _is_group(hint):
            yield from ((f.name, inner, inner_hint) for _, inner, inner_hint in setting_fields(hint))
        else:
            yield None, f, hint


def _leaves(cfg: Any) -> Iterator[tuple[dataclasses.Field, Any]]:
    """(field, value) of every setting of a built config, groups walked."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_group(_hints(type(cfg))[f.name]):
            yield from _leaves(value)
        else:
            yield f, value


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The settings as one flat mapping (the keys of a config file), groups walked: what runs save."""
    return {f.name: copy.deepcopy(value) for f, value in _leaves(cfg)}


def identity_settings(cfg: Any) -> dict[str, Any]:
    """The settings a rerun or resume must agree on (`setting(identity=True)`), flat, groups walked."""
    return {f.name: copy.deepcopy(value) for f, value in _leaves(cfg) if f.metadata["identity"]}


def default_settings(cls: type) -> dict[str, Any]:
    """Every setting's default, flat (a setting newer than a saved config had its default then)."""
    return {f.name: default_of(f) for _, f, _ in setting_fields(cls)}


class Settings:
    """What every config class shares: the flat views of its settings."""

    def identity(self) -> dict[str, Any]:
        """The settings a rerun into the same output must agree on (see `setting(identity=True)`)."""
        return identity_settings(self)


@dataclass(frozen=True)
class ScoreConfig(Settings):
    """Settings of `selpipe score-ref` (stage one)."""

    input: str = setting("", "Preference data: a .jsonl, .json, .jsonl.zst, .parquet or .arrow file; several, comma-separated "
                             "or as a glob; a dataset folder (saved by `datasets`, or as `huggingface-cli download` "
                             "leaves it); or a Hub dataset name the local Hugging Face cache holds.", required=True)
    input_config: str | None = setting(None, "Subset (config name) of a dataset folder or Hub dataset.", identity=True)
    output: str = setting("", "Cache directory to write (created if missing; a rerun resumes it).", required=True)
    model: str = setting("", "Reference model: a local directory or a name your HF cache already holds.", required=True)
    revision: str | None = setting(None, "Model revision to record and load (for hub-style caches).", identity=True)
    backend: Backend = setting("hf", "Scoring backend: `hf` (transformers) or `vllm`.", identity=True)
    dtype: DType = setting("float32", "Weights dtype of the reference; log-softmax is always fp32.", identity=True)
    split: str = setting("train", "Split to read from a dataset folder, saved DatasetDict or Hub dataset.", identity=True)
    max_length: int = setting(1024, "Most tokens in prompt + one completion.", identity=True, above=0)
    max_prompt_length: int = setting(512, "Most prompt tokens; longer prompts keep their end.", identity=True, above=0)
    truncation: Truncation = setting(
        "truncate",
        "Rows over the limits: `truncate` (prompt keeps its end, completions keep their start) "
        "or `skip` (counted, reason `too_long`).",
        identity=True,
    )
    append_eos: bool = setting(True, "Append the EOS token to string completions (chat completions end with the template's end-of-turn).", identity=True)
    on_bad_row: OnBadRow = setting("error", "Malformed rows: `error` stops with the row and field, `skip` counts them.", identity=True)
    max_row_bytes: int = setting(1 << 20, "Largest input row in bytes (a JSON Lines line); a larger row is never parsed: "
                                          "a bad row with reason `row_too_large` (counted under --on-bad-row skip). 1 MiB "
                                          "is ~250k tokens of text and costs ~300 MB while tokenized.", identity=True, above=0)
    num_workers: int | Literal["auto"] = setting(1, "Number of worker processes sharing this cache; `auto`: from the "
                                                    "Slurm array, Slurm tasks or torchrun (docs/scaling.md).", identity=True,
                                                 above=0)
    worker_index: int | Literal["auto"] = setting(0, "This worker's index in [0, num_workers); `auto`: from the Slurm array, "
                                                     "Slurm tasks or torchrun, whose LOCAL_RANK picks the GPU.", minimum=0)
    shard_size: int = setting(4096, "Input rows per shard (the unit of restart).", identity=True, above=0)
    row_group_size: int = setting(256, "Rows per Parquet row group (the unit of streaming).", identity=True, above=0)
    token_budget: int | Literal["auto"] = setting(16384, "hf backend: most padded tokens in one forward batch; `auto` "
                                                          "times doubling budgets at start-up and takes the smallest "
                                                          "within 5% of the fastest (reported in the summary; the "
                                                          "batching then depends on the timing, so log-probs may "
                                                          "differ between runs in the last bits).", above=0)
    share_prompts: bool = setting(False, "hf backend: score each distinct prompt once for all its completions (same "
                                         "log-probs; faster when prompts are long).")
    logprob_chunk: int = setting(256, "Completion positions per log-softmax chunk: the fp32 buffer is chunk x vocab x 4 bytes.",
                                 above=0)
    device: str = setting("auto", "hf backend device: auto, cpu, mps, cuda, cuda:N.")
    compile: bool = setting(False, "hf backend: torch.compile the model with frozen weights: about a minute more start-up, "
                                   "then faster scoring (see docs/benchmarks.md); for long runs.")
    tensor_parallel_size: int = setting(1, "vllm backend: GPUs per model.", above=0)
    gpu_memory_utilization: float = setting(0.9, "vllm backend: fraction of GPU memory for the engine.", above=0, maximum=1)
    kv_cache_memory_bytes: int | None = setting(None, "vllm backend: KV cache size in bytes (needed on CPU).", above=0)
    enforce_eager: bool = setting(False, "vllm backend: skip vLLM's torch.compile and CUDA graphs (quicker start-up, slower scoring).")
    progress: bool = setting(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length "
                f"({self.max_length}) to leave room for a completion"
            )
        if "auto" not in (self.worker_index, self.num_workers) and self.worker_index >= self.num_workers:
            raise ConfigError(f"--worker-index must be in [0, {self.num_workers}); got {self.worker_index}")
        if self.share_prompts and self.backend != "hf":
            raise ConfigError("--share-prompts is for --backend hf (vLLM has its own prefix caching, off for exact scores)")
        if self.token_budget != "auto" and self.token_budget < self.max_length:
            raise ConfigError(f"--token-budget ({self.token_budget}) must hold one sequence of --max-length ({self.max_length})")
        if self.backend == "hf":
            check_device(self.device)


# ------------------------------------------------------------------ stage two, in groups


@dataclass(frozen=True)
class IOConfig:
    """What a training run reads and writes: its inputs, its run directory, checkpoints and trackers."""

    cache: str = setting("", "Score cache written by `selpipe score-ref`: scores tokens (and anchors the KL term unless --anchor-scores).",
                         required=True)
    policy: str = setting("", "Policy to train: a local model directory (usually the SFT model).", required=True)
    output: str = setting("", "Run directory: checkpoints, metrics.jsonl, TensorBoard logs, final model.", required=True)
    anchor_scores: str | None = setting(None, "A second cache of the same rows whose log-probs anchor the DPO term.")
    eval_cache: str | None = setting(None, "A score cache to evaluate on (loss, margins, preference accuracy); its own log-probs score and anchor.")
    save_hf_checkpoints: bool = setting(False, "Beside each checkpoint also write hf/, loadable with from_pretrained "
                                               "(the adapter with LoRA); else `selpipe export` makes one on demand.")
    keep_checkpoints: int = setting(2, "Most recent checkpoints kept on disk.", above=0)
    merge_adapter: bool = setting(False, "With LoRA: also save model-merged/, the base with the adapter merged in.")
    report_to: str = setting("tensorboard", "Trackers, comma-separated: tensorboard, wandb, mlflow, or none (metrics.jsonl "
                                            "is always written). wandb and mlflow honour their usual environment "
                                            "variables (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, ...).")
    resume: bool = setting(False, "Continue from the last checkpoint in --output (starts fresh if there is none).")
    save_model: bool = setting(True, "Save the final policy with save_pretrained.")
    progress: bool = setting(True, "Show a progress bar (rank 0).")

    def __post_init__(self) -> None:
        check_settings(self)
        unknown = [t for t in self.trackers() if t not in get_args(Tracker)]
        if unknown:
            raise ConfigError(f"--report-to {','.join(unknown)} is not a tracker; choose from {', '.join(get_args(Tracker))}")

    def trackers(self) -> list[str]:
        """--report-to as a list; `none` alone means no tracker but metrics.jsonl."""
        return [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]


# Losses without a label-smoothing term; eps is a flip rate for robust, a smoothing weight elsewhere.
IGNORE_LABEL_SMOOTHING = frozenset({"ipo", "hinge"})


@dataclass(frozen=True)
class LossConfig:
    """The loss's own settings (`pipeline.loss.selective_dpo_loss` takes one), checked once when built.

    `simpo_gamma` is SimPO's target margin gamma as the paper writes it (TRL's `simpo_gamma`),
    not the gamma/beta ratio of the SimPO and open-instruct code (`gamma_beta_ratio`).
    """

    top_k: float = setting(0.4, "Fraction k of each response's tokens selected by alignment score; 1 is plain DPO.",
                           identity=True, above=0, maximum=1)
    loss_type: LossType = setting("sigmoid", "DPO-family loss over the selected tokens (docs/losses.md): sigmoid, "
                                             "sigmoid_norm, ipo, hinge, robust or simpo.", identity=True)
    beta: float = setting(0.01, "DPO temperature beta (SimPO's and IPO's beta for those losses).", identity=True, above=0)
    # The robust loss divides by 1 - 2 eps: eps is a flip rate below one half (and a smoothing above it inverts the labels).
    label_smoothing: float = setting(0.0, "Label smoothing eps: conservative DPO for sigmoid, the flip rate for robust.",
                                     identity=True, minimum=0, below=0.5)
    simpo_gamma: float = setting(0.5, "SimPO's target reward margin gamma (--loss-type simpo).", identity=True)
    rpo_alpha: float = setting(0.0, "Weight of an NLL term on the chosen response added to the loss (RPO); 0 disables.",
                               identity=True, minimum=0)
    rpo_tokens: RpoTokens = setting("all", "Chosen tokens the RPO term averages over: all, or only the selected ones.",
                                    identity=True)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.loss_type in IGNORE_LABEL_SMOOTHING and self.label_smoothing != 0.0:
            # A setting that would silently do nothing is refused rather than ignored.
            raise ConfigError(f"--loss-type {self.loss_type}: the {self.loss_type} loss has no label smoothing; "
                              f"got --label-smoothing {self.label_smoothing}")

    @property
    def head_on_all_chosen(self) -> bool:
        """Whether every chosen token gets a gradient (an RPO term over all of them), not only the selected."""
        return self.rpo_alpha > 0 and self.rpo_tokens == "all"


@dataclass(frozen=True)
class BatchConfig:
    """Which rows form each optimizer step and micro batch, in what order."""

    global_batch_size: int = setting(32, "Pairs per optimizer step across all ranks.", identity=True, above=0)
    micro_batch_size: int = setting(4, "Pairs per forward pass on one rank.", above=0)
    length_sorted_micro_batches: bool = setting(True, "Order each step's pairs by length before cutting micro batches "
                                                      "(less padding; the step sees the same pairs).")
    length_bucketing: bool = setting(False, "Group pairs of similar length into the same global batch within each "
                                            "shuffle window (changes which pairs share a step).", identity=True)
    shuffle_window: int = setting(16, "Row groups shuffled together (the stream's shuffle buffer).", identity=True, above=0)
    seed: int = setting(0, "Seed of the shuffle and of any randomness in the run.", identity=True, minimum=0)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--global-batch-size ({self.global_batch_size}) must be a multiple of "
                f"--micro-batch-size ({self.micro_batch_size})"
            )

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro batches per rank per optimizer step; refuses a split that does not divide."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size ({self.global_batch_size}) must be divisible by "
                f"--micro-batch-size ({self.micro_batch_size}) x ranks ({world_size}) = {per_step}; "
                f"pick a global batch that is a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class ScheduleConfig:
    """The optimizer and its schedule, how long to train, and when to evaluate, save and log."""

    learning_rate: float = setting(5e-7, "Peak learning rate of AdamW.", identity=True, minimum=0)
    min_lr_ratio: float = setting(0.0, "Final learning rate as a fraction of the peak (--schedule cosine_with_min_lr).",
                                  identity=True, minimum=0, maximum=1)
    weight_decay: float = setting(0.0, "AdamW weight decay.", identity=True, minimum=0)
    adam_betas: list = setting([0.9, 0.999], "AdamW betas (beta1,beta2).", identity=True)
    schedule: Schedule = setting("cosine", "Learning-rate decay after warm-up (transformers.get_scheduler): linear, "
                                           "cosine, cosine_with_min_lr (down to --min-lr-ratio) or constant.", identity=True)
    warmup_steps: int = setting(0, "Optimizer steps of linear warm-up from 0.", identity=True, minimum=0)
    max_steps: int = setting(0, "Optimizer steps to run; 0 means --epochs full passes.", identity=True, minimum=0)
    epochs: int = setting(1, "Passes over the cache when --max-steps is 0.", identity=True, minimum=0)
    gradient_clipping: float = setting(1.0, "Clip the global gradient norm to this (0 disables).", minimum=0)
    eval_every: int = setting(0, "Evaluate every N optimizer steps (0: at start and end only).", minimum=0)
    save_every: int = setting(0, "Checkpoint every N optimizer steps (0: only at the end).", minimum=0)
    log_every: int = setting(1, "Write metrics every N optimizer steps.", above=0)

    def __post_init__(self) -> None:
        check_settings(self)
        if len(self.adam_betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"--adam-betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {self.adam_betas}")
        if self.min_lr_ratio and self.schedule != "cosine_with_min_lr":
            raise ConfigError(f"--min-lr-ratio applies to --schedule cosine_with_min_lr only; got --schedule {self.schedule}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError("set --max-steps > 0 or --epochs > 0")


@dataclass(frozen=True)
class ModelConfig:
    """The policy: how it is built (precision, ZeRO, LoRA) and how its log-probs are computed."""

    zero_stage: int = setting(0, "DeepSpeed ZeRO stage 0-3; picks configs/zero{N}.json (a --deepspeed-config must ask for the same stage).",
                              identity=True, minimum=0, maximum=3)
    deepspeed_config: str | None = setting(None, "A DeepSpeed JSON to use instead of the shipped one (batch sizes, optimizer and precision are filled in from these settings).")
    precision: Precision = setting("auto", "auto: bf16 on GPUs that support it, else fp32. fp16: mixed precision with "
                                           "DeepSpeed's dynamic loss scaling, for GPUs without bf16.", identity=True)
    lora_rank: int = setting(0, "LoRA rank r (PEFT); 0 trains every weight.", identity=True, minimum=0)
    lora_alpha: float = setting(16.0, "LoRA alpha (the adapter's scale is alpha / r).", identity=True, above=0)
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input.", identity=True, minimum=0, below=1)
    lora_target_modules: str = setting("", "Comma-separated module names to adapt, or all-linear; default: the "
                                           "architecture's attention and MLP projections.", identity=True)
    load_in_4bit: bool = setting(False, "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); needs --lora-rank.",
                                 identity=True)
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    logprob_chunk: int = setting(256, "Completion positions per log-softmax chunk: peak memory is about 3 x chunk x vocab x 4 bytes.",
                                 above=0)
    selective_head: bool = setting(True, "Recompute the output head with gradient at the selected tokens only (the "
                                         "same gradient; less head work at k < 1).")
    prefix_sharing: bool = setting(False, "Forward each pair's prompt once for both responses (one packed row, a "
                                          "block-causal mask; needs sdpa or eager attention).")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.load_in_4bit and not self.lora_rank:
            raise ConfigError("--load-in-4bit trains an adapter on a frozen 4-bit base: set --lora-rank too")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Settings of `selpipe train` (stage two), in groups; each group checks itself when built."""

    io: IOConfig
    loss: LossConfig = field(default_factory=LossConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.io.merge_adapter and not self.model.lora_rank:
            raise ConfigError("--merge-adapter merges an adapter: set --lora-rank too")


@dataclass(frozen=True)
class InspectConfig(Settings):
    """Settings of `selpipe inspect`: what a cache holds, and optionally a page of sample pairs."""

    cache: str = setting("", "Score cache directory.", argument=True, required="give a score cache directory")
    html: str | None = setting(None, "Also write an HTML page of sample pairs, tokens shaded.")
    policy: str | None = setting(None, "With --html: shade by alignment score against this policy and mark the selected "
                                       "tokens (else shade by reference log-prob).")
    samples: int = setting(8, "With --html: pairs to render.", above=0)
    top_k: float = setting(0.4, "With --html and --policy: the k of the mask.", above=0, maximum=1)
    seed: int = setting(0, "With --html: seed of the sample.", minimum=0)

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class VerifyConfig(Settings):
    """Settings of `selpipe verify`: recompute a random sample of a cache with transformers."""

    cache: str = setting("", "Score cache directory.", argument=True, required="give a score cache directory")
    model: str = setting("", "The reference model, loaded with transformers.", required=True)
    sample: int = setting(64, "Pairs to recompute.", above=0)
    tolerance: float = setting(1e-3, "Largest per-token |difference| that passes.", minimum=0)
    seed: int = setting(0, "Seed of the sample.", minimum=0)
    device: str = setting("auto", "auto, cpu, mps, cuda, cuda:N.")
    dtype: DType | None = setting(None, "Weights dtype (default: the cache's).")
    token_budget: int = setting(16384, "Most padded tokens in one forward batch.", above=0)

    def __post_init__(self) -> None:
        check_settings(self)
        check_device(self.device)


@dataclass(frozen=True)
class ExportConfig(Settings):
    """Settings of `selpipe export`: a training run's checkpoint as a Hugging Face model (or LoRA adapter)."""

    run: str = setting("", "Training run directory (the --output of `selpipe train`).", argument=True,
                       required="give a training run directory")
    output: str = setting("", "Directory to write, new or empty: a model for AutoModelForCausalLM.from_pretrained, or "
                              "for a LoRA run an adapter for PeftModel.from_pretrained.", required=True)
    step: int | ExportStep = setting("latest", "Checkpoint to export: its step, `latest`, or `best` (the kept checkpoint "
                                               "whose logged --metric is best).", above=0)
    metric: str = setting("eval/loss", "With --step best: the metrics.jsonl key that ranks the checkpoints; the lowest "
                                       "wins unless --greater-is-better.",
                          required="name a metrics.jsonl key, such as eval/loss")
    greater_is_better: bool = setting(False, "With --step best: the highest --metric wins (for accuracies).")
    merge: bool = setting(False, "For a LoRA run: write the base with the adapter merged in, a full model.")
    policy: str | None = setting(None, "The base model the run trained (default: the run's --policy); give it where "
                                       "that directory has moved.")

    def __post_init__(self) -> None:
        check_settings(self)


ConfigT = TypeVar("ConfigT", ScoreConfig, TrainConfig, InspectConfig, VerifyConfig, ExportConfig)


def _json_object(path: Path) -> Any:
    """json's object_pairs_hook: an object as a dict, refusing a key given twice (json keeps the last silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen and not key.startswith("//"):  # comments may repeat
                raise ConfigError(f"config file {path}: the key {key!r} is given twice; keep one")
            seen[key] = value
        return seen

    return hook


def _yaml_loader(path: Path) -> Any:
    """PyYAML's safe loader, reading `5e-7` as the float YAML 1.2 makes it (YAML 1.1 wants `5.0e-7`),
    and refusing a mapping key given twice (PyYAML keeps the last silently)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # PyYAML refuses it below, with the line
                if key in seen and not str(key).startswith("//"):
                    raise ConfigError(f"config file {path}: the key {key!r} is given twice (line "
                                      f"{key_node.start_mark.line + 1}); keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Loader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file, YAML (`.yaml`, `.yml`) or JSON (anything else); keys are setting names
    (`max_length` or `max-length`, each once), and keys starting with `//` are comments."""
    path = Path(path)
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({err})") from None
    if yaml_file:
        import yaml

        try:
            raw = yaml.load(text, Loader=_yaml_loader(path))  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    else:
        try:
            raw = json.loads(text, object_pairs_hook=_json_object(path))
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a {'YAML mapping' if yaml_file else 'JSON object'} of settings")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in values and not name.startswith("//"):  # `max-length` and `max_length` both
            raise ConfigError(f"config file {path}: the setting {name!r} is given twice ({key!r}); keep one")
        if not str(key).startswith("//"):
            values[name] = value
    return values


def build_config(cls: type[ConfigT], file_values: dict[str, Any], overrides: dict[str, Any] | None = None) -> ConfigT:
    """Defaults < config file < explicit overrides, all flat (`top_k`), built into the class's
    groups; unknown keys are an error naming them. Each group checks itself as it is built."""
    values = {**file_values, **(overrides or {})}
    settings = {f.name: (f, hint) for _, f, hint in setting_fields(cls)}
    unknown = sorted(set(values) - set(settings))
    if unknown:
        raise ConfigError(f"unknown setting(s) in config file: {', '.join(unknown)}")
    return _build(cls, {name: _coerce(settings[name][1], settings[name][0], value) for name, value in values.items()})


def _build(cls: type, values: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if _is_group(hint):
            kwargs[f.name] = _build(hint, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _coerce(hint: Any, f: dataclasses.Field, value: Any) -> Any:
    """A config file's value for a setting: JSON gives 2 for 2.0, so an int is accepted for a float
    setting; any other type mismatch is refused naming the flag (a file may hold anything).

    A Literal (or a union with one, such as `int | Literal["auto"]`) takes its words as they are;
    `check_settings` checks the words.
    """
    if typing.get_origin(hint) is Literal or value is None:
        return value
    if value in _words(hint) and isinstance(value, str):
        return value
    allowed = tuple(typing.get_origin(m) or m for m in _members(hint)
                    if typing.get_origin(m) is not Literal and isinstance(typing.get_origin(m) or m, type))
    if not allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{flag_name(f)} must be {_kinds(hint)}; got {value!r}")
    return value


def allowed_values(f: dataclasses.Field, hint: Any) -> str:
    """What `check_setting` accepts, in words, for the docs: a range, or the words of a choice."""
    words = ", ".join(f"`{w}`" for w in _words(hint))
    numeric = any(m in (int, float) for m in _members(hint))
    if not numeric:
        return words
    kind = "number" if float in _members(hint) else "integer"
    bounds = _range_text(f.metadata)
    number = f"{kind}, {bounds}" if bounds else kind
    return f"{number}; or {words}" if words else number


def _table(fields: list[tuple[dataclasses.Field, Any]]) -> str:
    rows = ["| setting | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{flag_name(f)}` | `{default_of(f)!r}` | {allowed_values(f, hint)} | {f.metadata['help']} |"
             for f, hint in fields]
    return "\n".join(rows)


def settings_table(cls: type) -> str:
    """Markdown tables of a config class's settings (docs/configuration.md): one per group, under
    its name and docstring, or one table for a class without groups."""
    groups: dict[str | None, list[tuple[dataclasses.Field, Any]]] = {}
    for group, f, hint in setting_fields(cls):
        groups.setdefault(group, []).append((f, hint))
    if list(groups) == [None]:
        return _table(groups[None])
    parts = []
    for group, fields in groups.items():
        doc = " ".join((_hints(cls)[group].__doc__ or "").split("\n\n")[0].split())
        parts.append(f"### {group}\n\n{doc}\n\n{_table(fields)}")
    return "\n\n".join(parts)
