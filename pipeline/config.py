"""Typed settings: the one source of truth for every option.

Each setting is a dataclass field whose metadata carries its help text. The CLI builds its
options from these fields (see `selpipe.cli.options`), config files are JSON or YAML mappings
with the same keys, and `docs/configuration.md` is generated from them. Validation lives in
`__post_init__`, so a config is valid however it was built: from flags, a file or Python.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
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
LossType = Literal["sigmoid", "sigmoid_norm", "ipo", "hinge", "robust", "simpo"]  # pipeline/loss.py's LOSS_TYPES
RpoTokens = Literal["all", "selected"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "none"]


def setting(default: Any, help: str, *, identity: bool = False, argument: bool = False,
            **kwargs: Any) -> Any:
    """A dataclass field with its help text.

    `identity` marks score-ref settings that change what lands in the cache: a rerun into an
    existing cache must agree on all of them. (The model and the input are not among them: they
    are compared by content, since one may be mounted at another path.) `argument` makes the
    setting a positional command-line argument instead of a flag.
    """
    metadata = {"help": help, "identity": identity, "argument": argument}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _check_choice(cfg: Any, name: str, literal: Any) -> None:
    value = getattr(cfg, name)
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {getattr(cfg, name)}")


@dataclass
class ScoreConfig:
    """Settings of `selpipe score-ref` (stage one)."""

    input: str = setting("", "Preference data: a .jsonl, .json, .jsonl.zst, .parquet or .arrow file; several, comma-separated "
                             "or as a glob; a dataset folder (saved by `datasets`, or as `huggingface-cli download` "
                             "leaves it); or a Hub dataset name the local Hugging Face cache holds.")
    input_config: str | None = setting(None, "Subset (config name) of a dataset folder or Hub dataset.", identity=True)
    output: str = setting("", "Cache directory to write (created if missing; a rerun resumes it).")
    model: str = setting("", "Reference model: a local directory or a name your HF cache already holds.")
    revision: str | None = setting(None, "Model revision to record and load (for hub-style caches).", identity=True)
    backend: Backend = setting("hf", "Scoring backend: `hf` (transformers) or `vllm`.", identity=True)
    dtype: DType = setting("float32", "Weights dtype of the reference; log-softmax is always fp32.", identity=True)
    split: str = setting("train", "Split to read from a dataset folder, saved DatasetDict or Hub dataset.", identity=True)
    max_length: int = setting(1024, "Most tokens in prompt + one completion.", identity=True)
    max_prompt_length: int = setting(512, "Most prompt tokens; longer prompts keep their end.", identity=True)
    truncation: Truncation = setting(
        "truncate",
        "Rows over the limits: `truncate` (prompt keeps its end, completions keep their start) "
        "or `skip` (counted, reason `too_long`).",
        identity=True,
    )
    append_eos: bool = setting(True, "Append the EOS token to string completions (chat completions end with the template's end-of-turn).", identity=True)
    on_bad_row: OnBadRow = setting("error", "Malformed rows: `error` stops with the row and field, `skip` counts them.", identity=True)
    num_workers: int | Literal["auto"] = setting(1, "Number of worker processes sharing this cache; `auto`: from the "
                                                    "Slurm array, Slurm tasks or torchrun (docs/scaling.md).", identity=True)
    worker_index: int | Literal["auto"] = setting(0, "This worker's index in [0, num_workers); `auto`: from the Slurm array, "
                                                     "Slurm tasks or torchrun, whose LOCAL_RANK picks the GPU.")
    shard_size: int = setting(4096, "Input rows per shard (the unit of restart).", identity=True)
    row_group_size: int = setting(256, "Rows per Parquet row group (the unit of streaming).", identity=True)
    token_budget: int | Literal["auto"] = setting(16384, "hf backend: most padded tokens in one forward batch; `auto` "
                                                          "times doubling budgets at start-up and takes the smallest "
                                                          "within 5% of the fastest (reported in the summary; the "
                                                          "batching then depends on the timing, so log-probs may "
                                                          "differ between runs in the last bits).")
    share_prompts: bool = setting(False, "hf backend: score each distinct prompt once for all its completions (same "
                                         "log-probs; faster when prompts are long).")
    logprob_chunk: int = setting(256, "Completion positions per log-softmax chunk: the fp32 buffer is chunk x vocab x 4 bytes.")
    device: str = setting("auto", "hf backend device: auto, cpu, cuda, cuda:N.")
    compile: bool = setting(False, "hf backend: torch.compile the model with frozen weights: about a minute more start-up, "
                                   "then faster scoring (see docs/benchmarks.md); for long runs.")
    tensor_parallel_size: int = setting(1, "vllm backend: GPUs per model.")
    gpu_memory_utilization: float = setting(0.9, "vllm backend: fraction of GPU memory for the engine.")
    kv_cache_memory_bytes: int | None = setting(None, "vllm backend: KV cache size in bytes (needed on CPU).")
    enforce_eager: bool = setting(False, "vllm backend: skip vLLM's torch.compile and CUDA graphs (quicker start-up, slower scoring).")
    progress: bool = setting(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        _check_choice(self, "backend", Backend)
        _check_choice(self, "dtype", DType)
        _check_choice(self, "truncation", Truncation)
        _check_choice(self, "on_bad_row", OnBadRow)
        _check_positive(self, "max_length", "max_prompt_length", "shard_size",
                        "row_group_size", "logprob_chunk", "tensor_parallel_size")
        for name in ("num_workers", "worker_index"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer or auto; got {value!r}")
        if self.num_workers != "auto" and self.num_workers <= 0:
            raise ConfigError(f"--num-workers must be positive; got {self.num_workers}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length "
                f"({self.max_length}) to leave room for a completion"
            )
        if self.worker_index != "auto" and (self.worker_index < 0 or self.num_workers != "auto" and self.worker_index >= self.num_workers):
            raise ConfigError(f"--worker-index must be in [0, {self.num_workers}); got {self.worker_index}")
        if self.token_budget != "auto" and (isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int)):
            raise ConfigError(f"--token-budget must be an integer or auto; got {self.token_budget!r}")
        if self.share_prompts and self.backend != "hf":
            raise ConfigError("--share-prompts is for --backend hf (vLLM has its own prefix caching, off for exact scores)")
        if self.token_budget != "auto" and self.token_budget < self.max_length:
            raise ConfigError(f"--token-budget ({self.token_budget}) must hold one sequence of --max-length ({self.max_length})")

    def identity(self) -> dict[str, Any]:
        """The settings that define the cache's content (see `setting(identity=True)`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}


