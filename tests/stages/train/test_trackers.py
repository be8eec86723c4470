"""--report-to: each tracker logs through its own client, offline here, and is read back."""

from __future__ import annotations

import json

import pytest

from selpipe.stages.train.trackers import Trackers, tracker_tag

CONFIG = {"train": {"beta": 0.1, "top_k": 0.4}, "world_size": 1}


def test_tags_follow_the_trainers_train_and_eval_prefixes():
    assert [tracker_tag(k) for k in ("loss", "rewards/margins", "lr", "eval/loss")] == \
        ["train/loss", "train/rewards/margins", "train/learning_rate", "eval/loss"]


def log_three_steps(names, output):
    trackers = Trackers(names, output, CONFIG, resume_step=None)
    for step in (1, 2, 3):
        trackers.log(step, {"loss": 1.0 / step, "grad_norm": None, "epoch": 0})
    trackers.log(3, {"eval/loss": 0.25})
    trackers.close()


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_three_steps(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert [e.value for e in events.Scalars("eval/loss")] == [0.25]


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks of chunks
    with a 7-byte header: crc, length, kind 1 full / 2 first / 3 middle / 4 last) of `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block, position = run_file.read_bytes(), 32768, 7  # after the file's ":W&B" header
    records, pending = [], b""
    while position + 7 <= len(raw):
        left = block - position % block
        crc, length, kind = struct.unpack("<IHB", raw[position:position + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:
            position += left
            continue
        data, position = raw[position + 7:position + 7 + length], position + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            records.append(pending)
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_run_reads_back_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "selpipe-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_three_steps(["wandb"], tmp_path)
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    [run_file] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = wandb_history(run_file)
    assert [(row["_step"], row["train/loss"]) for row in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert history[-1]["eval/loss"] == 0.25
    Trackers(["wandb"], tmp_path, CONFIG, resume_step=3).close()
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"] == run_id


def test_mlflow_file_store_reads_back_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    log_three_steps(["mlflow"], tmp_path)
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert client.get_run(run_id).data.params["train.beta"] == "0.1"
    # Resumed from a checkpoint at step 1 after a kill at step 3: steps 2 and 3 are logged again
    # (bit-exact, the same values) and must not be held twice; step 4 is new.
    resumed = Trackers(["mlflow"], tmp_path, CONFIG, resume_step=1)
    for step in (2, 3, 4):
        resumed.log(step, {"loss": 1.0 / step})
    resumed.log(3, {"eval/loss": 0.25})
    resumed.close()
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"] == run_id
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.333333), (4, 0.25)]
    assert [m.step for m in client.get_metric_history(run_id, "eval/loss")] == [3]


def test_a_fresh_start_opens_a_new_tracker_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    log_three_steps(["mlflow"], tmp_path)
    first = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    log_three_steps(["mlflow"], tmp_path)  # a run killed before its first checkpoint, started again
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"] != first
