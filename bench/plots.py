"""PNG plots for docs/benchmarks.md from the rows in bench/results/*.json.

    .venv/bin/python bench/plots.py

Writes docs/img/memory_vs_seqlen.png, docs/img/train_throughput.png, docs/img/cache_size.png,
docs/img/train_throughput_realistic.png and docs/img/lever_ablation.png for whichever result
files exist.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from benchlib import REPO, RESULTS_DIR

IMG_DIR = REPO / "docs" / "img"
MEMORY_METHODS = {"selpipe": "selpipe (logprob_chunk 256, default)", "selpipe_chunk1024": "selpipe (logprob_chunk 1024)",
                  "trl": "TRL 1.16 fused LM head", "full_logits": "full logits + log_softmax"}


def load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def memory_plot(result: dict) -> None:
    rows = result["rows"]
    vocabs = sorted({r["vocab"] for r in rows})
    figure, axes = plt.subplots(1, len(vocabs), figsize=(5 * len(vocabs), 4), squeeze=False)
    for axis, vocab in zip(axes[0], vocabs):
        mine = sorted((r for r in rows if r["vocab"] == vocab), key=lambda r: r["seq_len"])
        for method, label in MEMORY_METHODS.items():
            points = [(r["seq_len"], r[f"{method}_step_peak_mib"]) for r in mine if f"{method}_step_peak_mib" in r]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set(title=f"vocab {vocab:,}", xlabel="tokens per sequence (one pair = 2 sequences)",
                 ylabel="peak memory added by the step (MiB)")
        axis.set_xscale("log", base=2)
        axis.minorticks_off()
        axis.set_xticks([r["seq_len"] for r in mine], [str(r["seq_len"]) for r in mine])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Log-prob forward + backward of one pair, peak memory (CPU RSS)")
    figure.tight_layout()
    figure.savefig(IMG_DIR / "memory_vs_seqlen.png", dpi=110)
    plt.close(figure)


def train_plot(result: dict) -> None:
    rows = [r for r in result["rows"] if r["kind"] == "throughput"]
    labels = [f"reference {r['reference']}" for r in rows]
    positions = range(len(rows))
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar([p - 0.2 for p in positions], [r["selpipe_pairs_per_s"] for r in rows], width=0.4, label="selpipe train (cache)")
    axis.bar([p + 0.2 for p in positions], [r["trl_pairs_per_s"] for r in rows], width=0.4, label="TRL DPOTrainer (live ref)")
    axis.set_xticks(list(positions), labels)
    axis.set(ylabel="pairs/s (median steady-state step)", title="Training throughput, same policy and batches")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(IMG_DIR / "train_throughput.png", dpi=110)
    plt.close(figure)


SYSTEM_LABELS = {"selpipe": "selpipe train", "trl": "TRL live reference", "trl-precompute": "TRL precompute_ref_log_probs",
                 "torch": "torch loop (ceiling)"}


def realistic_plot(result: dict) -> None:
    """The four systems at realistic lengths, per reference size."""
    rows = [r for r in result["rows"] if r.get("system") in SYSTEM_LABELS and r.get("variant") == "defaults"]
    cases = list(dict.fromkeys(r["reference"] for r in rows))
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(SYSTEM_LABELS)
    for index, (system, label) in enumerate(SYSTEM_LABELS.items()):
        rates = [next(r["pairs_per_second"] for r in rows if r["reference"] == case and r["system"] == system) for case in cases]
        axis.bar([c + (index - 1.5) * width for c in range(len(cases))], rates, width=width, label=label)
    axis.set_xticks(range(len(cases)), [f"reference {case}" for case in cases])
    axis.set(ylabel="pairs/s (median step)", title="Training at UltraFeedback-like lengths (CPU, fp32)")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(IMG_DIR / "train_throughput_realistic.png", dpi=110)
    plt.close(figure)


def ablation_plot(result: dict) -> None:
    """Each lever alone and together, as a ratio to no lever, for selpipe and the torch loop."""
    rows = [r for r in result["rows"] if r.get("system") in ("selpipe", "torch") and r.get("variant") not in (None, "defaults")]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    figure, axis = plt.subplots(figsize=(7, 4))
    series = [(system, case) for system in ("selpipe", "torch") for case in ("same size", "8x")]
    width = 0.8 / len(series)
    for index, (system, case) in enumerate(series):
        base = next(r["pairs_per_second"] for r in rows if (r["system"], r["reference"], r["variant"]) == (system, case, "none"))
        ratios = [next(r["pairs_per_second"] for r in rows if (r["system"], r["reference"], r["variant"]) == (system, case, v)) / base
                  for v in variants]
        axis.bar([v + (index - 1.5) * width for v in range(len(variants))], ratios, width=width, label=f"{system}, {case}")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(variants)), variants)
    axis.set(ylabel="pairs/s relative to no lever", title="Lever ablation at realistic lengths (reduced setting)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(IMG_DIR / "lever_ablation.png", dpi=110)
    plt.close(figure)


def cache_plot(result: dict) -> None:
    rows = [r for r in result["rows"] if r["kind"] == "size" and "manifest" not in r["format"]]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.barh([r["format"] for r in rows], [r["bytes_per_completion_token"] for r in rows])
    axis.axvline(5, color="grey", linestyle="--", label="target: 5 bytes")
    axis.set(xlabel="bytes per completion token", title="Score cache size by encoding")
    axis.legend()
    figure.tight_layout()
    figure.savefig(IMG_DIR / "cache_size.png", dpi=110)
    plt.close(figure)


def main() -> None:
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    for name, plot in (("memory", memory_plot), ("train_throughput", train_plot), ("cache_size", cache_plot),
                       ("train_throughput_realistic", realistic_plot),
                       ("train_throughput_realistic_ablation_reduced", ablation_plot)):
        result = load(name)
        if result is not None:
            plot(result)
            print(f"plotted {name}")


if __name__ == "__main__":
    main()