@dataclass
class TrainConfig:
    """Settings of `selpipe train` (stage two)."""

    cache: str = setting("", "Score cache written by `selpipe score-ref`: scores tokens (and anchors the KL term unless --anchor-scores).")
    policy: str = setting("", "Policy to train: a local model directory (usually the SFT model).")
    output: str = setting("", "Run directory: checkpoints, metrics.jsonl, TensorBoard logs, final model.")
    anchor_scores: str | None = setting(None, "A second cache of the same rows whose log-probs anchor the DPO term.")
    eval_cache: str | None = setting(None, "A score cache to evaluate on (loss, margins, preference accuracy); its own log-probs score and anchor.")
    top_k: float = setting(0.4, "Fraction k of each response's tokens selected by alignment score; 1 is plain DPO.")
    loss_type: LossType = setting("sigmoid", "DPO-family loss over the selected tokens (docs/losses.md): sigmoid, "
                                             "sigmoid_norm, ipo, hinge, robust or simpo.")
    beta: float = setting(0.01, "DPO temperature beta (SimPO's and IPO's beta for those losses).")
    label_smoothing: float = setting(0.0, "Label smoothing eps: conservative DPO for sigmoid, the flip rate for robust.")
    simpo_gamma: float = setting(0.5, "SimPO's target reward margin gamma (--loss-type simpo).")
    rpo_alpha: float = setting(0.0, "Weight of an NLL term on the chosen response added to the loss (RPO); 0 disables.")
    rpo_tokens: RpoTokens = setting("all", "Chosen tokens the RPO term averages over: all, or only the selected ones.")
    learning_rate: float = setting(5e-7, "Peak learning rate of AdamW.")
    min_lr_ratio: float = setting(0.0, "Final learning rate as a fraction of the peak (--schedule cosine_with_min_lr).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    adam_betas: list = setting([0.9, 0.999], "AdamW betas (beta1,beta2).")
    schedule: Schedule = setting("cosine", "Learning-rate decay after warm-up (transformers.get_scheduler): linear, "
                                           "cosine, cosine_with_min_lr (down to --min-lr-ratio) or constant.")
    warmup_steps: int = setting(0, "Optimizer steps of linear warm-up from 0.")
    max_steps: int = setting(0, "Optimizer steps to run; 0 means --epochs full passes.")
    epochs: int = setting(1, "Passes over the cache when --max-steps is 0.")
    global_batch_size: int = setting(32, "Pairs per optimizer step across all ranks.")
    micro_batch_size: int = setting(4, "Pairs per forward pass on one rank.")
    gradient_clipping: float = setting(1.0, "Clip the global gradient norm to this (0 disables).")
    zero_stage: int = setting(0, "DeepSpeed ZeRO stage 0-3; picks configs/zero{N}.json (a --deepspeed-config must ask for the same stage).")
    deepspeed_config: str | None = setting(None, "A DeepSpeed JSON to use instead of the shipped one (batch sizes, optimizer and precision are filled in from these settings).")
    precision: Precision = setting("auto", "auto: bf16 on GPUs that support it, else fp32. fp16: mixed precision with "
                                           "DeepSpeed's dynamic loss scaling, for GPUs without bf16.")
    lora_rank: int = setting(0, "LoRA rank r (PEFT); 0 trains every weight.")
    lora_alpha: float = setting(16.0, "LoRA alpha (the adapter's scale is alpha / r).")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input.")
    lora_target_modules: str = setting("", "Comma-separated module names to adapt, or all-linear; default: the "
                                           "architecture's attention and MLP projections.")
    load_in_4bit: bool = setting(False, "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); needs --lora-rank.")
    merge_adapter: bool = setting(False, "With LoRA: also save model-merged/, the base with the adapter merged in.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    logprob_chunk: int = setting(256, "Completion positions per log-softmax chunk: peak memory is about 3 x chunk x vocab x 4 bytes.")
    length_sorted_micro_batches: bool = setting(True, "Order each step's pairs by length before cutting micro batches "
                                                      "(less padding; the step sees the same pairs).")
    selective_head: bool = setting(True, "Recompute the output head with gradient at the selected tokens only (the "
                                         "same gradient; less head work at k < 1).")
    prefix_sharing: bool = setting(False, "Forward each pair's prompt once for both responses (one packed row, a "
                                          "block-causal mask; needs sdpa or eager attention).")
    length_bucketing: bool = setting(False, "Group pairs of similar length into the same global batch within each "
                                            "shuffle window (changes which pairs share a step).")
    shuffle_window: int = setting(16, "Row groups shuffled together (the stream's shuffle buffer).")
    seed: int = setting(0, "Seed of the shuffle and of any randomness in the run.")
    save_every: int = setting(0, "Checkpoint every N optimizer steps (0: only at the end).")
    save_hf_checkpoints: bool = setting(False, "Beside each checkpoint also write hf/, loadable with from_pretrained "
                                               "(the adapter with LoRA); else `selpipe export` makes one on demand.")
    keep_checkpoints: int = setting(2, "Most recent checkpoints kept on disk.")
    eval_every: int = setting(0, "Evaluate every N optimizer steps (0: at start and end only).")
    log_every: int = setting(1, "Write metrics every N optimizer steps.")
    report_to: str = setting("tensorboard", "Trackers, comma-separated: tensorboard, wandb, mlflow, or none (metrics.jsonl "
                                            "is always written). wandb and mlflow honour their usual environment "
                                            "variables (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, ...).")
    resume: bool = setting(False, "Continue from the last checkpoint in --output (starts fresh if there is none).")
    save_model: bool = setting(True, "Save the final policy with save_pretrained.")
    progress: bool = setting(True, "Show a progress bar (rank 0).")

    def __post_init__(self) -> None:
        for name in ("cache", "policy", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if not 0.0 < self.top_k <= 1.0:
            raise ConfigError(f"--top-k must be in (0, 1]; got {self.top_k}. Use 1 for plain DPO.")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be positive; got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5); got {self.label_smoothing}")
        _check_choice(self, "loss_type", LossType)
        _check_choice(self, "rpo_tokens", RpoTokens)
        try:
            self.loss_settings()
        except ValueError as err:
            raise ConfigError(f"--loss-type {self.loss_type}: {err}") from None
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("--lora-rank must be >= 0, --lora-alpha > 0 and --lora-dropout in [0, 1)")
        if (self.load_in_4bit or self.merge_adapter) and not self.lora_rank:
            raise ConfigError("--load-in-4bit and --merge-adapter train or merge an adapter: set --lora-rank too")
        unknown = [t for t in self.trackers() if t not in get_args(Tracker)]
        if unknown:
            raise ConfigError(f"--report-to {','.join(unknown)} is not a tracker; choose from {', '.join(get_args(Tracker))}")
        if len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"--adam-betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {self.adam_betas}")
        for name in ("seed", "save_every", "eval_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 0; got {getattr(self, name)}")
        if self.min_lr_ratio and self.schedule != "cosine_with_min_lr":
            raise ConfigError(f"--min-lr-ratio applies to --schedule cosine_with_min_lr only; got --schedule {self.schedule}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3; got {self.zero_stage}")
        _check_choice(self, "schedule", Schedule)
        _check_choice(self, "precision", Precision)
        _check_positive(self, "global_batch_size", "micro_batch_size", "logprob_chunk", "shuffle_window",
                        "log_every", "keep_checkpoints")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--global-batch-size ({self.global_batch_size}) must be a multiple of "
                f"--micro-batch-size ({self.micro_batch_size})"
            )
        if self.max_steps < 0 or self.epochs <= 0 and self.max_steps == 0:
            raise ConfigError("set --max-steps > 0 or --epochs > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1]; got {self.min_lr_ratio}")

    def loss_settings(self) -> Any:
        """The loss's hyperparameters (`pipeline.loss.LossSettings`), validated."""
        from .loss import LossSettings

        return LossSettings(loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
                            simpo_gamma=self.simpo_gamma, rpo_alpha=self.rpo_alpha, rpo_tokens=self.rpo_tokens)

    def trackers(self) -> list[str]:
        """--report-to as a list; `none` alone means no tracker but metrics.jsonl."""
        return [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]

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


