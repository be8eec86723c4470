"""safe_load: checkpoint files are unpickled only as tensors and plain data, and each is read once."""

from __future__ import annotations

import pathlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from selpipe.pipeline.errors import CacheError
from selpipe.stages.train.safe_load import CheckedReads, check_checkpoint_files, checked_loading, load_tensors


class Payload:
    """Unpickling this touches a file: what a crafted checkpoint could do instead."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


@pytest.fixture
def crafted(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """(a checkpoint file whose unpickling would create `planted`, planted)."""
    planted = tmp_path / "pwned"
    path = tmp_path / "step-1" / "mp_rank_00_model_states.pt"
    path.parent.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(planted)}, path)
    return path, planted


@pytest.fixture
def reads_counted(monkeypatch) -> Counter:
    """Every torch.load by path: how often each file is read."""
    counts: Counter = Counter()
    real = torch.load

    def counting(path, *args, **kwargs):
        counts[pathlib.Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return counts


def test_a_file_that_needs_code_to_unpickle_is_refused_in_one_line_and_nothing_runs(crafted):
    path, planted = crafted
    with pytest.raises(CacheError) as refused:
        load_tensors(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused to load this checkpoint file") and "\n" not in message
    assert f"point {path.parent.parent / 'latest'} at an earlier one" in message
    assert not planted.exists()
    with pytest.raises(CacheError, match="refused to load"):
        check_checkpoint_files(path.parent)
    assert not planted.exists()


def test_tensors_plain_data_and_deepspeeds_own_data_classes_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim_states.pt"
    saved = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "betas": (0.9, 0.999), "name": "adamw",
             "scaler": DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                                               consecutive_hysteresis=False), "stage": ZeroStageEnum.weights}
    torch.save(saved, path)
    for mmap in (True, False):
        loaded = load_tensors(path, mmap=mmap)
        assert torch.equal(loaded["w"], saved["w"]) and (loaded["step"], loaded["betas"]) == (7, (0.9, 0.999))
        assert loaded["scaler"].cur_scale == 2.0 ** 16 and loaded["stage"] is ZeroStageEnum.weights


def test_a_damaged_file_is_one_line(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CacheError, match="refused to load this checkpoint file.*or is damaged"):
        load_tensors(path)


def test_a_file_read_before_deepspeed_loads_is_handed_over_without_a_second_read(tmp_path, reads_counted):
    states, optim = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "optim_states.pt"
    torch.save({"step": 3, "module": {"w": torch.ones(3)}}, states)
    torch.save({"optimizer": {"exp_avg": torch.zeros(3)}}, optim)
    reads = CheckedReads()
    first = reads.read(states)
    assert reads.read(tmp_path / "." / states.name) is first  # the same file by another spelling
    assert reads.read(str(states)) is first
    reads.read(optim)
    assert reads_counted == {states.name: 1, optim.name: 1}
    # Once released (DeepSpeed has copied what it loaded), asking again reads the file again.
    reads.release()
    reads.read(states)
    assert reads_counted[states.name] == 2


def test_inside_checked_loading_deepspeeds_reads_go_through_the_check(crafted, tmp_path, reads_counted):
    path, planted = crafted

    class UnsafeEngine:
        """DeepSpeed's TorchCheckpointEngine, whose load unpickles anything: inside the block it must
        never be reached (reaching it fails the test without unpickling the crafted file)."""

        def load(self, path, map_location=None):
            raise AssertionError(f"DeepSpeed's own unchecked load was called for {path}")

        def is_decoupled(self):
            return False

    ds_engine = SimpleNamespace(checkpoint_engine=UnsafeEngine())
    original = ds_engine.checkpoint_engine
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    with checked_loading(ds_engine, CheckedReads()):
        assert ds_engine.checkpoint_engine.is_decoupled() is False  # the rest is DeepSpeed's own
        assert torch.equal(ds_engine.checkpoint_engine.load(str(good), map_location="cpu")["w"], torch.ones(2))
        with pytest.raises(CacheError, match="refused to load this checkpoint file"):
            ds_engine.checkpoint_engine.load(str(path))
    assert not planted.exists() and ds_engine.checkpoint_engine is original
    assert reads_counted == {"good.pt": 1, path.name: 1}
