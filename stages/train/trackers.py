"""Experiment trackers (`--report-to`): TensorBoard, Weights & Biases, MLflow, through their own clients.

Tags follow the Hugging Face Trainer, which TRL's `DPOTrainer` logs through: training metrics
under `train/`, evaluation under `eval/`, so a selpipe run sits beside a TRL run on one dashboard.
Each client reads its usual environment (`WANDB_PROJECT`, `WANDB_MODE=offline`, `WANDB_DIR`,
`MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`, ...). A resumed run continues the same W&B and
MLflow run: their ids are kept in the run directory. A resumed run logs again the steps between
its checkpoint and the kill; resume is bit-exact, so those values are the ones already logged:
W&B drops steps below its last itself, and MLflow is told only the steps it does not hold yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selpipe.pipeline.atomic import write_json_atomic
from selpipe.pipeline.errors import ConfigError, first_line

IDS_FILE = "trackers.json"


def tracker_tag(key: str) -> str:
    """`loss` -> `train/loss`; `eval/loss` stays. (The Trainer's own names: `lr` is `learning_rate`.)"""
    if key.startswith("eval/"):
        return key
    return "train/" + {"lr": "learning_rate"}.get(key, key)


class TensorBoard:
    def __init__(self, output: Path, resume_step: int | None, **_: Any):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events a killed run logged after the checkpoint it resumes from.
        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=0 if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, output: Path, config: dict[str, Any], ids: dict[str, str], **_: Any):
        import os

        try:
            import wandb
        except ImportError:
            raise ConfigError("--report-to wandb needs the wandb client: pip install 'selpipe[trackers]'") from None
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "selpipe"), name=output.name, config=config,
                              dir=os.environ.get("WANDB_DIR", str(output)), id=ids.get("wandb"), resume="allow")
        ids["wandb"] = self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # W&B keeps one value per step and ignores steps below its last; a resumed run re-logs from
        # its checkpoint, so those repeats are dropped there rather than duplicated.
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, output: Path, config: dict[str, Any], ids: dict[str, str], **_: Any):
        try:
            import mlflow
        except ImportError:
            raise ConfigError("--report-to mlflow needs the MLflow client: pip install 'selpipe[trackers]'") from None
        self.mlflow = mlflow
        resumed = "mlflow" in ids
        if not resumed:
            run = mlflow.start_run(run_name=output.name)
            # MLflow caps a parameter at 6,000 characters; flatten the two-level config.
            params = {f"{group}.{k}": str(v)[:500] for group, values in config.items() if isinstance(values, dict)
                      for k, v in values.items()}
            mlflow.log_params(params)
        else:
            run = mlflow.start_run(run_id=ids["mlflow"])
        ids["mlflow"] = run.info.run_id
        # MLflow keeps every value logged at a step, so a resume would hold each re-logged step twice.
        self.logged_through = self._last_steps(run.info.run_id) if resumed else {}

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """The last step the run holds for each metric (none for a new run)."""
        client = self.mlflow.tracking.MlflowClient()
        return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
                for key in client.get_run(run_id).data.metrics}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        new = {key: value for key, value in metrics.items() if step > self.logged_through.get(key, -1)}
        if new:
            self.mlflow.log_metrics(new, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers of `--report-to`, opened on rank 0 only."""

    def __init__(self, names: list[str], output: Path, config: dict[str, Any], resume_step: int | None):
        ids_path = output / IDS_FILE
        # A fresh start opens new tracker runs; only a resume continues the ones the run began.
        ids: dict[str, str] = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        self.trackers = [self._open(name, output, config, ids, resume_step) for name in names]
        write_json_atomic(ids_path, ids)

    @staticmethod
    def _open(name: str, output: Path, config: dict[str, Any], ids: dict[str, str], resume_step: int | None) -> Any:
        try:
            return TRACKERS[name](output=output, config=config, ids=ids, resume_step=resume_step)
        except ConfigError:
            raise
        except Exception as err:  # each client has its own error types; all mean "this tracker cannot start"
            first = first_line(err)
            raise ConfigError(f"--report-to {name}: the tracker did not start ({first[:300]}); fix its settings "
                              f"(environment variables) or drop it from --report-to") from None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {tracker_tag(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(step, numbers)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
