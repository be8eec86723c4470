"""Stage one's speed: selpipe's hf backend vs the naive loop on the same model and requests.

    python bench/gpu/scoring_speed.py --profile full --model SCORER --parameters N --device cuda --dtype bfloat16 --output OUT.json

The requests are the stage-one speed pairs of the proof's profile (each pair's chosen and
rejected sequence, EOS appended, exactly what `score-ref` scores). Rows:

- `hf`: `selpipe.stages.backends.HFScorer` with score-ref's default token budget (16,384);
- `hf budget 65536`: the same with four times that budget (bigger batches);
- `naive`: bench/scoring.py's naive loop (one sequence per forward, log-softmax over the full
  logits), its model moved to the same device and dtype.

Each scores 8 warm-up requests first (bench/scoring.py's `time_scorer`); tokens/s counts every
token of every sequence. Model FLOP utilisation is 2 x parameters x tokens / seconds / peak,
with the peak of an H100 or H200's dense bf16 tensor cores (989 TFLOP/s, NVIDIA's datasheet
figure for the SXM parts); on any other device it is not computed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # bench/ (this folder is already first: the script's own)

from fixtures import PROFILES, stage_one_speed_pairs  # noqa: E402
from scoring import NaiveScorer, max_difference, time_scorer  # noqa: E402  (bench/scoring.py)

HOPPER_BF16_DENSE_FLOPS = 989e12


def peak_flops(device_name: str | None) -> float | None:
    return HOPPER_BF16_DENSE_FLOPS if device_name and ("H100" in device_name or "H200" in device_name) else None


def naive_on(model: str, device: str, dtype: str) -> NaiveScorer:
    """bench/scoring.py's naive loop on `device` in `dtype` (it loads fp32 on the CPU)."""
    import torch

    scorer = NaiveScorer(model)
    scorer.model.to(device=device, dtype=getattr(torch, dtype))
    return scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--model", required=True, help="the scorer built by fixtures.py")
    parser.add_argument("--parameters", type=int, required=True, help="its parameter count (for the MFU)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from selpipe.pipeline.config import ScoreConfig
    from selpipe.stages.backends import HFScorer

    profile = PROFILES[args.profile]
    requests = [r for pair in stage_one_speed_pairs(profile) for r in pair.requests(profile.vocab)]
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    peak = peak_flops(device_name)
    default_budget = ScoreConfig.token_budget  # what score-ref uses unless told otherwise
    backends = {
        "hf": lambda: HFScorer(args.model, dtype=args.dtype, device=args.device, token_budget=default_budget),
        f"hf budget {4 * default_budget}": lambda: HFScorer(args.model, dtype=args.dtype, device=args.device,
                                                            token_budget=4 * default_budget),
        "naive": lambda: naive_on(args.model, args.device, args.dtype),
    }
    rows, outputs = [], {}
    for name, make in backends.items():
        if name == "naive":
            # The naive loop builds its inputs with torch.tensor(): on the default device, made the model's here.
            with torch.device(args.device):
                measured, outputs[name] = time_scorer(make, requests)
        else:
            measured, outputs[name] = time_scorer(make, requests)
        flops = 2 * args.parameters * measured["tokens"]
        rows.append({"backend": name, **measured, "mfu": flops / measured["score_s"] / peak if peak else None})
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next backend loads its own copy of the model
    for row in rows:
        row["max_abs_diff_vs_hf"] = max_difference(outputs["hf"], outputs[row["backend"]])
    naive = next(r for r in rows if r["backend"] == "naive")
    result = {
        "device": device_name or "cpu", "dtype": args.dtype, "model_parameters": args.parameters,
        "vocab": profile.vocab, "sequences": len(requests),
        "mean_tokens_per_sequence": rows[0]["tokens"] / len(requests), "peak_flops": peak,
        "mfu_definition": "2 x parameters x tokens / seconds / peak_flops (dense bf16 tensor-core peak)",
        "rows": rows, "hf_over_naive": rows[0]["tokens_per_s"] / naive["tokens_per_s"], "hf_mfu": rows[0]["mfu"],
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
