"""Stage two: `selpipe train`, Selective-DPO on DeepSpeed from a score cache.

cache -> per-rank stream -> micro batches -> policy log-probs at completion positions ->
alignment scores -> top-k mask -> masked loss -> DeepSpeed step.

    engine.py     process group, DeepSpeed config and engine, the policy, final save, teardown
    run_dir.py    the run directory: output checks and claim, logs, checkpoints, resume
    safe_load.py  checkpoint files are read only if loading them cannot run code
    loop.py       `fit`: one loop, one eval condition, one save condition; the step's loss and metrics
    evaluate.py   evaluation on a held-out cache
    trackers.py   --report-to: TensorBoard, W&B, MLflow
    export.py     Hugging Face models out of a run (`selpipe export`, --merge-adapter)
    run.py        `run_train(cfg)`: setup, fit, finish

Launch with one process (no launcher needed), or with `torchrun`/`deepspeed` for several
processes and nodes. Without a GPU DeepSpeed runs on CPU with gloo.
"""

from .engine import free_port
from .run import run_train

__all__ = ["free_port", "run_train"]
