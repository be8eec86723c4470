"""Training throughput: `selpipe train` from a score cache vs TRL `DPOTrainer` with a live reference.

    .venv/bin/python bench/train_throughput.py [--reduced]

Same policy, data, micro batch, global batch and max length on both sides; each training runs
in its own process. Two cases: a reference the size of the policy, and one about 8x larger.
Throughput is steady state: the first `warmup_steps` optimizer steps are left out, and the
headline rate is that of the median remaining step (the fastest is reported too; see `steady`). selpipe's
stage one (scoring the data with the reference) is timed too, and its cost is amortised over
1, 4 and 16 training runs of one epoch over the benchmark data. Peak RSS of each training
process is recorded (model loads included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchlib import (
    BENCH_DIR, THREADS, VENV_BIN, WORK_DIR, ModelSpec, build_model, parameter_count, preference_rows, print_table,
    run_logged, set_threads, spec_dict, write_jsonl, write_results,
)

SETTINGS = {
    "reduced": {
        "policy": ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384, vocab=4096),
        "reference_8x": ModelSpec(hidden=256, layers=12, heads=4, kv_heads=2, intermediate=768, vocab=4096),
        "pairs": 64, "completion_sentences": 4, "max_length": 128, "max_prompt_length": 32,
        "micro_batch_size": 4, "global_batch_size": 8, "warmup_steps": 2, "measured_steps": 4,
    },
    "full": {
        "policy": ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=8192),
        "reference_8x": ModelSpec(hidden=512, layers=17, heads=8, kv_heads=2, intermediate=1536, vocab=8192),
        "pairs": 256, "completion_sentences": 12, "max_length": 256, "max_prompt_length": 32,
        "micro_batch_size": 4, "global_batch_size": 16, "warmup_steps": 2, "measured_steps": 8,
    },
}
LEARNING_RATE, BETA, TOP_K = 1e-5, 0.1, 0.4
AMORTISED_OVER = (1, 4, 16)


def score_stage_one(reference: Path, data: Path, cache: Path, s: dict) -> dict:
    """selpipe stage one on the reference (hf backend, in this process); a fresh cache each time."""
    from selpipe.pipeline.config import ScoreConfig
    from selpipe.stages.score_ref import run_score_ref

    shutil.rmtree(cache, ignore_errors=True)
    set_threads()
    cfg = ScoreConfig(input=str(data), output=str(cache), model=str(reference), backend="hf", device="cpu",
                      max_length=s["max_length"], max_prompt_length=s["max_prompt_length"], progress=False)
    started = time.perf_counter()
    summary = run_score_ref(cfg)
    return {"seconds": time.perf_counter() - started, "tokens_per_second": summary["tokens_per_second"],
            "cache_rows": summary["rows"]}


def steady(step_seconds: list[float], step_tokens: list[float], pairs_per_step: int, warmup: int) -> dict:
    """Rates over the steps after warm-up: the headline from the median step (robust to a few
    disturbed steps, and fair to the side whose steps are longer); the fastest step beside it."""
    seconds, tokens = step_seconds[warmup:], step_tokens[warmup:]
    best, median = min(seconds), statistics.median(seconds)
    tokens_per_pair = sum(tokens) / (len(seconds) * pairs_per_step)
    return {"pairs_per_second": pairs_per_step / median, "tokens_per_second": pairs_per_step * tokens_per_pair / median,
            "pairs_per_second_fastest": pairs_per_step / best,
            "step_seconds": seconds, "measured_steps": len(seconds), "tokens_per_pair": tokens_per_pair}


def run_selpipe_train(policy: Path, cache: Path, run: Path, s: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    steps = s["warmup_steps"] + s["measured_steps"]
    config = {"cache": str(cache), "policy": str(policy), "output": str(run / "out"), "top_k": TOP_K, "beta": BETA,
              "learning_rate": LEARNING_RATE, "max_steps": steps, "global_batch_size": s["global_batch_size"],
              "micro_batch_size": s["micro_batch_size"], "zero_stage": 0, "precision": "fp32",
              "save_model": False, "progress": False, "log_every": 1}
    (run / "train.json").write_text(json.dumps(config, indent=2))
    wall = run_logged([sys.executable, str(BENCH_DIR / "peak_rss.py"), str(run / "peak.json"),
                       str(VENV_BIN / "selpipe"), "train", "--config", str(run / "train.json")], run / "train.log")
    metrics = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines() if line]
    step_seconds = [s["global_batch_size"] / m["pairs_per_second"] for m in metrics]
    step_tokens = [m["tokens_per_second"] * t for m, t in zip(metrics, step_seconds)]
    return {**steady(step_seconds, step_tokens, s["global_batch_size"], s["warmup_steps"]),
            "process_seconds": wall, "peak_rss_mib": json.loads((run / "peak.json").read_text())["peak_rss_mib"]}


def run_trl(policy: Path, reference: Path, data: Path, run: Path, s: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    steps = s["warmup_steps"] + s["measured_steps"]
    wall = run_logged([
        sys.executable, str(BENCH_DIR / "peak_rss.py"), str(run / "peak.json"), str(BENCH_DIR / "trl_dpo_run.py"),
        "--policy", str(policy), "--reference", str(reference), "--data", str(data), "--output", str(run / "steps.json"),
        "--work-dir", str(run / "trainer"), "--micro-batch-size", str(s["micro_batch_size"]),
        "--global-batch-size", str(s["global_batch_size"]), "--steps", str(steps),
        "--max-length", str(s["max_length"]), "--learning-rate", str(LEARNING_RATE), "--beta", str(BETA),
        "--threads", str(THREADS),
    ], run / "train.log")
    result = json.loads((run / "steps.json").read_text())
    return {**steady(result["step_seconds"], result["step_tokens"], result["pairs_per_step"], s["warmup_steps"]),
            "process_seconds": wall, "peak_rss_mib": json.loads((run / "peak.json").read_text())["peak_rss_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="small models and few steps (a minute or two on 2 cores)")
    args = parser.parse_args()
    setting = "reduced" if args.reduced else "full"
    s = SETTINGS[setting]
    started = time.perf_counter()
    work = WORK_DIR / f"train-{setting}"

    policy = build_model(s["policy"], WORK_DIR / "models" / s["policy"].label())
    references = {"same size": policy,
                  "8x": build_model(s["reference_8x"], WORK_DIR / "models" / s["reference_8x"].label(), seed=1)}
    reference_specs = {"same size": s["policy"], "8x": s["reference_8x"]}
    data = write_jsonl(preference_rows(s["pairs"], s["completion_sentences"]), work / "pairs.jsonl")

    rows = []
    for case, reference in references.items():
        slug = case.replace(" ", "-")
        stage_one = score_stage_one(reference, data, work / f"cache-{slug}", s)
        ours = run_selpipe_train(policy, work / f"cache-{slug}", work / f"selpipe-{slug}", s)
        peer = run_trl(policy, reference, data, work / f"trl-{slug}", s)
        rows.append({
            "kind": "throughput", "reference": case, "reference_parameters": parameter_count(reference_specs[case]),
            "selpipe_pairs_per_s": ours["pairs_per_second"], "trl_pairs_per_s": peer["pairs_per_second"],
            "ratio_pairs_per_s": ours["pairs_per_second"] / peer["pairs_per_second"],
            "selpipe_pairs_per_s_fastest": ours["pairs_per_second_fastest"], "trl_pairs_per_s_fastest": peer["pairs_per_second_fastest"],
            "ratio_pairs_per_s_fastest": ours["pairs_per_second_fastest"] / peer["pairs_per_second_fastest"],
            "selpipe_step_s": ours["step_seconds"], "trl_step_s": peer["step_seconds"],
            "selpipe_tokens_per_s": ours["tokens_per_second"], "trl_tokens_per_s": peer["tokens_per_second"],
            "selpipe_tokens_per_pair": ours["tokens_per_pair"], "trl_tokens_per_pair": peer["tokens_per_pair"],
            "selpipe_peak_rss_mib": ours["peak_rss_mib"], "trl_peak_rss_mib": peer["peak_rss_mib"],
            "peak_rss_ratio": ours["peak_rss_mib"] / peer["peak_rss_mib"],
            "selpipe_process_s": ours["process_seconds"], "trl_process_s": peer["process_seconds"],
            "stage_one_s": stage_one["seconds"], "stage_one_tokens_per_s": stage_one["tokens_per_second"],
            "measured_steps": ours["measured_steps"],
        })
        # One epoch over the benchmark data, steady-state rates; stage one paid once for N runs.
        epoch_selpipe = s["pairs"] / ours["pairs_per_second"]
        epoch_trl = s["pairs"] / peer["pairs_per_second"]
        for runs in AMORTISED_OVER:
            selpipe_total = stage_one["seconds"] / runs + epoch_selpipe
            rows.append({"kind": "amortised", "reference": case, "runs": runs, "stage_one_s": stage_one["seconds"],
                         "selpipe_epoch_s": selpipe_total, "trl_epoch_s": epoch_trl,
                         "ratio_trl_over_selpipe": epoch_trl / selpipe_total})

    settings = {"setting": setting, **{k: v for k, v in s.items() if not isinstance(v, ModelSpec)},
                "policy": spec_dict(s["policy"]), "reference_8x": spec_dict(s["reference_8x"]),
                "top_k": TOP_K, "beta": BETA, "learning_rate": LEARNING_RATE, "precision": "fp32",
                "selpipe": "ZeRO-0, torch AdamW, top-k 0.4", "trl": "DPOTrainer sigmoid loss, live ref_model, adamw_torch"}
    path = write_results("train_throughput", settings, rows, started)
    print(f"policy {parameter_count(s['policy']):,} parameters; 8x reference {parameter_count(s['reference_8x']):,}; "
          f"vocab {s['policy'].vocab}; max length {s['max_length']}; micro/global batch "
          f"{s['micro_batch_size']}/{s['global_batch_size']} pairs; {THREADS} threads")
    print_table([r for r in rows if r["kind"] == "throughput"],
                ["reference", "reference_parameters", "selpipe_pairs_per_s", "trl_pairs_per_s", "ratio_pairs_per_s",
                 "ratio_pairs_per_s_fastest", "selpipe_tokens_per_s", "trl_tokens_per_s", "selpipe_peak_rss_mib", "trl_peak_rss_mib"],
                "steady-state training throughput (pairs/s and tokens/s of the median step; peak RSS MiB)")
    print_table([r for r in rows if r["kind"] == "amortised"],
                ["reference", "runs", "stage_one_s", "selpipe_epoch_s", "trl_epoch_s", "ratio_trl_over_selpipe"],
                "one epoch, stage one amortised over N runs (seconds)")
    print(f"\nrows written to {path}")


if __name__ == "__main__":
    main()