@dataclass
class InspectConfig:
    """Settings of `selpipe inspect`: what a cache holds, and optionally a page of sample pairs."""

    cache: str = setting("", "Score cache directory.", argument=True)
    html: str | None = setting(None, "Also write an HTML page of sample pairs, tokens shaded.")
    policy: str | None = setting(None, "With --html: shade by alignment score against this policy and mark the selected "
                                       "tokens (else shade by reference log-prob).")
    samples: int = setting(8, "With --html: pairs to render.")
    top_k: float = setting(0.4, "With --html and --policy: the k of the mask.")
    seed: int = setting(0, "With --html: seed of the sample.")

    def __post_init__(self) -> None:
        if not self.cache:
            raise ConfigError("CACHE is required: give a score cache directory")
        _check_positive(self, "samples")
        if not 0.0 < self.top_k <= 1.0:
            raise ConfigError(f"--top-k must be in (0, 1]; got {self.top_k}")


@dataclass
class VerifyConfig:
    """Settings of `selpipe verify`: recompute a random sample of a cache with transformers."""

    cache: str = setting("", "Score cache directory.", argument=True)
    model: str = setting("", "The reference model, loaded with transformers.")
    sample: int = setting(64, "Pairs to recompute.")
    tolerance: float = setting(1e-3, "Largest per-token |difference| that passes.")
    seed: int = setting(0, "Seed of the sample.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N.")
    dtype: DType | None = setting(None, "Weights dtype (default: the cache's).")
    token_budget: int = setting(16384, "Most padded tokens in one forward batch.")

    def __post_init__(self) -> None:
        if not self.cache:
            raise ConfigError("CACHE is required: give a score cache directory")
        if not self.model:
            raise ConfigError("--model is required")
        _check_positive(self, "sample", "token_budget")
        if self.tolerance < 0:
            raise ConfigError(f"--tolerance must be at least 0; got {self.tolerance}")
        if self.dtype is not None:
            _check_choice(self, "dtype", DType)


