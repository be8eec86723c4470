"""Stage two: `selpipe train`, Selective-DPO on DeepSpeed from a score cache.

cache -> per-rank stream -> micro batches -> policy log-probs at completion positions ->
alignment scores -> top-k mask -> masked DPO loss -> DeepSpeed step.

Launch with one process (no launcher needed), or with `torchrun`/`deepspeed` for several
processes and nodes. Without a GPU DeepSpeed runs on CPU with gloo.

Run directory:
    config.json                 the resolved TrainConfig and the DeepSpeed config it produced
    metrics.jsonl               one object per logged optimizer step, eval rows prefixed `eval/`
    tensorboard/                the same metrics for TensorBoard
    checkpoints/step-N/         DeepSpeed checkpoint + stream position, RNG states, config,
                                the caches' content digests and the eval history
    checkpoints/latest          name of the newest complete checkpoint (written last)
    summary.json                what the run did (also printed by `selpipe train`)
    model/                      the final policy, `save_pretrained` with its tokenizer
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.batching import PairBatch, collate_pairs
from selpipe.pipeline.cache import (
    CacheError, cache_identity, check_tokenizer, iter_row_groups, load_manifest, read_rows, verify_checksums, write_json_atomic,
)
from selpipe.pipeline.config import ConfigError, TrainConfig, to_dict
from selpipe.pipeline.logprobs import check_output_head, completion_logprobs, to_padded
from selpipe.pipeline.loss import selective_dpo_loss
from selpipe.pipeline.selection import quantile_threshold
from selpipe.pipeline.stream import CacheStream, StreamPosition, eval_shards
from selpipe.pipeline.tokenization import tokenizer_fingerprint

from selpipe.pipeline.tokenization import load_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class PolicyLogprobs(torch.nn.Module):
    """The policy as DeepSpeed sees it: batch in, completion log-probs out (never full logits)."""

    def __init__(self, policy: torch.nn.Module, chunk_size: int):
        super().__init__()
        self.policy, self.chunk_size = policy, chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        return completion_logprobs(self.policy, input_ids, attention_mask, target_mask, self.chunk_size)


# ---------------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_distributed_env() -> None:
    """A single process started without a launcher runs as rank 0 of 1 (else DeepSpeed looks for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


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
        ds = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("//")}
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    ds["train_batch_size"] = cfg.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps(world_size)
    ds["gradient_clipping"] = cfg.gradient_clipping
    ds["bf16"] = {"enabled": use_bf16(cfg.precision)}
    ds["zero_optimization"] = ds.get("zero_optimization") or {"stage": cfg.zero_stage}
    if ds["zero_optimization"].get("stage", 0) != cfg.zero_stage:
        raise ConfigError(f"{path} asks for ZeRO stage {ds['zero_optimization'].get('stage', 0)} but --zero-stage is "
                          f"{cfg.zero_stage}; make them agree")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update(lr=cfg.learning_rate, betas=list(cfg.adam_betas), eps=1e-8, weight_decay=cfg.weight_decay)
    # DeepSpeed's fused Adam needs a CUDA build; on CPU use torch's AdamW (no extension compile).
    params.setdefault("torch_adam", not torch.cuda.is_available())
    return ds


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Caches:
    train: dict[str, Any]
    anchor: dict[str, Any] | None
    eval: dict[str, Any] | None


