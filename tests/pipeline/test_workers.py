import pytest

from selpipe.pipeline.errors import ConfigError
from selpipe.pipeline.workers import place_worker

ARRAY = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1"}
TASKS = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("env, count, index, local_rank, origin", [
    (ARRAY, 2, 1, None, "Slurm array SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=2"),
    (TASKS, 4, 3, None, "Slurm tasks SLURM_PROCID=3 SLURM_NTASKS=4"),
    (TORCHRUN, 8, 5, 1, "torchrun RANK=5 WORLD_SIZE=8"),
    # torchrun under srun: RANK already counts every node's processes, so Slurm's tasks are not multiplied in.
    ({**TASKS, **TORCHRUN}, 8, 5, 1, "torchrun RANK=5 WORLD_SIZE=8"),
    # An array of 2 tasks, each 4 srun tasks: worker 1 * 4 + 3.
    ({**ARRAY, **TASKS}, 8, 7, None, "Slurm array SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=2; Slurm tasks SLURM_PROCID=3 SLURM_NTASKS=4"),
    ({}, 1, 0, None, "no Slurm or torchrun variables found: one worker"),
])
def test_auto_reads_each_scheduler(env, count, index, local_rank, origin):
    placed = place_worker("auto", "auto", env)
    assert (placed.num_workers, placed.worker_index, placed.local_rank, placed.origin) == (count, index, local_rank, origin)


def test_flags_win_and_mix_with_auto():
    assert place_worker(4, 2, TORCHRUN).origin == "--num-workers and --worker-index"
    assert (place_worker(16, "auto", TORCHRUN).num_workers, place_worker(16, "auto", TORCHRUN).worker_index) == (16, 5)
    with pytest.raises(ConfigError, match=r"worker index 5 \(torchrun RANK=5 WORLD_SIZE=8\) is not in \[0, 4\)"):
        place_worker(4, "auto", TORCHRUN)


def test_array_reruns_take_the_count_from_the_cache():
    """`sbatch --array=3,5` reruns two of six tasks: SLURM_ARRAY_TASK_COUNT is 2, the cache says 6."""
    rerun = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "5"}
    placed = place_worker("auto", "auto", rerun, known_count=6)
    assert (placed.num_workers, placed.worker_index) == (6, 5) and "the cache's 6 workers" in placed.origin
    with pytest.raises(ConfigError, match=r"the Slurm array runs tasks 3-5 \(2 tasks\), not 0-N-1; submit it with "
                                          r"--array=0-N-1, or give --num-workers"):
        place_worker("auto", "auto", rerun)
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not an integer"):
        place_worker("auto", "auto", {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})
