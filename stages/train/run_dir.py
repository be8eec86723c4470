"""The run directory: claimed before anything is written, logs, checkpoints, resume.

    .selpipe-run.json           marker: this directory is a selpipe training run (written first)
    config.json                 the resolved TrainConfig and the DeepSpeed config it produced
    metrics.jsonl               one object per logged optimizer step, eval rows prefixed `eval/`
    tensorboard/                the same metrics for TensorBoard (and W&B, MLflow: --report-to)
    trackers.json               the W&B and MLflow run ids, so a resumed run continues them
    checkpoints/step-N/         DeepSpeed checkpoint + stream position, RNG states, config,
                                the caches' content digests and the eval history
    checkpoints/latest          name of the newest complete checkpoint (written last)
    summary.json                what the run did (also printed by `selpipe train`)
    model/                      the final policy, `save_pretrained` with its tokenizer

A run writes only inside a directory that is new, empty, or already marked as a selpipe run, and
deletes only what it wrote there itself (its own checkpoints, its own metrics rows).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline import __version__, ownership
from selpipe.pipeline.atomic import write_json_atomic, write_text_atomic
from selpipe.pipeline.config import TrainConfig, default_settings, identity_settings, to_dict
from selpipe.pipeline.errors import CacheError, ConfigError
from selpipe.pipeline.stream import StreamPosition

MARKER = ".selpipe-run.json"
# What a changed identity entry means, where it is not a cache's content.
IDENTITY_CHANGES = {"policy": "--policy has other weights' names or shapes than the checkpoint's (another model)"}
# Entries checkpoints of older versions do not have: nothing to compare there.
NEWER_IDENTITY = frozenset({"policy"})


@dataclass
class RunHistory:
    """What the summary reports, carried through checkpoints so a resumed run reports it too."""

    first_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    last_eval_step: int | None = None
    last_step_metrics: dict[str, Any] | None = None


@dataclass
class TrainState:
    """Where training stands: optimizer steps taken, the stream's position, and the latest checkpoint."""

    step: int = 0
    position: StreamPosition = StreamPosition()
    history: RunHistory = field(default_factory=RunHistory)
    checkpoint_step: int | None = None