ExportStep = Literal["best", "latest"]


@dataclass
class ExportConfig:
    """Settings of `selpipe export`: a training run's checkpoint as a Hugging Face model (or LoRA adapter)."""

    run: str = setting("", "Training run directory (the --output of `selpipe train`).", argument=True)
    output: str = setting("", "Directory to write, new or empty: a model for AutoModelForCausalLM.from_pretrained, or "
                              "for a LoRA run an adapter for PeftModel.from_pretrained.")
    step: int | ExportStep = setting("latest", "Checkpoint to export: its step, `latest`, or `best` (the kept checkpoint "
                                               "whose logged --metric is best).")
    metric: str = setting("eval/loss", "With --step best: the metrics.jsonl key that ranks the checkpoints; the lowest "
                                       "wins unless --greater-is-better.")
    greater_is_better: bool = setting(False, "With --step best: the highest --metric wins (for accuracies).")
    merge: bool = setting(False, "For a LoRA run: write the base with the adapter merged in, a full model.")
    policy: str | None = setting(None, "The base model the run trained (default: the run's --policy); give it where "
                                       "that directory has moved.")

    def __post_init__(self) -> None:
        if not self.run:
            raise ConfigError("RUN is required: give a training run directory")
        if not self.output:
            raise ConfigError("--output is required")
        if self.step not in get_args(ExportStep) and (isinstance(self.step, bool) or not isinstance(self.step, int)
                                                      or self.step <= 0):
            raise ConfigError(f"--step must be a positive integer, best or latest; got {self.step!r}")
        if not self.metric:
            raise ConfigError("--metric must name a metrics.jsonl key, such as eval/loss")


