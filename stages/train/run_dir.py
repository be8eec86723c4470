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

from selpipe.pipeline import __version__
from selpipe.pipeline.atomic import write_json_atomic, write_text_atomic
from selpipe.pipeline.config import TrainConfig, default_settings, identity_settings, to_dict
from selpipe.pipeline.errors import CacheError, ConfigError
from selpipe.pipeline.stream import StreamPosition

MARKER = ".selpipe-run.json"



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


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _is_unmarked_run(output: Path) -> bool:
    """A run directory written by selpipe 0.1 before runs carried the marker: its config.json is ours."""
    try:
        config = json.loads((output / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and {"train", "deepspeed", "total_steps"} <= config.keys()


def check_output(cfg: TrainConfig) -> None:
    """Refuse, before anything is written, an --output that is not ours to write.

    It must be new, an empty directory, or a selpipe run (marked by `MARKER`), and it must not
    overlap the policy or any cache: a run there would overwrite the user's model or scores.
    """
    output = Path(cfg.io.output)
    resolved = output.resolve()
    inputs = {"--policy": cfg.io.policy, "--cache": cfg.io.cache, "--anchor-scores": cfg.io.anchor_scores,
              "--eval-cache": cfg.io.eval_cache}
    for flag, value in inputs.items():
        if value is not None and _overlaps(resolved, Path(value).resolve()):
            raise ConfigError(f"--output {output} overlaps {flag} {value}: a run would write into your inputs; "
                              f"choose an --output outside them")
    if not output.exists():
        return
    if not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a directory; choose a new --output")
    if (output / MARKER).is_file() or not any(output.iterdir()) or _is_unmarked_run(output):
        return
    raise ConfigError(f"--output {output} is a directory that is not a selpipe run and not empty; "
                      f"choose a new or empty --output (selpipe will not overwrite files it did not create)")


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
    changed += [f"--{name.replace('_', '-')} holds other scores than the checkpoint's" for name in identity
                if saved_identity.get(name) != identity[name]]
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
        from .safe_load import check_checkpoint_files, load_tensors

        tag = self.latest_checkpoint()
        directory = self.checkpoints / tag
        # Nothing in a checkpoint may run code when loaded; DeepSpeed's own loader unpickles freely.
        check_checkpoint_files(directory)
        # Compare settings before DeepSpeed loads: another adapter or ZeRO layout would fail inside it.
        states = sorted(directory.glob("*model_states.pt"))
        saved_state = load_tensors(states[0]) if states else {}
        if not {"step", "position", "config"} <= saved_state.keys():
            raise CacheError(f"{directory}: holds no selpipe checkpoint state; delete it and point "
                             f"{self.checkpoints / 'latest'} at an earlier one")
        refuse_changed_settings(saved_state, cfg, identity, comm.world_size)
        _, client = engine.ds.load_checkpoint(str(self.checkpoints), tag=tag)
        if not isinstance(client, dict) or not {"step", "position", "config"} <= client.keys():
            raise CacheError(f"{directory}: DeepSpeed could not load this checkpoint; delete it and point "
                             f"{self.checkpoints / 'latest'} at an earlier one")
        rng = directory / f"rng-rank{comm.rank}.pt"
        if rng.exists():
            states = load_tensors(rng)
            torch.set_rng_state(states["cpu"])
            if states.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
        return TrainState(step=client["step"], position=StreamPosition(**client["position"]),
                          history=RunHistory(**client.get("history", {})), checkpoint_step=client["step"])
