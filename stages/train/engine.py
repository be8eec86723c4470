"""The distributed edge of stage two: process group, DeepSpeed config and engine, the policy.

Everything here touches devices, process groups or DeepSpeed; the loop (`loop.py`) only sees the
small `TrainEngine` surface, so it runs in tests against a fake.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from selpipe.pipeline.batching import PairBatch
from selpipe.pipeline.config import ModelConfig, TrainConfig
from selpipe.pipeline.errors import CacheError, ConfigError, InputError, SelpipeError, StorageError
from selpipe.pipeline.model import load_causal_lm
from selpipe.pipeline.forward import PolicyForward
from selpipe.pipeline.logprobs import check_output_head
from selpipe.pipeline.prefix import SharedPromptBatch, check_shared_prompts

T = TypeVar("T")
# The one-line errors rank 0 can hand to the other ranks, by name.
SHARED_ERRORS = {cls.__name__: cls for cls in (ConfigError, CacheError, InputError, StorageError)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Comm:
    """The few collective calls the trainer makes, over `deepspeed.comm` (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        import deepspeed
        import deepspeed.comm as dist

        # A single process started without a launcher runs as rank 0 of 1 (else DeepSpeed looks for MPI).
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        deepspeed.init_distributed(verbose=False)
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.closed = False

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` across ranks, in place."""
        self._dist.all_reduce(tensor)

    def barrier(self) -> None:
        self._dist.barrier()

    @property
    def device(self) -> torch.device:
        """Where this rank's collective tensors live (NCCL needs them on the rank's GPU)."""
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def agreed(self, decision: bool, device: torch.device | None = None) -> bool:
        """Rank 0's decision, on every rank."""
        flag = torch.tensor([float(decision)], device=device or self.device)
        self._dist.broadcast(flag, src=0)
        return bool(flag.item())

    def broadcast_text(self, text: str | None) -> str | None:
        """Rank 0's `text` (None: nothing to say) on every rank, as UTF-8 bytes (nothing unpickled)."""
        data = (text or "").encode()
        size = torch.tensor([len(data) if text is not None and self.rank == 0 else -1], device=self.device)
        if self.world_size == 1:
            return text
        self._dist.broadcast(size, src=0)
        if size.item() < 0:
            return None
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            buffer = torch.tensor(list(data), dtype=torch.uint8, device=self.device)
        if buffer.numel():
            self._dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()

    def on_rank_zero(self, work: Callable[[], T]) -> T | None:
        """`work()` on rank 0 alone (a check every rank would repeat, a file only one may write); its
        one-line error, if any, raised on every rank. Rank 0 gets the result, the others None."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except Exception as err:  # a bug too: the other ranks must not wait for rank 0 forever
                error = err
        verdict = self.broadcast_text(None if error is None else f"{type(error).__name__}\n{error}")
        if error is not None:
            raise error
        if verdict is not None:
            kind, message = verdict.split("\n", 1)
            raise SHARED_ERRORS.get(kind, SelpipeError)(message.splitlines()[0] if message else f"rank 0 failed ({kind})")
        return result

    def close(self) -> None:
        self._dist.destroy_process_group()
        self.closed = True


def mixed_precision(precision: str) -> str | None:
    """The DeepSpeed mixed-precision mode (`bf16`, `fp16`) or None for fp32."""
    cuda = torch.cuda.is_available()
    if precision == "fp32":
        return None
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else None
    if not cuda or (precision == "bf16" and not torch.cuda.is_bf16_supported()):
        raise ConfigError(f"--precision {precision} needs a GPU that supports it; use --precision fp32 or auto")
    return precision


def shipped_config(name: str) -> Path:
    """A config shipped in configs/ (the package `selpipe.configs` once installed)."""
    from importlib.util import find_spec

    # A data-only package (no __init__.py): its one search location is the directory.
    return Path(list(find_spec("selpipe.configs").submodule_search_locations)[0]) / name


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The shipped (or given) DeepSpeed JSON with selpipe's settings filled in."""
    path = Path(cfg.model.deepspeed_config) if cfg.model.deepspeed_config else shipped_config(f"zero{cfg.model.zero_stage}.json")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed-config {path} does not exist; give a DeepSpeed JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--deepspeed-config {path} is not a readable JSON file ({err}); fix or replace it") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("zero_optimization", {}), dict) \
            or not isinstance(raw.get("optimizer", {}), dict):
        raise ConfigError(f"--deepspeed-config {path} must hold a JSON object whose zero_optimization and optimizer "
                          f"are objects")
    ds = {k: v for k, v in raw.items() if not k.startswith("//")}
    ds["train_batch_size"] = cfg.batch.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = cfg.batch.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.batch.gradient_accumulation_steps(world_size)
    ds["gradient_clipping"] = cfg.schedule.gradient_clipping
    mode = mixed_precision(cfg.model.precision)
    ds["bf16"] = {"enabled": mode == "bf16"}
    # fp16 needs loss scaling; DeepSpeed's dynamic scaler skips a step whose gradients overflow.
    ds["fp16"] = {"enabled": mode == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    ds["zero_optimization"] = ds.get("zero_optimization") or {"stage": cfg.model.zero_stage}
    if ds["zero_optimization"].get("stage", 0) != cfg.model.zero_stage:
        raise ConfigError(f"--deepspeed-config {path} asks for ZeRO stage {ds['zero_optimization'].get('stage', 0)} but "
                          f"--zero-stage is {cfg.model.zero_stage}; make them agree")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update(lr=cfg.schedule.learning_rate, betas=list(cfg.schedule.adam_betas), eps=1e-8, weight_decay=cfg.schedule.weight_decay)
    # DeepSpeed's fused Adam needs a CUDA build; on CPU use torch's AdamW (no extension compile).
    params.setdefault("torch_adam", not torch.cuda.is_available())
    return ds


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    return torch.float16 if ds_config["fp16"]["enabled"] else torch.float32


def load_policy(cfg: TrainConfig, ds_config: dict[str, Any], max_width: int | None = None) -> tuple[Any, Any, Any]:
    """(the causal LM the log-probs come from, its PEFT wrapper or None, the ZeRO-3 context or None).

    `max_width`: the longest packed row prefix sharing can build (prompt and both responses).

    Under ZeRO-3 the model is built partitioned across ranks as it loads (HfDeepSpeedConfig, kept
    alive for the run). With --lora-rank, PEFT injects adapters into the loaded model in place, so
    the causal LM computes with them and only their weights train.
    """
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config["zero_optimization"].get("stage") == 3
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None
    extra: dict[str, Any] = {}
    if cfg.model.load_in_4bit:
        extra["quantization_config"] = four_bit_config(zero3)
    model = load_causal_lm(cfg.io.policy, dtype=compute_dtype(ds_config), **extra)
    model.config.use_cache = False
    if keep_alive is None and not cfg.model.load_in_4bit:
        # (under ZeRO-3 the parameters are partitioned: no forward outside the engine)
        check_output_head(model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.prefix_sharing:
        check_shared_prompts(model, width=max_width)
    peft_model = add_adapter(cfg.model, model) if cfg.model.lora_rank else None
    return model, peft_model, keep_alive


def four_bit_config(zero3: bool) -> Any:
    """QLoRA's NF4 base, where bitsandbytes can run it (CUDA); a one-line refusal elsewhere."""
    if not torch.cuda.is_available():
        raise ConfigError("--load-in-4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); train without it here, or "
                          "with plain --lora-rank")
    if zero3:
        raise ConfigError("--load-in-4bit cannot be partitioned by ZeRO-3; use --zero-stage 0, 1 or 2")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


# The attention and MLP projections of the common decoder families (Llama, Qwen, Mistral, Gemma, Phi-3).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "qkv_proj", "gate_up_proj")


def lora_targets(cfg: ModelConfig, model: torch.nn.Module) -> list[str] | str:
    if cfg.lora_target_modules == "all-linear":
        return "all-linear"
    if cfg.lora_target_modules:
        wanted = [name.strip() for name in cfg.lora_target_modules.split(",") if name.strip()]
    else:
        wanted = list(DEFAULT_LORA_TARGETS)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [name for name in wanted if name in present]
    if not found or (cfg.lora_target_modules and len(found) < len(wanted)):
        missing = sorted(set(wanted) - present)
        raise ConfigError(f"--lora-target-modules: {type(model).__name__} has no module named {', '.join(missing)}; "
                          f"name its linear layers or use all-linear")
    return found


def add_adapter(cfg: ModelConfig, model: torch.nn.Module) -> Any:
    """Inject LoRA adapters (PEFT) into `model` in place; returns the PeftModel that saves them."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(cfg, model), task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lora)


class PolicyLogprobs(torch.nn.Module):
    """The policy as DeepSpeed sees it: batch in, completion log-probs out (never full logits)."""

    def __init__(self, policy: torch.nn.Module, policy_forward: PolicyForward):
        super().__init__()
        self.policy, self.policy_forward = policy, policy_forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                select: Callable[[torch.Tensor], torch.Tensor] | None = None,
                packed: SharedPromptBatch | None = None) -> torch.Tensor:
        """Flat completion log-probs, computed the way `pipeline.forward.PolicyForward` chooses: `select`
        limits the head's gradient to the tokens it picks, `packed` shares each prompt."""
        return self.policy_forward.logprobs(self.policy, input_ids, attention_mask, target_mask, select, packed)


class TrainEngine:
    """What the loop and the evaluator use of a DeepSpeed engine: forward, backward, step."""

    def __init__(self, ds_engine: Any):
        self.ds = ds_engine
        self.device = ds_engine.device

    def logprobs(self, batch: PairBatch, select: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 packed: SharedPromptBatch | None = None) -> torch.Tensor:
        """Flat fp32 log-probs of the batch's completion tokens, row-major (see `PolicyLogprobs`)."""
        return self.ds(batch.input_ids, batch.attention_mask, batch.target_mask, select=select, packed=packed)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def lr(self) -> float:
        """The rate the next optimizer step applies (the scheduler moves on inside `step`)."""
        return self.ds.get_lr()[0]

    def step(self) -> float | None:
        """DeepSpeed's step after each micro batch; at the accumulation boundary it applies the update
        and this returns the global gradient norm before clipping (None where DeepSpeed has none)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        norm = self._norm_before_step() if boundary else None
        self.ds.step()
        if not boundary:
            return None
        if norm is None:
            norm = self.ds.get_global_grad_norm()
        if norm is None or (self.ds.fp16_enabled() and not math.isfinite(float(norm))):
            # Under fp16 an overflow is DeepSpeed's to handle: it skips the step and lowers the loss scale.
            return None
        return float(norm)

    def _norm_before_step(self) -> float | None:
        """The global gradient norm where DeepSpeed does not report one (ZeRO-0 in fp32).

        There the gradients are whole and already averaged across ranks after the boundary's
        backward, so the norm is local arithmetic. Other stages report it after `step()`.
        """
        if self.ds.zero_optimization_stage() != 0 or self.ds.bfloat16_enabled() or self.ds.fp16_enabled():
            return None
        squares = [p.grad.detach().float().pow(2).sum() for p in self.ds.module.parameters() if p.grad is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    def weights_finite(self) -> bool:
        """Whether this rank's weights (its ZeRO-3 partition, else the module's) hold no NaN or inf."""
        for parameter in self.ds.module.parameters():
            local = getattr(parameter, "ds_tensor", parameter)  # ZeRO-3 keeps the rank's slice there
            if not torch.isfinite(local.detach()).all():
                return False
        return True

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()


def learning_rate_schedule(cfg: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    """transformers' schedule of that name, warming up linearly over --warmup-steps."""
    from transformers import get_scheduler

    extra = {"min_lr_rate": cfg.schedule.min_lr_ratio} if cfg.schedule.schedule == "cosine_with_min_lr" else {}
    name = "constant_with_warmup" if cfg.schedule.schedule == "constant" else cfg.schedule.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.schedule.warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)


def build_engine(cfg: TrainConfig, model: torch.nn.Module, ds_config: dict[str, Any], total_steps: int) -> TrainEngine:
    import deepspeed

    wrapper = PolicyLogprobs(model, PolicyForward.of(cfg.model, cfg.loss))
    ds_engine, _, _, _ = deepspeed.initialize(
        model=wrapper, model_parameters=[p for p in wrapper.parameters() if p.requires_grad],
        config=copy.deepcopy(ds_config),
        lr_scheduler=lambda optimizer: learning_rate_schedule(cfg, optimizer, total_steps),
    )
    return TrainEngine(ds_engine)


def weight_shapes(model: torch.nn.Module) -> str:
    """A digest of the base model's weight names and shapes (ZeRO-3's partitioned parameters by
    their whole shape; LoRA's adapters left out, the layers they wrap by their own names): a resume
    refuses a policy of another size before DeepSpeed loads into it."""
    shapes = {name.replace(".base_layer.", "."): list(getattr(p, "ds_shape", p.shape))
              for name, p in model.named_parameters() if "lora_" not in name}
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()


def teardown(engine: TrainEngine, comm: Comm) -> None:
    """The order that keeps gloo from aborting at interpreter exit (see docs/architecture.md)."""
    comm.barrier()
    engine.ds.destroy()
    del engine
    gc.collect()
    comm.close()
    gc.collect()


def abandon(engine: TrainEngine | None, comm: Comm) -> None:
    """Release the engine and the process group after an error, without waiting for other ranks
    (nothing to do after a `teardown`)."""
    if comm.closed:
        return
    if engine is not None:
        engine.ds.destroy()
    gc.collect()
    comm.close()