def validate_caches(cfg: TrainConfig, tokenizer: Any) -> Caches:
    """Refuse, before any training, a cache that is incomplete, altered, or from another tokenizer."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    loaded = {}
    for name, path in (("train", cfg.cache), ("anchor", cfg.anchor_scores), ("eval", cfg.eval_cache)):
        if path is None:
            loaded[name] = None
            continue
        manifest = load_manifest(path)
        verify_checksums(path, manifest)
        check_tokenizer(path, manifest, fingerprint)
        loaded[name] = manifest
    if loaded["eval"] is not None and loaded["eval"]["totals"]["rows"] == 0:
        raise CacheError(f"{cfg.eval_cache}: the eval cache holds no rows (see `selpipe inspect` for why); "
                         f"drop --eval-cache or rescore it")
    if loaded["anchor"] is not None:
        _check_anchor(cfg, loaded["train"], loaded["anchor"])
    return Caches(**loaded)


def _check_anchor(cfg: TrainConfig, train: dict[str, Any], anchor: dict[str, Any]) -> None:
    if train["tokenization"] != anchor["tokenization"]:
        raise CacheError(f"{cfg.anchor_scores}: the anchor cache was tokenized with {anchor['tokenization']}, "
                         f"{cfg.cache} with {train['tokenization']}; score both with the same limits")
    # The stream reads the anchor row group by row group beside the scoring cache's.
    if list(iter_row_groups(cfg.cache, train)) != list(iter_row_groups(cfg.anchor_scores, anchor)):
        raise CacheError(f"{cfg.anchor_scores}: the anchor cache's shards or row groups differ from {cfg.cache}'s; "
                         f"score the anchor from the same input with the same --num-workers, --shard-size, "
                         f"--row-group-size and limits")
    train_ids = [r["id"] for r in read_rows(cfg.cache, train, columns=["id"])]
    anchor_ids = [r["id"] for r in read_rows(cfg.anchor_scores, anchor, columns=["id"])]
    if train_ids != anchor_ids:
        first = next(i for i, (a, b) in enumerate(zip(train_ids, anchor_ids)) if a != b)
        raise CacheError(f"{cfg.anchor_scores}: the anchor cache has different row ids (row {first}: "
                         f"{anchor_ids[first]!r}, scoring cache has {train_ids[first]!r}); score both from the same input")


def load_policy(cfg: TrainConfig, ds_config: dict[str, Any]):
    """The policy; under ZeRO-3 built partitioned across ranks as it loads (HfDeepSpeedConfig)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage") == 3 else None
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=dtype)
    model.config.use_cache = False
    if keep_alive is None:  # (under ZeRO-3 the parameters are already partitioned: no forward outside the engine)
        check_output_head(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keep_alive


# ---------------------------------------------------------------------------- the step


# Quantiles of each response's alignment scores, logged as their mean over responses.
SCORE_QUANTILES = {"q10": 0.1, "q50": 0.5, "q90": 0.9}
SUM_KEYS = ("pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "implicit/accuracies", "implicit/loss",
            "selected/chosen", "selected/rejected", "tokens/chosen", "tokens/rejected", "scores/chosen", "scores/rejected",
            "threshold/chosen", "threshold/rejected", "tokens",
            *(f"{name}/{side}" for name in SCORE_QUANTILES for side in ("chosen", "rejected")))


def forward_loss(engine: Any, batch: PairBatch, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """Mean loss of the micro batch's real pairs, and the sums its metrics are made of."""
    flat = engine(batch.input_ids, batch.attention_mask, batch.target_mask)
    policy, _ = to_padded(flat, batch.completion_lengths)
    pairs = batch.pairs
    mask = batch.completion_mask
    out = selective_dpo_loss(
        policy[:pairs], policy[pairs:], batch.reference[:pairs], batch.reference[pairs:], mask[:pairs], mask[pairs:],
        top_k=cfg.top_k, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        anchor_chosen=batch.anchor[:pairs], anchor_rejected=batch.anchor[pairs:],
    )
    w = batch.weights
    loss = (out.losses * w).sum() / w.sum().clamp(min=1)
    with torch.no_grad():
        full = (policy.detach() - batch.anchor) * mask
        implicit_margin = full[:pairs].sum(1) - full[pairs:].sum(1)
        sums = {
            "pairs": w.sum(), "loss": (out.losses.detach() * w).sum(),
            "rewards/chosen": (out.chosen_rewards * w).sum(), "rewards/rejected": (out.rejected_rewards * w).sum(),
            "rewards/accuracies": ((out.chosen_rewards > out.rejected_rewards).float() * w).sum(),
            # A tie (the policy still equals the anchor) is a coin flip, not a loss.
            "implicit/accuracies": (((implicit_margin > 0).float() + 0.5 * (implicit_margin == 0).float()) * w).sum(),
            # Plain DPO's loss on the same pairs: comparable across runs of different k, unlike `loss`.
            "implicit/loss": (-torch.nn.functional.logsigmoid(cfg.beta * implicit_margin) * w).sum(),
            "selected/chosen": (out.chosen_selected.sum(1) * w).sum(),
            "selected/rejected": (out.rejected_selected.sum(1) * w).sum(),
            "tokens/chosen": (mask[:pairs].sum(1) * w).sum(), "tokens/rejected": (mask[pairs:].sum(1) * w).sum(),
            "scores/chosen": ((out.chosen_scores * mask[:pairs]).sum(1) * w).sum(),
            "scores/rejected": ((out.rejected_scores * mask[pairs:]).sum(1) * w).sum(),
            "threshold/chosen": (out.chosen_threshold * w).sum(), "threshold/rejected": (out.rejected_threshold * w).sum(),
            "tokens": batch.attention_mask.sum().float(),
        }
        for name, q in SCORE_QUANTILES.items():
            # The q-quantile is the threshold of top-k with k = 1 - q.
            sums[f"{name}/chosen"] = (quantile_threshold(out.chosen_scores, mask[:pairs], 1 - q) * w).sum()
            sums[f"{name}/rejected"] = (quantile_threshold(out.rejected_scores, mask[pairs:], 1 - q) * w).sum()
    return loss, sums, out


def _grad_norm_before_step(engine: Any) -> float | None:
    """The global gradient norm where DeepSpeed does not report one (ZeRO-0 in fp32).

    There the gradients are whole and already averaged across ranks after the boundary's
    backward, so the norm is local arithmetic. Other stages report it after `step()`.
    """
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled():
        return None
    squares = [p.grad.detach().float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def reduce_metrics(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Sum every counter across ranks, then divide: token means are exact, not means of means."""
    import deepspeed.comm as dist

    vector = torch.stack([sums[k].float().to(device) for k in SUM_KEYS])
    dist.all_reduce(vector)
    total = dict(zip(SUM_KEYS, vector.tolist()))
    pairs = max(total["pairs"], 1.0)
    chosen, rejected = total["rewards/chosen"] / pairs, total["rewards/rejected"] / pairs
    return {
        "loss": total["loss"] / pairs,
        "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
        "rewards/accuracies": total["rewards/accuracies"] / pairs,
        "preference_accuracy": total["implicit/accuracies"] / pairs,
        "dpo_loss": total["implicit/loss"] / pairs,
        "selected_fraction/chosen": total["selected/chosen"] / max(total["tokens/chosen"], 1.0),
        "selected_fraction/rejected": total["selected/rejected"] / max(total["tokens/rejected"], 1.0),
        "scores/chosen_mean": total["scores/chosen"] / max(total["tokens/chosen"], 1.0),
        "scores/rejected_mean": total["scores/rejected"] / max(total["tokens/rejected"], 1.0),
        # tau, the (1 - k) quantile of each response's scores, averaged over responses.
        "scores/chosen_threshold": total["threshold/chosen"] / pairs,
        "scores/rejected_threshold": total["threshold/rejected"] / pairs,
        **{f"scores/{side}_{name}": total[f"{name}/{side}"] / pairs for name in SCORE_QUANTILES for side in ("chosen", "rejected")},
        "pairs": total["pairs"], "tokens": total["tokens"],
    }


def _add(into: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    for key, value in sums.items():
        into[key] = into.get(key, torch.zeros((), device=value.device)) + value.detach()


# ---------------------------------------------------------------------------- evaluation


class Evaluator:
    """Scores the eval cache; tracks the overlap (Jaccard) of its token masks between evals."""

    def __init__(self, path: str, manifest: dict[str, Any], rank: int, world_size: int, cfg: TrainConfig, pad_id: int):
        self.rows = list(read_rows(path, manifest))
        self.indices, self.micro_batches = eval_shards(len(self.rows), rank, world_size, cfg.micro_batch_size)
        self.cfg, self.pad_id = cfg, pad_id
        self.previous_masks: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, engine: Any) -> dict[str, float]:
        engine.eval()
        totals: dict[str, torch.Tensor] = {}
        masks = []
        overlap = torch.zeros(2)  # |this mask & last eval's|, |this mask | last eval's|, over real pairs
        size = self.cfg.micro_batch_size
        for micro in range(self.micro_batches):
            chunk = self.indices[micro * size:(micro + 1) * size]
            weights = [1.0] * len(chunk) + [0.0] * (size - len(chunk))
            rows = [self.rows[i] for i in chunk] + [self.rows[0]] * (size - len(chunk))
            batch = collate_pairs(rows, self.pad_id, weights).to(engine.device)
            _, sums, out = forward_loss(engine, batch, self.cfg)
            _add(totals, sums)
            real = batch.weights.bool().unsqueeze(1).cpu()
            selected = torch.cat([(out.chosen_selected.cpu() & real).flatten(), (out.rejected_selected.cpu() & real).flatten()])
            if self.previous_masks is not None:
                before = self.previous_masks[micro]
                overlap += torch.tensor([float((selected & before).sum()), float((selected | before).sum())])
            masks.append(selected)
        engine.train()
        metrics = reduce_metrics(totals, engine.device)
        if self.previous_masks is not None:
            import deepspeed.comm as dist

            overlap = overlap.to(engine.device)
            dist.all_reduce(overlap)
            metrics["mask_overlap"] = float(overlap[0] / overlap[1].clamp(min=1.0))
        # A mask taken while every score ties (the policy still equals the reference) selects
        # everything; overlap with it would only restate the selected fraction.
        all_tied = metrics["selected_fraction/chosen"] == 1.0 and metrics["selected_fraction/rejected"] == 1.0
        self.previous_masks = None if all_tied else masks
        return {f"eval/{k}": v for k, v in metrics.items() if k not in ("tokens",)}


# ---------------------------------------------------------------------------- checkpoints and logs


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short by a kill mid-write."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class RunFiles:
    def __init__(self, output: Path, rank: int):
        self.output, self.rank = output, rank
        self.checkpoints = output / "checkpoints"
        self.metrics_path = output / "metrics.jsonl"
        self.tensorboard = None

    def latest_checkpoint(self) -> str | None:
        marker = self.checkpoints / "latest"
        return marker.read_text().strip() if marker.exists() else None

    def open_logs(self, resume_step: int | None) -> None:
        """Keep the logged rows up to the checkpoint resumed from (`resume_step`); none on a fresh start."""
        if self.rank != 0:
            return
        if self.metrics_path.exists():
            # Rows logged after the checkpoint we resume from will be produced again.
            lines = self.metrics_path.read_text().splitlines() if resume_step is not None else []
            kept = [line for line in lines if (step := _logged_step(line)) is not None and step <= resume_step]
            tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_path)
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.output / "tensorboard"), purge_step=0 if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


@dataclass
class RunHistory:
    """What the summary reports, carried through checkpoints so a resumed run reports it too."""

    first_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    last_eval_step: int | None = None
    last_step_metrics: dict[str, Any] | None = None


def save_checkpoint(engine: Any, files: RunFiles, step: int, position: StreamPosition, cfg: TrainConfig,
                    history: RunHistory, identity: dict[str, str | None]) -> None:
    import deepspeed.comm as dist

    tag = f"step-{step}"
    client = {"step": step, "position": position.to_json(), "config": to_dict(cfg), "history": asdict(history),
              "identity": identity}
    engine.save_checkpoint(str(files.checkpoints), tag=tag, client_state=client, save_latest=False)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               files.checkpoints / tag / f"rng-rank{dist.get_rank()}.pt")
    dist.barrier()
    if files.rank == 0:
        # Only now is the checkpoint whole on every rank: point `latest` at it, drop old ones.
        tmp = files.checkpoints / ".latest.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, files.checkpoints / "latest")
        tags = sorted((p for p in files.checkpoints.glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        # Later steps than this one are leftovers of a killed run (never pointed to by `latest`).
        leftovers = [p for p in tags if int(p.name[5:]) > step]
        kept = [p for p in tags if int(p.name[5:]) <= step]
        for old in leftovers + kept[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


# Settings a resumed run must share with its checkpoint: they fix the row order, the loss and the
# optimizer (whose learning rate, betas and weight decay the checkpoint restores over any new value).
# The caches are compared by content, not path: the same cache may be mounted elsewhere.
RESUME_INVARIANTS = ("global_batch_size", "seed", "shuffle_window", "top_k", "beta", "label_smoothing", "max_steps",
                     "epochs", "learning_rate", "min_lr_ratio", "schedule", "warmup_steps", "weight_decay", "adam_betas")


def load_checkpoint(engine: Any, files: RunFiles, cfg: TrainConfig, identity: dict[str, str | None]
                    ) -> tuple[int, StreamPosition, RunHistory]:
    import deepspeed.comm as dist

    tag = files.latest_checkpoint()
    _, client = engine.load_checkpoint(str(files.checkpoints), tag=tag)
    if client is None:
        raise CacheError(f"{files.checkpoints / tag}: DeepSpeed could not load this checkpoint; delete it and "
                         f"point {files.checkpoints / 'latest'} at an earlier one")
    saved = client["config"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_INVARIANTS
               if saved.get(k) != getattr(cfg, k)]
    saved_identity = client.get("identity") or {}
    changed += [f"--{name.replace('_', '-')} holds other scores than the checkpoint's" for name in identity
                if saved_identity.get(name) != identity[name]]
    if changed:
        raise ConfigError(f"--resume with settings that differ from the checkpoint's ({', '.join(changed)}); "
                          f"resume with the original settings or start a new --output")
    rng = files.checkpoints / tag / f"rng-rank{dist.get_rank()}.pt"
    if rng.exists():
        states = torch.load(rng, weights_only=False)
        torch.set_rng_state(states["cpu"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    return client["step"], StreamPosition(**client["position"]), RunHistory(**client.get("history", {}))


def _agreed(decision: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank."""
    import deepspeed.comm as dist

    flag = torch.tensor([float(decision)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def save_final_model(engine: Any, model: Any, tokenizer: Any, directory: Path, rank: int) -> None:
    """`save_pretrained` of the trained policy; under ZeRO-3 its shards are gathered first.

    Written beside `directory` and renamed into place, so `model/` is always a whole model.
    """
    staging = directory.with_name(f".{directory.name}.tmp")
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            state = {k.removeprefix("policy."): v for k, v in state.items()}
            model.save_pretrained(staging, state_dict=state)
    elif rank == 0:
        model.save_pretrained(staging)
    if rank == 0:
        tokenizer.save_pretrained(staging)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)


def teardown(engine: Any) -> None:
    """The order that keeps gloo from aborting at interpreter exit (see DESIGN.md)."""
    import deepspeed.comm as dist

    dist.barrier()
    engine.destroy()
    del engine
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


# ---------------------------------------------------------------------------- the run


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    ensure_distributed_env()
    import deepspeed
    import deepspeed.comm as dist
    from tqdm import tqdm
    deepspeed.init_distributed(verbose=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    output = Path(cfg.output)
    files = RunFiles(output, rank)
    if not cfg.resume and files.latest_checkpoint() is not None:
        raise ConfigError(f"{output} already holds a run; pass --resume to continue it or choose a new --output")

    tokenizer = load_tokenizer(cfg.policy)
    caches = validate_caches(cfg, tokenizer)
    ds_config = deepspeed_config(cfg, world_size)
    gas = ds_config["gradient_accumulation_steps"]
    train_dtype = "bfloat16" if ds_config["bf16"]["enabled"] else "float32"
    if rank == 0 and caches.train["reference"]["dtype"] != train_dtype:
        # At step 0 p - r is then precision noise, and top-k picks its extremes: a biased margin.
        warnings.warn(f"the cache was scored in {caches.train['reference']['dtype']} but the policy trains in "
                      f"{train_dtype}; alignment scores start as precision noise. Score in the training precision.")
    stream = CacheStream(cfg.cache, caches.train, rank=rank, world_size=world_size,
                         global_batch_size=cfg.global_batch_size, seed=cfg.seed, shuffle_window=cfg.shuffle_window,
                         anchor=(cfg.anchor_scores, caches.anchor) if caches.anchor else None)
    total_steps = cfg.max_steps or cfg.epochs * stream.batches_per_epoch
    # Content digests: a resume must see the same scores (and evaluate on the same rows) as the run it continues.
    identity = {name: manifest and cache_identity(manifest) for name, manifest in
                (("cache", caches.train), ("anchor_scores", caches.anchor), ("eval_cache", caches.eval))}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    torch.manual_seed(cfg.seed)
    model, _zero3_context = load_policy(cfg, ds_config)
    wrapper = PolicyLogprobs(model, cfg.logprob_chunk)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper, model_parameters=[p for p in wrapper.parameters() if p.requires_grad], config=copy.deepcopy(ds_config),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps)),
    )
    resumed_from = None
    if cfg.resume and files.latest_checkpoint():
        step, position, history = load_checkpoint(engine, files, cfg, identity)
        resumed_from = step
    else:
        if cfg.resume and rank == 0:
            print(f"--resume: no checkpoint in {files.checkpoints}, starting fresh", flush=True)
        step, position, history = 0, StreamPosition(), RunHistory()
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output / "config.json", {"train": to_dict(cfg), "deepspeed": ds_config, "world_size": world_size,
                                                   "total_steps": total_steps, "cache_rows": stream.total_rows})
    files.open_logs(resumed_from)
    evaluator = Evaluator(cfg.eval_cache, caches.eval, rank, world_size, cfg, pad_id) if caches.eval else None

    def evaluate(at_step: int) -> None:
        history.last_eval, history.last_eval_step = evaluator(engine), at_step
        if at_step == 0:
            history.first_eval = history.last_eval
        files.log(at_step, history.last_eval)

    if evaluator is not None and step == 0:
        evaluate(0)

    batches = stream.batches(position)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (cfg.progress and rank == 0), dynamic_ncols=True)
    started = time.perf_counter()
    first_step = step
    while step < total_steps:
        step_started = time.perf_counter()
        position, rows = next(batches)
        size = cfg.micro_batch_size
        sums: dict[str, torch.Tensor] = {}
        for micro in range(gas):
            batch = collate_pairs(rows[micro * size:(micro + 1) * size], pad_id).to(engine.device)
            loss, micro_sums, _ = forward_loss(engine, batch, cfg)
            engine.backward(loss)
            if micro == gas - 1:
                grad_norm = _grad_norm_before_step(engine)
                lr = engine.get_lr()[0]  # the rate this step applies (the scheduler moves on in step())
            engine.step()
            _add(sums, micro_sums)
        step += 1
        metrics = reduce_metrics(sums, engine.device)
        elapsed = time.perf_counter() - step_started
        grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
        history.last_step_metrics = step_metrics = {
            **{k: v for k, v in metrics.items() if k not in ("pairs", "tokens")},
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_second": metrics["tokens"] / elapsed, "pairs_per_second": metrics["pairs"] / elapsed,
            "epoch": position.epoch,
        }
        if step % cfg.log_every == 0 or step == total_steps:
            files.log(step, step_metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.4f}",
                        pairs_s=f"{step_metrics['pairs_per_second']:.1f}")
        # Evaluate before checkpointing, so a checkpoint at step N holds the eval of step N.
        if evaluator is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            evaluate(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save_checkpoint(engine, files, step, position, cfg, history, identity)
    bar.close()
    elapsed = time.perf_counter() - started

    if evaluator is not None and history.last_eval_step != step:
        evaluate(step)
    if files.latest_checkpoint() != f"step-{step}":
        save_checkpoint(engine, files, step, position, cfg, history, identity)
    # A rerun of a finished run trains nothing; its model is already there, unless the kill came before it was.
    # Rank 0 decides for all: under ZeRO-3 the save is a collective gather.
    if cfg.save_model and _agreed(step > first_step or not (output / "model").exists(), engine.device):
        save_final_model(engine, model, tokenizer, output / "model", rank)
    files.close()
    teardown(engine)
    summary = {
        "output": str(output), "steps": step, "steps_this_run": step - first_step, "world_size": world_size,
        "seconds": round(elapsed, 2), "final": history.last_step_metrics or {},
    }
    if history.first_eval is not None:
        summary["eval_before"] = history.first_eval
    if history.last_eval is not None:
        summary["eval_after"] = history.last_eval
    if rank == 0:
        write_json_atomic(output / "summary.json", summary)
    return summary
