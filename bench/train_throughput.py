"""Training throughput: `selpipe train` from a score cache vs TRL `DPOTrainer` (live and precomputed
reference) vs a bare torch loop of selpipe's math.

    .venv/bin/python bench/train_throughput.py [--reduced] [--data demo|realistic] [--repeats N]
        [--systems selpipe,trl,trl-precompute,torch] [--ablation]

Same policy, data, micro batch, global batch and max length for every system; each training
runs in its own process. Two cases: a reference the size of the policy, and one about 8x larger.
The systems:

- `selpipe`: `selpipe train` (ZeRO-0, torch AdamW, fp32) on the cache stage one wrote.
- `trl`: `DPOTrainer` with a live `ref_model`, a reference forward in every step.
- `trl-precompute`: `DPOTrainer` with `precompute_ref_log_probs=True`: one reference pass over
  the data set before training (timed apart, `precompute_s`), then training without it.
- `torch`: `bench/torch_loop_run.py`, selpipe's math in a bare loop with no DeepSpeed, stream or
  metrics: the practical ceiling of `selpipe train` on this machine.

Runs are interleaved: each repeat runs every (case, system) once, in an order rotated by the
repeat, so a slow spell of the machine does not fall on one system. Within a run the first
`warmup_steps` optimizer steps are left out and the run's rate is that of its median step; a
system's headline is the median over its runs. The load average is printed before each run and
recorded with it. selpipe's stage one (scoring the data with the reference) is timed too, and
amortised over 1, 4 and 16 training runs of one epoch.

`--ablation` runs selpipe and the torch loop once per lever setting (`ABLATION`): none, each of
length-sorted micro batches, the selection-aware head and prefix sharing alone, and all three.
The torch loop takes them from the pure functions today; selpipe gets `--[no-]length-sorted-micro-batches`,
`--[no-]selective-head`, `--[no-]prefix-sharing` only under `--ablation`, and a variant whose flags
the installed `selpipe train` does not know is skipped with a note. Without `--ablation` selpipe
runs with its defaults and the torch loop with no lever (the math the trainer runs today).

`--data realistic` replaces the demo pairs (prompts of ~10 tokens, completions of one length)
by pairs whose lengths follow UltraFeedback's (`bench/realistic_data.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (
    BENCH_DIR, THREADS, VENV_BIN, WORK_DIR, ModelSpec, build_model, parameter_count, preference_rows, print_table,
    run_logged, set_threads, spec_dict, write_jsonl, write_results,
)
from realistic_data import length_summary, realistic_rows

SETTINGS = {
    "reduced": {
        "policy": ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384, vocab=4096),
        "reference_8x": ModelSpec(hidden=256, layers=12, heads=4, kv_heads=2, intermediate=768, vocab=4096),
        "pairs": 64, "completion_sentences": 4, "micro_batch_size": 4, "global_batch_size": 8,
        "warmup_steps": 2, "measured_steps": 4, "repeats": 1,
        "lengths": {"demo": (128, 32), "realistic": (512, 256)},  # (max_length, max_prompt_length)
    },
    "full": {
        "policy": ModelSpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=8192),
        "reference_8x": ModelSpec(hidden=512, layers=17, heads=8, kv_heads=2, intermediate=1536, vocab=8192),
        "pairs": 256, "completion_sentences": 12, "micro_batch_size": 4, "global_batch_size": 16,
        "warmup_steps": 2, "measured_steps": 8, "repeats": 3,
        # realistic: the limits of the usual UltraFeedback recipes (alignment-handbook's Zephyr DPO)
        "lengths": {"demo": (256, 32), "realistic": (1024, 512)},
    },
}
LEARNING_RATE, BETA, TOP_K = 1e-5, 0.1, 0.4
AMORTISED_OVER = (1, 4, 16)
SYSTEMS = ("selpipe", "trl", "trl-precompute", "torch")
LEVERS = {"length_sorted_micro_batches": "--length-sorted-micro-batches", "selective_head": "--selective-head",
          "prefix_sharing": "--prefix-sharing"}
ABLATION = {"none": (), "sorting": ("length_sorted_micro_batches",), "selective head": ("selective_head",),
            "prefix sharing": ("prefix_sharing",), "all": tuple(LEVERS)}
DEFAULTS = "defaults"  # the variant name of a run without lever flags


def lever_flags(variant: str) -> list[str]:
    """Every lever set explicitly on or off for an ablation variant; none for the defaults."""
    if variant == DEFAULTS:
        return []
    on = ABLATION[variant]
    return [flag if lever in on else flag.replace("--", "--no-", 1) for lever, flag in LEVERS.items()]


def selpipe_knows(flags: list[str]) -> bool:
    """Whether the installed `selpipe train` accepts these flags (the trainer's levers are new)."""
    help_text = subprocess.run([str(VENV_BIN / "selpipe"), "train", "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "300"}).stdout
    return all(flag in help_text for flag in flags)


def score_stage_one(reference: Path, data: Path, cache: Path, lengths: tuple[int, int]) -> dict:
    """selpipe stage one on the reference (hf backend, in this process); a fresh cache each time."""
    from selpipe.pipeline.config import ScoreConfig
    from selpipe.stages.score_ref import run_score_ref

    shutil.rmtree(cache, ignore_errors=True)
    set_threads()
    cfg = ScoreConfig(input=str(data), output=str(cache), model=str(reference), backend="hf", device="cpu",
                      max_length=lengths[0], max_prompt_length=lengths[1], progress=False)
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


def fresh(run: Path) -> Path:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    return run


def measured(command: list[str], run: Path) -> float:
    """Run a training process under `peak_rss.py`; its wall time."""
    return run_logged([sys.executable, str(BENCH_DIR / "peak_rss.py"), str(run / "peak.json"), *command], run / "train.log")


def peak_rss(run: Path) -> float:
    return json.loads((run / "peak.json").read_text())["peak_rss_mib"]


def run_selpipe_train(policy: Path, cache: Path, run: Path, s: dict, variant: str) -> dict:
    fresh(run)
    config = {"cache": str(cache), "policy": str(policy), "output": str(run / "out"), "top_k": TOP_K, "beta": BETA,
              "learning_rate": LEARNING_RATE, "max_steps": s["warmup_steps"] + s["measured_steps"],
              "global_batch_size": s["global_batch_size"], "micro_batch_size": s["micro_batch_size"], "zero_stage": 0,
              "precision": "fp32", "save_model": False, "progress": False, "log_every": 1}
    (run / "train.json").write_text(json.dumps(config, indent=2))
    wall = measured([str(VENV_BIN / "selpipe"), "train", "--config", str(run / "train.json"), *lever_flags(variant)], run)
    metrics = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines() if line]
    step_seconds = [s["global_batch_size"] / m["pairs_per_second"] for m in metrics]
    step_tokens = [m["tokens_per_second"] * t for m, t in zip(metrics, step_seconds)]
    return {**steady(step_seconds, step_tokens, s["global_batch_size"], s["warmup_steps"]),
            "process_seconds": wall, "peak_rss_mib": peak_rss(run)}


def common_arguments(s: dict) -> list[str]:
    return ["--micro-batch-size", str(s["micro_batch_size"]), "--global-batch-size", str(s["global_batch_size"]),
            "--steps", str(s["warmup_steps"] + s["measured_steps"]), "--learning-rate", str(LEARNING_RATE),
            "--beta", str(BETA), "--threads", str(THREADS)]


def run_trl(policy: Path, reference: Path, data: Path, run: Path, s: dict, precompute: bool) -> dict:
    fresh(run)
    wall = measured([
        str(BENCH_DIR / "trl_dpo_run.py"), "--policy", str(policy), "--reference", str(reference), "--data", str(data),
        "--output", str(run / "steps.json"), "--work-dir", str(run / "trainer"), "--max-length", str(s["max_length"]),
        *common_arguments(s), *(["--precompute-ref-log-probs"] if precompute else []),
    ], run)
    result = json.loads((run / "steps.json").read_text())
    return {**steady(result["step_seconds"], result["step_tokens"], result["pairs_per_step"], s["warmup_steps"]),
            "process_seconds": wall, "peak_rss_mib": peak_rss(run), "precompute_seconds": result["precompute_seconds"]}


def run_torch_loop(policy: Path, cache: Path, run: Path, s: dict, variant: str) -> dict:
    fresh(run)
    on = ABLATION["none" if variant == DEFAULTS else variant]
    wall = measured([
        str(BENCH_DIR / "torch_loop_run.py"), "--policy", str(policy), "--cache", str(cache),
        "--output", str(run / "steps.json"), "--top-k", str(TOP_K), *common_arguments(s),
        *(LEVERS[lever] for lever in on),
    ], run)
    result = json.loads((run / "steps.json").read_text())
    return {**steady(result["step_seconds"], result["step_tokens"], result["pairs_per_step"], s["warmup_steps"]),
            "process_seconds": wall, "peak_rss_mib": peak_rss(run)}


def median_of_runs(runs: list[dict]) -> dict:
    """A system's headline: medians over its runs of each run's (median-step) rates."""
    keys = ("pairs_per_second", "pairs_per_second_fastest", "tokens_per_second", "tokens_per_pair", "peak_rss_mib",
            "process_seconds")
    summary = {key: statistics.median(r[key] for r in runs) for key in keys}
    summary["step_seconds"] = [t for r in runs for t in r["step_seconds"]]
    summary["measured_steps"] = sum(r["measured_steps"] for r in runs)
    summary["run_pairs_per_second"] = [r["pairs_per_second"] for r in runs]
    if runs[0].get("precompute_seconds") is not None:
        summary["precompute_seconds"] = statistics.median(r["precompute_seconds"] for r in runs)
    return summary


def make_data(kind: str, s: dict, path: Path) -> Path:
    if kind == "realistic":  # one token of max_length left for the EOS both trainers append
        rows = realistic_rows(s["pairs"], max_prompt_length=s["max_prompt_length"], max_length=s["max_length"] - 1)
    else:
        rows = preference_rows(s["pairs"], s["completion_sentences"])
    return write_jsonl(rows, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="small models and few steps (a few minutes on 2 cores)")
    parser.add_argument("--data", choices=("demo", "realistic"), default="demo",
                        help="demo pairs, or pairs with UltraFeedback's length distribution (bench/realistic_data.py)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of every system (default: 1 reduced, 3 full)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--ablation", action="store_true",
                        help=f"selpipe and the torch loop once per lever setting: {', '.join(ABLATION)}")
    args = parser.parse_args()
    setting = "reduced" if args.reduced else "full"
    s = dict(SETTINGS[setting])
    s["max_length"], s["max_prompt_length"] = s.pop("lengths")[args.data]
    repeats = args.repeats or s["repeats"]
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    started = time.perf_counter()
    work = WORK_DIR / f"train-{setting}-{args.data}"

    policy = build_model(s["policy"], WORK_DIR / "models" / s["policy"].label())
    references = {"same size": policy,
                  "8x": build_model(s["reference_8x"], WORK_DIR / "models" / s["reference_8x"].label(), seed=1)}
    reference_specs = {"same size": s["policy"], "8x": s["reference_8x"]}
    data = make_data(args.data, s, work / "pairs.jsonl")
    lengths = length_summary([json.loads(line) for line in data.read_text().splitlines()])

    # Which lever settings each system runs: selpipe its defaults (the headline) and, under
    # --ablation, every variant its flags allow; the torch loop no lever, or every variant.
    variants = {system: [DEFAULTS] for system in systems}
    if args.ablation:
        if "torch" in systems:
            variants["torch"] = list(ABLATION)
        if "selpipe" in systems:
            if selpipe_knows([*lever_flags("all"), *lever_flags("none")]):
                variants["selpipe"] += list(ABLATION)
            else:
                print("note: this `selpipe train` has no lever flags yet; selpipe runs with its defaults only")
    jobs = [(case, system, variant) for case in references for system in systems for variant in variants[system]]

    stage_one = {case: score_stage_one(reference, data, work / f"cache-{case.replace(' ', '-')}",
                                       (s["max_length"], s["max_prompt_length"]))
                 for case, reference in references.items()}
    runs: dict[tuple[str, str, str], list[dict]] = {job: [] for job in jobs}
    raw = []
    for repeat in range(repeats):
        shift = repeat % len(jobs)
        for case, system, variant in jobs[shift:] + jobs[:shift]:
            slug = f"{system}-{case}-{variant}-{repeat}".replace(" ", "-")
            cache, run = work / f"cache-{case.replace(' ', '-')}", work / slug
            load_before = os.getloadavg()
            print(f"[repeat {repeat + 1}/{repeats}] {case}: {system} ({variant}); load average "
                  f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
            if system == "selpipe":
                result = run_selpipe_train(policy, cache, run, s, variant)
            elif system == "torch":
                result = run_torch_loop(policy, cache, run, s, variant)
            else:
                result = run_trl(policy, references[case], data, run, s, precompute=system == "trl-precompute")
            runs[case, system, variant].append(result)
            raw.append({"kind": "run", "reference": case, "system": system, "variant": variant, "repeat": repeat,
                        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
                        **result})

    summaries = {job: median_of_runs(results) for job, results in runs.items()}
    rows = list(raw)
    for (case, system, variant), summary in summaries.items():
        rows.append({"kind": "system", "reference": case, "system": system, "variant": variant,
                     "runs": len(runs[case, system, variant]), **{k: v for k, v in summary.items() if k != "step_seconds"}})
    for case in references:
        ours, peer = summaries.get((case, "selpipe", DEFAULTS)), summaries.get((case, "trl", DEFAULTS))
        if ours is None or peer is None:
            continue
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
            "stage_one_s": stage_one[case]["seconds"], "stage_one_tokens_per_s": stage_one[case]["tokens_per_second"],
            "measured_steps": ours["measured_steps"],
        })
        # One epoch over the benchmark data, steady-state rates; stage one paid once for N runs.
        # TRL's precomputed reference is paid by every run (it is not shared across processes).
        epoch_selpipe = s["pairs"] / ours["pairs_per_second"]
        epoch_trl = s["pairs"] / peer["pairs_per_second"]
        precomputed = summaries.get((case, "trl-precompute", DEFAULTS))
        for count in AMORTISED_OVER:
            selpipe_total = stage_one[case]["seconds"] / count + epoch_selpipe
            row = {"kind": "amortised", "reference": case, "runs": count, "stage_one_s": stage_one[case]["seconds"],
                   "selpipe_epoch_s": selpipe_total, "trl_epoch_s": epoch_trl,
                   "ratio_trl_over_selpipe": epoch_trl / selpipe_total}
            if precomputed:
                row["trl_precompute_epoch_s"] = precomputed["precompute_seconds"] + s["pairs"] / precomputed["pairs_per_second"]
                row["ratio_trl_precompute_over_selpipe"] = row["trl_precompute_epoch_s"] / selpipe_total
            rows.append(row)

    settings = {"setting": setting, "data": args.data, "length_summary": lengths, "repeats": repeats, "systems": systems,
                "ablation": args.ablation, **{k: v for k, v in s.items() if not isinstance(v, ModelSpec)},
                "policy": spec_dict(s["policy"]), "reference_8x": spec_dict(s["reference_8x"]),
                "top_k": TOP_K, "beta": BETA, "learning_rate": LEARNING_RATE, "precision": "fp32",
                "selpipe": "ZeRO-0, torch AdamW, top-k 0.4", "trl": "DPOTrainer sigmoid loss, adamw_torch",
                "torch": "bench/torch_loop_run.py: selpipe's math, no DeepSpeed/stream/metrics"}
    path = write_results("train_throughput", settings, rows, started)
    print(f"\npolicy {parameter_count(s['policy']):,} parameters; 8x reference {parameter_count(s['reference_8x']):,}; "
          f"vocab {s['policy'].vocab}; max length {s['max_length']}; micro/global batch "
          f"{s['micro_batch_size']}/{s['global_batch_size']} pairs; {THREADS} threads; {args.data} data "
          + "; ".join(f"{field} median {stats['median']:.0f} tokens" for field, stats in lengths.items()))
    print_table([r for r in rows if r["kind"] == "system"],
                ["reference", "system", "variant", "runs", "pairs_per_second", "pairs_per_second_fastest",
                 "tokens_per_second", "peak_rss_mib", "precompute_seconds"],
                f"steady-state training throughput: median over runs of each run's median step ({repeats} repeats)")
    print_table([r for r in rows if r["kind"] == "amortised"],
                ["reference", "runs", "stage_one_s", "selpipe_epoch_s", "trl_epoch_s", "trl_precompute_epoch_s",
                 "ratio_trl_over_selpipe", "ratio_trl_precompute_over_selpipe"],
                "one epoch, stage one amortised over N runs (seconds)")
    print(f"\nrows written to {path}")


if __name__ == "__main__":
    main()
