"""Which worker of how many a stage-one process is: from its flags, or from the scheduler that started it.

`--num-workers auto --worker-index auto` read the environment, in two levels that multiply:

- a Slurm job array: worker `SLURM_ARRAY_TASK_ID` of `SLURM_ARRAY_TASK_COUNT` (the array must be
  0-based, `--array=0-N-1`, so a task's id is its worker index whichever tasks are rerun);
- inside one job or array task: torchrun (`RANK` of `WORLD_SIZE`, and `LOCAL_RANK` picks the
  GPU), else Slurm tasks started by `srun` (`SLURM_PROCID` of `SLURM_NTASKS`).

An array of A tasks that each start W processes is A x W workers: worker `a * W + w`. Pure: the
caller passes the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Placement:
    num_workers: int
    worker_index: int
    local_rank: int | None  # torchrun's LOCAL_RANK: which of this node's GPUs is the worker's
    origin: str  # how the numbers were found, for the worker's config file


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"the scheduler variable {name}={env[name]!r} is not an integer") from None


def _inner(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(index, count, origin) of this process within its job or array task, if a launcher says so."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return _int(env, "RANK"), _int(env, "WORLD_SIZE"), f"torchrun RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']}"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return (_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                f"Slurm tasks SLURM_PROCID={env['SLURM_PROCID']} SLURM_NTASKS={env['SLURM_NTASKS']}")
    return None


def place_worker(num_workers: int | str, worker_index: int | str, env: Mapping[str, str],
                 known_count: int | None = None) -> Placement:
    """Resolve `auto` in either setting from `env`.

    `known_count` is the worker count of the cache being resumed, if any. Under an array it is the
    count: a rerun of some tasks (`--array=3,5`, or `0-1` of 4) sees a smaller SLURM_ARRAY_TASK_COUNT
    than the array that started the cache.
    """
    if num_workers != "auto" and worker_index != "auto":
        return Placement(int(num_workers), int(worker_index), None, "--num-workers and --worker-index")
    inner = _inner(env)
    index, count, origins = 0, 1, []
    if inner is not None:
        index, count, origin = inner
        origins.append(origin)
        if not 0 <= index < count:
            raise ConfigError(f"{origin}: the rank is not in [0, {count})")
    local_rank = _int(env, "LOCAL_RANK") if inner is not None and "RANK" in env and "LOCAL_RANK" in env else None
    if "SLURM_ARRAY_TASK_ID" in env:
        task = _int(env, "SLURM_ARRAY_TASK_ID")
        tasks = _int(env, "SLURM_ARRAY_TASK_COUNT") if "SLURM_ARRAY_TASK_COUNT" in env else None
        low = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        high = _int(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else None
        described = f"Slurm array SLURM_ARRAY_TASK_ID={task} SLURM_ARRAY_TASK_COUNT={tasks}"
        array_count = 1
        if num_workers == "auto":
            whole = tasks is not None and low == 0 and high in (None, tasks - 1)
            if known_count is not None and known_count % count == 0 and not (whole and tasks * count == known_count):
                # A rerun of some tasks (--array=3,5) into the cache the whole array started: its header knows the count.
                array_count = known_count // count
                described += f" (the cache's {known_count} workers)"
            elif whole:
                array_count = tasks
            else:
                raise ConfigError(f"--num-workers auto: the Slurm array runs tasks {low}-{high} ({tasks} tasks), not 0-N-1; "
                                  f"submit it with --array=0-N-1, or give --num-workers")
        origins.insert(0, described)
        index, count = task * count + index, array_count * count
    elif inner is None:
        origins.append("no Slurm or torchrun variables found: one worker")
    if num_workers != "auto":
        count = int(num_workers)
    if worker_index != "auto":
        index = int(worker_index)
    origin = "; ".join(origins)
    if not 0 <= index < count:
        raise ConfigError(f"worker index {index} ({origin}) is not in [0, {count}): the number of workers does not "
                          f"match the scheduler's; give matching --num-workers")
    return Placement(count, index, local_rank, origin)
