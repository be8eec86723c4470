"""The distributed edge of stage two: process group, DeepSpeed config and engine, the policy, the final save.

Everything here touches devices, process groups or DeepSpeed; the loop (`loop.py`) only sees the
small `TrainEngine` surface, so it runs in tests against a fake.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.atomic import atomic_path
from selpipe.pipeline.batching import PairBatch
from selpipe.pipeline.config import TrainConfig
from selpipe.pipeline.errors import ConfigError
from selpipe.pipeline.logprobs import check_output_head, completion_logprobs

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


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

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` across ranks, in place."""
        self._dist.all_reduce(tensor)

    def barrier(self) -> None:
        self._dist.barrier()

    def agreed(self, decision: bool, device: torch.device) -> bool:
        """Rank 0's decision, on every rank."""
        flag = torch.tensor([float(decision)], device=device)
        self._dist.broadcast(flag, src=0)
        return bool(flag.item())

    def close(self) -> None:
        self._dist.destroy_process_group()


def use_bf16(precision: str) -> bool:
    if precision == "fp32":
        return False
    available = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not available:
        raise ConfigError("--precision bf16 needs a GPU with bf16 support; use --precision fp32 or auto")
    return available


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The shipped (or given) DeepSpeed JSON with selpipe's settings filled in."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else CONFIG_DIR / f"zero{cfg.zero_stage}.json"
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
    ds["train_batch_size"] = cfg.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps(world_size)
    ds["gradient_clipping"] = cfg.gradient_clipping
    ds["bf16"] = {"enabled": use_bf16(cfg.precision)}
    ds["zero_optimization"] = ds.get("zero_optimization") or {"stage": cfg.zero_stage}
    if ds["zero_optimization"].get("stage", 0) != cfg.zero_stage:
        raise ConfigError(f"--deepspeed-config {path} asks for ZeRO stage {ds['zero_optimization'].get('stage', 0)} but "
                          f"--zero-stage is {cfg.zero_stage}; make them agree")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update(lr=cfg.learning_rate, betas=list(cfg.adam_betas), eps=1e-8, weight_decay=cfg.weight_decay)
    # DeepSpeed's fused Adam needs a CUDA build; on CPU use torch's AdamW (no extension compile).
    params.setdefault("torch_adam", not torch.cuda.is_available())
    return ds


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up, then decay."""
    import math

    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_policy(cfg: TrainConfig, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """The policy; under ZeRO-3 built partitioned across ranks as it loads (HfDeepSpeedConfig).

    Returns (model, the HfDeepSpeedConfig to keep alive for the run, or None).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage") == 3 else None
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        # A missing or damaged weight file, an unknown architecture: the user's to fix.
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--policy {cfg.policy}: cannot load the model ({first[:300]}); give a complete local model "
                          f"directory") from None
    model.config.use_cache = False
    if keep_alive is None:  # (under ZeRO-3 the parameters are already partitioned: no forward outside the engine)
        check_output_head(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keep_alive


class PolicyLogprobs(torch.nn.Module):
    """The policy as DeepSpeed sees it: batch in, completion log-probs out (never full logits)."""

    def __init__(self, policy: torch.nn.Module, chunk_size: int):
        super().__init__()
        self.policy, self.chunk_size = policy, chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        return completion_logprobs(self.policy, input_ids, attention_mask, target_mask, self.chunk_size)


class TrainEngine:
    """What the loop and the evaluator use of a DeepSpeed engine: forward, backward, step."""

    def __init__(self, ds_engine: Any):
        self.ds = ds_engine
        self.device = ds_engine.device

    def logprobs(self, batch: PairBatch) -> torch.Tensor:
        """Flat fp32 log-probs of the batch's completion tokens, row-major."""
        return self.ds(batch.input_ids, batch.attention_mask, batch.target_mask)

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
        return float(norm) if norm is not None else None

    def _norm_before_step(self) -> float | None:
        """The global gradient norm where DeepSpeed does not report one (ZeRO-0 in fp32).

        There the gradients are whole and already averaged across ranks after the boundary's
        backward, so the norm is local arithmetic. Other stages report it after `step()`.
        """
        if self.ds.zero_optimization_stage() != 0 or self.ds.bfloat16_enabled():
            return None
        squares = [p.grad.detach().float().pow(2).sum() for p in self.ds.module.parameters() if p.grad is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()


def build_engine(cfg: TrainConfig, model: torch.nn.Module, ds_config: dict[str, Any], total_steps: int) -> TrainEngine:
    import deepspeed

    wrapper = PolicyLogprobs(model, cfg.logprob_chunk)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=wrapper, model_parameters=[p for p in wrapper.parameters() if p.requires_grad],
        config=copy.deepcopy(ds_config),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps)),
    )
    return TrainEngine(ds_engine)


def save_final_model(engine: TrainEngine, model: Any, tokenizer: Any, directory: Path, rank: int) -> None:
    """`save_pretrained` of the trained policy; under ZeRO-3 its shards are gathered first.

    Written beside `directory` and renamed into place, so `model/` is always a whole model.
    """
    state = None
    if engine.ds.zero_optimization_stage() == 3:
        state = engine.ds._zero3_consolidated_16bit_state_dict()  # a collective: every rank takes part
        if rank == 0:
            state = {k.removeprefix("policy."): v for k, v in state.items()}
    if rank == 0:
        with atomic_path(directory) as staging:
            model.save_pretrained(staging, state_dict=state)
            tokenizer.save_pretrained(staging)


def teardown(engine: TrainEngine, comm: Comm) -> None:
    """The order that keeps gloo from aborting at interpreter exit (see docs/architecture.md)."""
    comm.barrier()
    engine.ds.destroy()
    del engine
    gc.collect()
    comm.close()
    gc.collect()


def abandon(engine: TrainEngine | None, comm: Comm) -> None:
    """Release the engine and the process group after an error, without waiting for other ranks."""
    if engine is not None:
        engine.ds.destroy()
    gc.collect()
    comm.close()
