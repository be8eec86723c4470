"""Markdown tables of bench/results/*.json, for pasting into docs/benchmarks.md.

    .venv/bin/python bench/tables.py
"""

from __future__ import annotations

import json

from benchlib import RESULTS_DIR


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


SECTIONS = {
    "train_throughput": [
        (lambda r: r["kind"] == "throughput", [
            ("reference", "reference"), ("reference_parameters", "ref params"),
            ("selpipe_pairs_per_s", "selpipe pairs/s"), ("trl_pairs_per_s", "TRL pairs/s"), ("ratio_pairs_per_s", "ratio"),
            ("ratio_pairs_per_s_fastest", "ratio (fastest steps)"), ("selpipe_tokens_per_s", "selpipe tok/s"),
            ("trl_tokens_per_s", "TRL tok/s"), ("selpipe_peak_rss_mib", "selpipe peak RSS MiB"),
            ("trl_peak_rss_mib", "TRL peak RSS MiB"), ("stage_one_s", "stage one s")]),
        (lambda r: r["kind"] == "amortised", [
            ("reference", "reference"), ("runs", "runs sharing stage one"), ("stage_one_s", "stage one s"),
            ("selpipe_epoch_s", "selpipe s/epoch incl. share of stage one"), ("trl_epoch_s", "TRL s/epoch"),
            ("ratio_trl_over_selpipe", "speed-up")]),
    ],
    "memory": [(lambda r: True, [
        ("vocab", "vocab"), ("seq_len", "tokens/seq"), ("selpipe_step_peak_mib", "selpipe MiB"),
        ("selpipe_chunk1024_step_peak_mib", "selpipe chunk 1024 MiB"),
        ("trl_step_peak_mib", "TRL 1.16 fused MiB"), ("full_logits_step_peak_mib", "full logits MiB"),
        ("ratio_selpipe_over_trl", "selpipe / TRL"), ("ratio_selpipe_chunk1024_over_trl", "chunk 1024 / TRL"),
        ("ratio_selpipe_over_full_logits", "selpipe / full logits"),
        ("selpipe_step_s", "selpipe s"), ("trl_step_s", "TRL s"), ("full_logits_step_s", "full logits s")])],
    "scoring": [(lambda r: True, [
        ("backend", "backend"), ("startup_s", "start-up s"), ("warmup_s", "warm-up s (8 requests)"), ("score_s", "scoring s"),
        ("tokens_per_s", "tokens/s"),
        ("ratio_hf_over_this", "hf / this"), ("max_abs_diff_vs_hf", "max abs diff vs hf")])],
    "cache_size": [
        (lambda r: r["kind"] == "size", [("format", "format"), ("bytes", "bytes"),
                                          ("bytes_per_completion_token", "bytes / completion token"),
                                          ("ratio_to_selpipe", "x selpipe")]),
        (lambda r: r["kind"] == "stream", [("stream_pairs_per_s", "stream pairs/s"), ("pairs_streamed", "pairs"),
                                            ("training_pairs_per_s", "training pairs/s"),
                                            ("ratio_stream_over_training", "stream / training")]),
    ],
}


def main() -> None:
    for name, sections in SECTIONS.items():
        path = RESULTS_DIR / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        meta = data["meta"]
        print(f"### {name}  ({meta['command']}, {meta['date']}, load {meta['load_average_at_start'][0]:.1f} -> "
              f"{meta['load_average_at_end'][0]:.1f}, {meta['wall_seconds']} s)\n")
        for keep, columns in sections:
            print(table([r for r in data["rows"] if keep(r)], columns) + "\n")


if __name__ == "__main__":
    main()