def _is_unmarked_run(output: Path) -> bool:
    """A run directory written by selpipe 0.1 before runs carried the marker: its config.json is ours."""
    try:
        config = json.loads((output / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and {"train", "deepspeed", "total_steps"} <= config.keys()


def check_output(cfg: TrainConfig) -> None:
    """Refuse, before anything is written, an --output that is not ours to write: it must be new,
    an empty directory, or a selpipe run (marked by `MARKER`), and it must not overlap the policy
    or any cache (a run there would overwrite the user's model or scores)."""
    inputs = {"--policy": cfg.io.policy, "--cache": cfg.io.cache, "--anchor-scores": cfg.io.anchor_scores,
              "--eval-cache": cfg.io.eval_cache}
    ownership.check_output(cfg.io.output, markers=[MARKER], inputs=inputs, is_ours=_is_unmarked_run,
                           kind="selpipe run")


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short by a kill mid-write."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def refuse_changed_settings(saved: dict[str, Any], cfg: TrainConfig, identity: dict[str, str | None],
                            world_size: int) -> None:
    """A resume must keep what fixes the row order, the loss, the adapter and the optimizer state
    (`setting(identity=True)` in pipeline/config.py; the checkpoint restores the optimizer's
    learning rate, betas and weight decay over any new value). The caches are compared by
    content, not path: the same cache may be mounted elsewhere."""
    config = saved["config"]
    # A setting newer than the checkpoint had its default then.
    defaults = default_settings(TrainConfig)
    changed = [f"--{k.replace('_', '-')} {config.get(k, defaults[k])!r} -> {value!r}"
               for k, value in identity_settings(cfg).items() if config.get(k, defaults[k]) != value]
    saved_identity = saved.get("identity") or {}
    changed += [IDENTITY_CHANGES.get(name, f"--{name.replace('_', '-')} holds other scores than the checkpoint's")
                for name in identity if saved_identity.get(name, identity[name] if name in NEWER_IDENTITY else None)
                != identity[name]]
    saved_world = saved.get("dp_world_size")
    if cfg.model.zero_stage > 0 and saved_world is not None and saved_world != world_size:
        # ZeRO 1-3 partition the optimizer state by rank; DeepSpeed cannot load it on another count.
        changed.append(f"ranks {saved_world} -> {world_size} (ZeRO-{cfg.model.zero_stage} partitions by rank)")
    if changed:
        raise ConfigError(f"--resume with settings that differ from the checkpoint's ({', '.join(changed)}); "
                          f"resume with the original settings or start a new --output")


class RunDirectory:
    def __init__(self, output: str | Path, rank: int):
        self.output, self.rank = Path(output), rank
        self.checkpoints = self.output / "checkpoints"
        self.metrics_path = self.output / "metrics.jsonl"
        self.trackers: Any = None

    # -------------------------------------------------------------- claim and run files

    def take(self, resume: bool) -> ownership.Lease:
        """The run directory's lease (rank 0, held to the end of the run): a second run into the same
        --output is refused, naming the first; then `refuse_overwrite`, under the lease."""
        lease = ownership.acquire(self.output, "train")
        try:
            self.refuse_overwrite(resume)
        except BaseException:
            lease.release()
            raise
        return lease

    def claim(self) -> None:
        """Mark the directory as a selpipe run (rank 0, after `check_output` passed on every rank)."""
        if self.rank == 0 and not (self.output / MARKER).is_file():
            self.output.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.output / MARKER, {"tool": "selpipe", "kind": "train", "version": __version__})

    def write_json(self, name: str, data: Any) -> None:
        if self.rank == 0:
            write_json_atomic(self.output / name, data)

    # -------------------------------------------------------------- logs

    def open_logs(self, resume_step: int | None, trackers: list[str], config: dict[str, Any]) -> None:
        """Keep the logged rows up to the checkpoint resumed from (`resume_step`); none on a fresh start."""
        if self.rank != 0:
            return
        if self.metrics_path.exists():
            # Rows logged after the checkpoint we resume from will be produced again.
            lines = self.metrics_path.read_text().splitlines() if resume_step is not None else []
            kept = [line for line in lines if (step := _logged_step(line)) is not None and step <= resume_step]
            write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))
        from .trackers import Trackers

        self.trackers = Trackers(trackers, self.output, config, resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.trackers.log(step, metrics)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

    # -------------------------------------------------------------- checkpoints

    def results(self) -> list[str]:
        """What a finished run leaves besides its checkpoints (a kill before the end leaves none of it)."""
        return [name for name in ("model", "model-merged", "summary.json") if (self.output / name).exists()]

    def refuse_overwrite(self, resume: bool) -> None:
        """A new run never replaces a run's results. Without --resume, a directory holding a checkpoint,
        a finished run's model or summary, or logged steps is refused; with --resume and no checkpoint
        (a kill before the first one starts over), so is one holding a finished run's results."""
        checkpoint, results = self.latest_checkpoint(), self.results()
        logged = self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0
        if not resume:
            held = (["a checkpoint"] if checkpoint else []) + results + (["metrics.jsonl"] if logged else [])
            if held:
                raise ConfigError(f"--output {self.output} already holds a run ({', '.join(held)}); pass --resume to "
                                  f"continue it or choose a new --output")
        elif checkpoint is None and results:
            raise ConfigError(f"--output {self.output} holds a finished run ({', '.join(results)}) but no checkpoint "
                              f"to resume from; choose a new --output (selpipe will not overwrite a run's results)")

    def latest_checkpoint(self) -> str | None:
        marker = self.checkpoints / "latest"
        if not marker.is_file():
            return None
        tag = marker.read_text().strip()
        if not (tag.startswith("step-") and tag[5:].isdigit() and (self.checkpoints / tag).is_dir()):
            raise CacheError(f"{marker}: names {tag[:80]!r}, not a checkpoint of this run; point it at one of the "
                             f"step-N directories beside it, or start a new --output")
        return tag

    def step_directories(self) -> list[Path]:
        """The run's step-N checkpoint directories, oldest first (complete or not: see `latest`)."""
        return sorted((p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                      key=lambda p: int(p.name[5:]))

    def save_checkpoint(self, engine: Any, comm: Any, state: TrainState, cfg: TrainConfig,
                        identity: dict[str, str | None], also: Callable[[Path], None] | None = None) -> None:
        """DeepSpeed's checkpoint plus selpipe's state; `also(directory)` (every rank) adds to it
        before `latest` points at it."""
        tag = f"step-{state.step}"
        client = {"step": state.step, "position": state.position.to_json(), "config": to_dict(cfg),
                  "history": asdict(state.history), "identity": identity}
        engine.ds.save_checkpoint(str(self.checkpoints), tag=tag, client_state=client, save_latest=False)
        if also is not None:
            also(self.checkpoints / tag)
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   self.checkpoints / tag / f"rng-rank{comm.rank}.pt")
        comm.barrier()
        if self.rank == 0:
            # Only now is the checkpoint whole on every rank: point `latest` at it, drop old ones.
            write_text_atomic(self.checkpoints / "latest", tag + "\n")
            tags = self.step_directories()
            # Later steps than this one are leftovers of a killed run (never pointed to by `latest`).
            leftovers = [p for p in tags if int(p.name[5:]) > state.step]
            kept = [p for p in tags if int(p.name[5:]) <= state.step]
            for old in leftovers + kept[:-cfg.io.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        comm.barrier()
        state.checkpoint_step = state.step

    def load_checkpoint(self, engine: Any, comm: Any, cfg: TrainConfig, identity: dict[str, str | None]) -> TrainState:
        """Restore the latest checkpoint into `engine`; each of its files is read once, as tensors and
        plain data only (DeepSpeed's own loader would unpickle anything: see safe_load.py)."""
        from .safe_load import CheckedReads, checked_loading

        tag = self.latest_checkpoint()
        directory = self.checkpoints / tag
        reads = CheckedReads()
        # Compare settings before DeepSpeed loads: another adapter or ZeRO layout would fail inside it.
        # Each rank reads the module-state file DeepSpeed will load on it (ZeRO-3: one per rank).
        names = (f"zero_pp_rank_{comm.rank}_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt")
        states = [directory / name for name in names if (directory / name).is_file()]
        saved_state = reads.read(states[0]) if states else {}
        if not isinstance(saved_state, dict) or not {"step", "position", "config"} <= saved_state.keys():
            raise CacheError(f"{directory}: holds no selpipe checkpoint state; delete it and point "
                             f"{self.checkpoints / 'latest'} at an earlier one")
        refuse_changed_settings(saved_state, cfg, identity, comm.world_size)
        with checked_loading(engine.ds, reads):
            _, client = engine.ds.load_checkpoint(str(self.checkpoints), tag=tag)
        if not isinstance(client, dict) or not {"step", "position", "config"} <= client.keys():
            raise CacheError(f"{directory}: DeepSpeed could not load this checkpoint; delete it and point "
                             f"{self.checkpoints / 'latest'} at an earlier one")
        rng = directory / f"rng-rank{comm.rank}.pt"
        if rng.exists():
            generators = reads.read(rng)
            torch.set_rng_state(generators["cpu"])
            if generators.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(generators["cuda"])
        return TrainState(step=client["step"], position=StreamPosition(**client["position"]),
                          history=RunHistory(**client.get("history", {})), checkpoint_step=client["step"])
