"""Stage two: `selpipe train`, Selective-DPO on DeepSpeed from a score cache.

cache -> per-rank stream -> micro batches -> policy log-probs at completion positions ->
alignment scores -> top-k mask -> masked loss -> DeepSpeed step.

    engine.py     process group (rank 0's verdicts broadcast), DeepSpeed config and engine, the policy, teardown
    run_dir.py    the run directory: output checks, lease and claim, logs, checkpoints, resume
    safe_load.py  checkpoint files are read once, and only if loading them cannot run code
    model_io.py   Hugging Face models out: the final save, the ZeRO-3 gather, the adapter merge
    preemption.py SIGTERM/USR1: every rank stops after the same step with a checkpoint, exit 75
    loop.py       `fit`: one loop, one eval condition, one save condition; the step's loss and metrics
    evaluate.py   evaluation on a held-out cache
    trackers.py   --report-to: TensorBoard, W&B, MLflow
    export.py     Hugging Face models out of a run (`selpipe export`, --merge-adapter)
    run.py        `run_train(cfg)`: setup, start, train (fit), finish

Launch with one process (no launcher needed), or with `torchrun`/`deepspeed` for several
processes and nodes. Without a GPU DeepSpeed runs on CPU with gloo.
"""

from .engine import free_port
from .run import run_train

__all__ = ["free_port", "run_train"]