ConfigT = TypeVar("ConfigT", ScoreConfig, TrainConfig, InspectConfig, VerifyConfig, ExportConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _yaml_loader() -> Any:
    """PyYAML's safe loader, but reading `5e-7` as the float YAML 1.2 makes it (YAML 1.1 wants `5.0e-7`)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Loader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file, YAML (`.yaml`, `.yml`) or JSON (anything else); keys are setting names
    (`max_length` or `max-length`), and keys starting with `//` are comments."""
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
            raw = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a {'YAML mapping' if yaml_file else 'JSON object'} of settings")
    return {str(key).replace("-", "_"): value for key, value in raw.items() if not str(key).startswith("//")}


def build_config(cls: type[ConfigT], file_values: dict[str, Any], overrides: dict[str, Any]) -> ConfigT:
    """Defaults < config file < explicit overrides; unknown keys are an error naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in config file: {', '.join(unknown)}")
    return cls(**{name: _coerce(cls, name, value) for name, value in {**file_values, **overrides}.items()})


def _coerce(cls: type, name: str, value: Any) -> Any:
    """JSON gives 2 for 2.0; accept an int for a float setting, refuse any other type mismatch.

    A Literal (or a union with one, such as `int | Literal["auto"]`) takes its words as they are;
    `__post_init__` checks the words.
    """
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is Literal or value is None:
        return value
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    words = [word for member in members if typing.get_origin(member) is Literal for word in typing.get_args(member)]
    if value in words and isinstance(value, str):
        return value
    allowed = tuple(typing.get_origin(m) or m for m in members
                    if typing.get_origin(m) is not Literal and isinstance(typing.get_origin(m) or m, type) and m is not type(None))
    if not allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = [a.__name__ for a in allowed] + [repr(word) for word in words]
        raise ConfigError(f"setting {name!r} must be {' or '.join(names)}; got {value!r}")
    return value


def settings_table(cls: type) -> str:
    """A Markdown table of a config class's settings (used for docs/configuration.md)."""
    rows = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = f.name.upper() if f.metadata["argument"] else f"--{f.name.replace('_', '-')}"
        rows.append(f"| `{name}` | `{default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
