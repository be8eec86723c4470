"""Shared fixtures: tiny models and tokenizers built locally (never downloaded), demo rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import demo  # noqa: E402  (data/demo.py: the tiny-model builder)

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer and two identical tiny Qwen2 models (reference, policy) plus a different one."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = demo.build_tokenizer(root / "tokenizer", demo.corpus())
    demo.build_model(root / "reference", tokenizer, seed=0)
    demo.build_model(root / "policy", tokenizer, seed=0)
    demo.build_model(root / "other", tokenizer, seed=1)
    return {"tokenizer": root / "tokenizer", "reference": root / "reference", "policy": root / "policy", "other": root / "other"}


@pytest.fixture(scope="session")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models["tokenizer"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def demo_rows() -> list[dict]:
    return demo.generate_pairs(48, seed=3, id_prefix="t")


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `selpipe ARGS` in a fresh process, as a user would."""
    result = subprocess.run([str(BIN / "selpipe"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"selpipe {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


def train_cli(cache: Path, policy: Path, output: Path, *extra, launcher: tuple[str, ...] = (), check: bool = True,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """`selpipe train` in a fresh process, as a user launches it (under `launcher`, e.g. `torchrun(2)`),
    one thread per process (CI has two cores); with check=False the finished process, whatever its status."""
    command = [*launcher, str(BIN / "selpipe"), "train", "--cache", str(cache), "--policy", str(policy),
               "--output", str(output), "--no-progress", *map(str, extra)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stderr[-5000:]}")
    return result


def torchrun(processes: int) -> tuple[str, ...]:
    return (str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes))


def per_step(run: Path, key: str = "loss") -> dict[int, float]:
    """`key` at each step of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


# The shared tiny run: two steps of eight pairs on one process (ZeRO 0), a checkpoint and an eval
# (on the training rows: any cache will do) at each step, the model saved.
TINY_RUN = ("--max-steps", "2", "--save-every", "1", "--global-batch-size", "8", "--micro-batch-size", "4",
            "--learning-rate", "1e-3", "--beta", "0.1", "--eval-every", "1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, demo_cache, models) -> Path:
    """A finished tiny run (`TINY_RUN` on `demo_cache`). Shared by every test that reads one: never
    write into it; copy it (shutil.copytree) to change it."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    train_cli(demo_cache, models["policy"], run, *TINY_RUN, "--eval-cache", demo_cache)
    return run


def score(input_path: Path, output: Path, model: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("score-ref", "--input", input_path, "--output", output, "--model", model,
                   "--max-length", "64", "--max-prompt-length", "32", "--no-progress", *extra, env=env)


@pytest.fixture(scope="session")
def score_config(models):
    """A factory of small ScoreConfigs on the tiny reference."""
    from selpipe.pipeline.config import ScoreConfig

    def make(input_path, output, **overrides):
        settings = dict(input=str(input_path), output=str(output), model=str(models["reference"]), max_length=64,
                        max_prompt_length=32, shard_size=16, row_group_size=4, progress=False)
        return ScoreConfig(**{**settings, **overrides})

    return make


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory, score_config):
    """A 96-pair cache of demo rows: 6 shards of 16 rows, row groups of 4."""
    from selpipe.stages.score_ref import run_score_ref

    root = tmp_path_factory.mktemp("cache")
    rows = write_jsonl(root / "train.jsonl", demo.generate_pairs(96, seed=5, id_prefix="c"))
    run_score_ref(score_config(rows, root / "cache"))
    return root / "cache"


def snapshot(directory: Path) -> dict[str, str]:
    """Every file below `directory` and its sha256: equal before and after means byte-identical."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user-fixable error: exit 2, no traceback, one last line `error: ...` holding every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
