"""Reproduce Selective-DPO's claims at small scale, on a task where the deciding tokens are known.

    .venv/bin/python bench/reproduce.py                 # the full sweep, about 8 minutes on 2 CPU cores
    .venv/bin/python bench/reproduce.py --smoke --runs /tmp/r --docs /tmp/d   # the pipeline in a minute

The paper (arXiv 2507.07725) claims that (1) a minority of tokens carries the preference signal
and training on the top ~40% by alignment score beats training on all tokens, (2) selecting too
few or too many tokens both do worse, and (3) a stronger reference model selects better tokens
and trains a better policy. Here, on the planted task of `data/planted.py`:

1. train a tokenizer and three models from scratch (`bench/reproduce_models.py`);
2. run selpipe's stage one once per reference (`run_score_ref`): a strong and a weak cache of
   the training pairs, plus an eval cache of held-out pairs scored by the policy start, so that
   held-out preference accuracy means the same thing for every run whichever reference trained it;
3. measure selection quality at the start: precision and recall of the planted deciding tokens
   within the top-k mask that selpipe's own selection code computes;
4. train with selpipe's real stage two (`selpipe train` on DeepSpeed, one subprocess per run),
   plain DPO (k = 1) against Selective-DPO at several k, several seeds, same steps, and k = 0.4
   with the weak reference; score each final policy by greedy generation on held-out prompts;
5. write docs/results.md (tables, plots, verdicts computed from the measurements) and a
   screenshot of `render_html`'s token-selection page.

Run directories are reused when their settings match, so an interrupted sweep resumes.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "bench"):  # `data/` and `bench/` are folders of scripts, not installed packages
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402

from data.planted import RULES, generate_pairs, generate_prompts, write_jsonl  # noqa: E402
from reproduce_models import ModelSpec, task_accuracy_by_rule, train_models  # noqa: E402
from selpipe.pipeline.batching import collate_pairs  # noqa: E402
from selpipe.pipeline.cache import file_sha256, load_manifest, read_rows  # noqa: E402
from selpipe.pipeline.config import ScoreConfig  # noqa: E402
from selpipe.pipeline.logprobs import completion_logprobs, to_padded  # noqa: E402
from selpipe.pipeline.selection import alignment_scores, top_k_mask  # noqa: E402
from selpipe.stages.inspect_html import render_html  # noqa: E402
from selpipe.stages.score_ref import run_score_ref  # noqa: E402

REFERENCES = ("strong", "weak")


@dataclass(frozen=True)
class Settings:
    """Everything that shapes the experiment; the full sweep and the smoke test differ only here."""

    models: tuple[ModelSpec, ...]
    demonstrations: int = 20000
    train_pairs: int = 3000
    eval_pairs: int = 512
    generation_prompts: int = 256
    model_eval_prompts: int = 128
    selection_pairs: int = 1000
    selection_ks: tuple[float, ...] = (0.2, 0.4, 0.6)
    sweep_ks: tuple[float, ...] = (1.0, 0.2, 0.4, 0.6, 0.8)
    reference_k: float = 0.4
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 150
    global_batch_size: int = 32
    micro_batch_size: int = 32
    learning_rate: float = 1e-4
    beta: float = 0.1
    warmup_steps: int = 10
    data_seed: int = 1

    def train_flags(self) -> list[str]:
        return ["--max-steps", str(self.steps), "--global-batch-size", str(self.global_batch_size),
                "--micro-batch-size", str(self.micro_batch_size), "--learning-rate", str(self.learning_rate),
                "--beta", str(self.beta), "--warmup-steps", str(self.warmup_steps)]


FULL = Settings(models=(
    # Larger and trained until it solves held-out prompts (checked every 250 steps).
    ModelSpec("strong", layers=4, hidden_size=128, heads=2, intermediate_size=512, max_steps=1000,
              target_accuracy=0.97, seed=11),
    # Smaller and trained briefly: a real but unreliable judge of the task.
    ModelSpec("weak", layers=1, hidden_size=128, heads=2, intermediate_size=256, max_steps=200, eval_every=200, seed=12),
    # Trained briefly: knows the response format, often gets the letters wrong.
    ModelSpec("policy", layers=2, hidden_size=128, heads=2, intermediate_size=256, max_steps=100, eval_every=100, seed=13),
))

SMOKE = Settings(
    models=tuple(replace(m, max_steps=4, eval_every=4, target_accuracy=1.0) for m in FULL.models),
    demonstrations=256, train_pairs=64, eval_pairs=16, generation_prompts=8, model_eval_prompts=8,
    selection_pairs=32, sweep_ks=(1.0, 0.4), seeds=(0,), steps=2, global_batch_size=8, micro_batch_size=8,
    warmup_steps=0,
)


def log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def standard_error(values: list[float]) -> float:
    return mean_sd(values)[1] / len(values) ** 0.5


def inputs_identity(*paths: Path) -> list[str]:
    """Checksums of what a step consumed (a model's weights, a cache's manifest, a data file).

    A step's stored result is reused only when these match, so retrained models or regenerated
    data never meet stale caches or runs.
    """
    files = [p / "model.safetensors" if (p / "model.safetensors").exists() else p / "manifest.json" if p.is_dir() else p
             for p in paths]
    return [file_sha256(f) for f in files]


# ---------------------------------------------------------------------------- data and stage one


def write_data(settings: Settings, runs: Path, tokenizer: Any) -> dict[str, Path]:
    """The train and held-out preference JSONL, with the planted deciding positions."""
    paths = {"train": runs / "data" / "train.jsonl", "eval": runs / "data" / "eval.jsonl"}
    write_jsonl(paths["train"], generate_pairs(settings.train_pairs, settings.data_seed, "train", tokenizer))
    write_jsonl(paths["eval"], generate_pairs(settings.eval_pairs, settings.data_seed + 1, "eval", tokenizer))
    return paths


def score(input_path: Path, model: Path, output: Path) -> dict[str, Any]:
    """Stage one into `output`, timed; a finished cache of the same input and model is reused with its timing."""
    timing = output / "stage-one-timing.json"
    identity = inputs_identity(input_path, model)
    if timing.exists() and json.loads(timing.read_text()).get("inputs") == identity:
        return json.loads(timing.read_text())
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    summary = run_score_ref(ScoreConfig(input=str(input_path), output=str(output), model=str(model),
                                        max_length=96, max_prompt_length=32, progress=False))
    record = {"seconds": round(time.perf_counter() - started, 2), "rows": summary["rows"],
              "tokens": summary["tokens_scored_now"], "inputs": identity}
    timing.write_text(json.dumps(record) + "\n")
    return record


def load_truth(path: Path) -> dict[str, dict[str, list[int]]]:
    truth = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        truth[row["id"]] = {"chosen": row["chosen_deciding"], "rejected": row["rejected_deciding"]}
    return truth


# ---------------------------------------------------------------------------- selection quality


@torch.no_grad()
def selection_quality(settings: Settings, cache: Path, policy: Path, truth: dict[str, dict[str, list[int]]],
                      pad_id: int) -> dict[float, dict[str, float]]:
    """Per k: precision and recall of the planted deciding tokens within selpipe's top-k mask.

    Scores come from the policy start's log-probs and the cache's reference log-probs, exactly as
    at the first training step. Counts are pooled over both sides of every pair.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    model.eval()
    rows = list(read_rows(cache, load_manifest(cache)))[:settings.selection_pairs]
    counts = {k: {"hits": 0, "selected": 0} for k in settings.selection_ks}
    deciding_total = tokens_total = 0
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        batch = collate_pairs(chunk, pad_id)
        flat = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask)
        policy_logps, mask = to_padded(flat, batch.completion_lengths)
        is_deciding = torch.zeros_like(mask)
        for side_index, side in enumerate(("chosen", "rejected")):
            for i, row in enumerate(chunk):
                assert len(row[f"{side}_ids"]) > max(truth[row["id"]][side]), "planted positions must index the cached ids"
                is_deciding[side_index * len(chunk) + i, truth[row["id"]][side]] = True
        chosen = torch.arange(mask.shape[0]) < len(chunk)
        scores = torch.where(chosen.unsqueeze(1), alignment_scores(policy_logps, batch.reference, chosen=True),
                             alignment_scores(policy_logps, batch.reference, chosen=False))
        deciding_total += int(is_deciding.sum())
        tokens_total += int(mask.sum())
        for k in settings.selection_ks:
            selected = top_k_mask(scores, mask, k)
            counts[k]["hits"] += int((selected & is_deciding).sum())
            counts[k]["selected"] += int(selected.sum())
    base_rate = deciding_total / tokens_total
    return {k: {"precision": c["hits"] / c["selected"], "recall": c["hits"] / deciding_total,
                "selected_fraction": c["selected"] / tokens_total, "base_rate": base_rate}
            for k, c in counts.items()}


# ---------------------------------------------------------------------------- stage two runs


def selpipe_executable() -> str:
    beside = Path(sys.executable).parent / "selpipe"
    return str(beside) if beside.exists() else shutil.which("selpipe") or "selpipe"


def train_run(settings: Settings, runs: Path, caches: dict[str, Path], policy: Path, reference: str, k: float,
              seed: int, prompts: list[str]) -> dict[str, Any]:
    """One `selpipe train` subprocess, then greedy task accuracy of its final model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = runs / "train" / f"{reference}-k{k:g}-seed{seed}"
    result_path = output / "result.json"
    command = [selpipe_executable(), "train", "--cache", str(caches[reference]), "--policy", str(policy),
               "--output", str(output), "--eval-cache", str(caches["eval"]), "--top-k", str(k), "--seed", str(seed),
               "--no-progress", *settings.train_flags()]
    identity = inputs_identity(caches[reference], caches["eval"], policy)
    if result_path.exists() and json.loads(result_path.read_text()).get("inputs") == [command, identity]:
        return json.loads(result_path.read_text())
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(output.with_suffix(".log"), "w") as log_file:
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"selpipe train failed ({completed.returncode}); see {output.with_suffix('.log')}")
    summary = json.loads((output / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    by_rule = task_accuracy_by_rule(model, AutoTokenizer.from_pretrained(output / "model"), prompts)
    result = {
        "reference": reference, "k": k, "seed": seed, "command": command, "inputs": [command, identity],
        "task_accuracy": by_rule["all"], **{f"task_accuracy/{rule}": by_rule[rule] for rule in RULES},
        "preference_accuracy": summary["eval_after"]["eval/preference_accuracy"],
        "preference_accuracy_before": summary["eval_before"]["eval/preference_accuracy"],
        "wall_seconds": round(wall, 2), "train_loop_seconds": summary["seconds"],
        "final_selected_fraction": summary["final"]["selected_fraction/chosen"],
    }
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------- the report


def _fmt(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f}"


def _difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), standard error of that difference)."""
    return statistics.fmean(a) - statistics.fmean(b), (standard_error(a) ** 2 + standard_error(b) ** 2) ** 0.5


def _verdict(diff: float, se: float) -> str:
    """'held' / 'did not hold' when the difference exceeds two standard errors, else 'inconclusive'."""
    if diff > 2 * se:
        return "held"
    if diff < -2 * se:
        return "did not hold (the opposite was measured)"
    return "inconclusive (within noise)"


METRICS = {"task accuracy": "task_accuracy", "preference accuracy": "preference_accuracy"}


def claims(settings: Settings, groups: dict[tuple[str, float], list[dict[str, Any]]],
           selection: dict[str, dict[float, dict[str, float]]], deciding_fraction: float) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each claim, computed from the measurements, one verdict per metric."""
    values = {label: {key: [r[name] for r in rows] for key, rows in groups.items()} for label, name in METRICS.items()}
    k_ref = settings.reference_k
    out = []

    verdicts, evidence = [], []
    for label, v in values.items():
        diff, se = _difference(v["strong", k_ref], v["strong", 1.0])
        verdicts.append(f"{label}: **{_verdict(diff, se)}**")
        evidence.append(f"{label} {diff:+.3f} (SE {se:.3f})")
    evidence.append(f"deciding tokens are {100 * deciding_fraction:.1f}% of completion tokens")
    out.append((f"(1) Selective-DPO at k={k_ref:g} beats plain DPO (k=1)", "<br>".join(verdicts), "; ".join(evidence)))

    swept = sorted(k for (ref, k) in groups if ref == "strong")
    interior = [k for k in swept if k not in (swept[0], swept[-1])]
    if interior:
        verdicts, evidence = [], []
        for label, v in values.items():
            best = max(interior, key=lambda k: statistics.fmean(v["strong", k]))
            low = _difference(v["strong", best], v["strong", swept[0]])
            high = _difference(v["strong", best], v["strong", swept[-1]])
            both = {_verdict(*low), _verdict(*high)}
            verdict = both.pop() if len(both) == 1 else \
                f"vs k={swept[0]:g}: {_verdict(*low)}; vs k={swept[-1]:g}: {_verdict(*high)}"
            verdicts.append(f"{label}: **{verdict}**")
            evidence.append(f"{label}: best interior k={best:g}, {low[0]:+.3f} (SE {low[1]:.3f}) vs k={swept[0]:g}, "
                            f"{high[0]:+.3f} (SE {high[1]:.3f}) vs k={swept[-1]:g}")
        out.append(("(2) too few and too many selected tokens both do worse", "<br>".join(verdicts), "; ".join(evidence)))

    precision = {ref: selection[ref][k_ref]["precision"] for ref in REFERENCES}
    recall = {ref: selection[ref][k_ref]["recall"] for ref in REFERENCES}
    selects_better = precision["strong"] > precision["weak"] and recall["strong"] > recall["weak"]
    verdicts = [f"selection: **{'held' if selects_better else 'did not hold'}**"]
    evidence = [f"at k={k_ref:g} precision strong {precision['strong']:.3f} vs weak {precision['weak']:.3f}, "
                f"recall {recall['strong']:.3f} vs {recall['weak']:.3f}"]
    for label, v in values.items():
        diff, se = _difference(v["strong", k_ref], v["weak", k_ref])
        verdicts.append(f"training, {label}: **{_verdict(diff, se)}**")
        evidence.append(f"{label} {diff:+.3f} (SE {se:.3f})")
    out.append(("(3) a stronger reference selects better tokens and trains a better policy", "<br>".join(verdicts),
                "; ".join(evidence)))
    return out


def plot(settings: Settings, groups: dict[tuple[str, float], list[dict[str, Any]]],
         selection: dict[str, dict[float, dict[str, float]]], start: dict[str, float], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    sweep = img / "reproduce-k-sweep.png"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "task_accuracy", "held-out task accuracy (greedy)"),
                              (axes[1], "preference_accuracy", "held-out preference accuracy")):
        ks = sorted(k for (ref, k) in groups if ref == "strong")
        for k in ks:
            values = [r[metric] for r in groups["strong", k]]
            ax.scatter([k] * len(values), values, color="tab:blue", alpha=0.35, s=14)
        means = [statistics.fmean(r[metric] for r in groups["strong", k]) for k in ks]
        sds = [mean_sd([r[metric] for r in groups["strong", k]])[1] for k in ks]
        ax.errorbar(ks, means, yerr=sds, color="tab:blue", marker="o", capsize=3, label="strong reference")
        weak = [r[metric] for r in groups["weak", settings.reference_k]]
        ax.errorbar([settings.reference_k + 0.02], [statistics.fmean(weak)], yerr=[mean_sd(weak)[1]], color="tab:red",
                    marker="s", capsize=3, linestyle="none", label="weak reference")
        ax.axhline(start[metric], color="grey", linestyle="--", linewidth=1, label="policy start")
        ax.set_xlabel("k (fraction of tokens selected; k=1 is plain DPO)")
        ax.set_title(title)
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sweep, dpi=110)
    plt.close(fig)

    quality = img / "reproduce-selection.png"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("precision", "recall")):
        for ref, color in zip(REFERENCES, ("tab:blue", "tab:red")):
            ks = sorted(selection[ref])
            ax.plot(ks, [selection[ref][k][metric] for k in ks], marker="o", color=color, label=f"{ref} reference")
        ks = sorted(selection["strong"])
        chance = [selection["strong"][k]["base_rate"] if metric == "precision" else selection["strong"][k]["selected_fraction"]
                  for k in ks]
        ax.plot(ks, chance, linestyle="--", color="grey", label="random selection")
        ax.set_xlabel("k")
        ax.set_title(f"{metric} of the deciding tokens in the top-k mask", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
    fig.suptitle("selection at the policy start, by reference", fontsize=11)
    fig.tight_layout()
    fig.savefig(quality, dpi=110)
    plt.close(fig)
    return [sweep, quality]


def screenshot(page: Path, png: Path) -> bool:
    """A PNG of the HTML page with headless Chromium, where it is installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return False
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,900", "--hide-scrollbars", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return png.exists()


def write_report(settings: Settings, docs: Path, command: str, models: dict[str, dict[str, Any]], data_stats: dict[str, float],
                 stage_one: dict[str, dict[str, Any]], selection: dict[str, dict[float, dict[str, float]]],
                 groups: dict[tuple[str, float], list[dict[str, Any]]], generation: dict[str, dict[str, float]],
                 start_preference: float, images: list[Path], shot: Path | None, total_seconds: float) -> Path:
    rel = lambda p: os.path.relpath(p, docs)  # noqa: E731
    start_by_rule = " | ".join(f"{generation['policy'][rule]:.3f}" for rule in RULES)
    runs = [r for rows in groups.values() for r in rows]
    sweep_seconds = (sum(m["seconds"] for m in models.values()) + sum(r["seconds"] for r in stage_one.values())
                     + sum(r["wall_seconds"] for r in runs))
    per_rule = "; ".join(
        f"`{rule}`: policy start {generation['policy'][rule]:.3f}, trained policies "
        f"{min(statistics.fmean(r[f'task_accuracy/{rule}'] for r in rows) for rows in groups.values()):.3f} to "
        f"{max(statistics.fmean(r[f'task_accuracy/{rule}'] for r in rows) for rows in groups.values()):.3f} "
        f"(group means), strong reference {generation['strong'][rule]:.3f}, weak reference {generation['weak'][rule]:.3f}"
        for rule in RULES)
    lines = [
        "# Reproducing Selective-DPO's claims on a planted task",
        "",
        "Generated by `bench/reproduce.py`; every number below is measured by that one command:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"This invocation took {total_seconds / 60:.1f} min; the measured steps of a fresh sweep add up to "
        f"{sweep_seconds / 60:.1f} min (model training, stage one, training runs with their evaluation; results of "
        f"earlier invocations with identical inputs are reused). Machine: {os.cpu_count()} CPU cores shared with other "
        f"work, {torch.get_num_threads()} torch thread per process, so timings are indicative.",
        "",
        "## Verdicts",
        "",
        "| claim | here | evidence |",
        "| --- | --- | --- |",
        *[f"| {claim} | {verdict} | {evidence} |" for claim, verdict, evidence in claims(settings, groups, selection, data_stats["deciding_fraction"])],
        "",
        "A claim *held* when the measured difference exceeds two standard errors of the difference over seeds, "
        "*did not hold* when the opposite difference does, and is *inconclusive* otherwise. These are outcomes of "
        "one small synthetic task, measured as they came; the task was not adjusted after seeing them.",
        "",
        "## The task",
        "",
        "`data/planted.py`: a rule (`reverse` or `sort`) and eight distinct letters; the answer is checked by a program. "
        "Each response wraps the answer in random filler words that carry no preference. The rejected answer differs "
        "from the chosen one in one substituted letter or two swapped adjacent letters (the *deciding* tokens); "
        "its filler differs too. Token positions of the deciding tokens are computed with the task tokenizer the way "
        "selpipe tokenizes (completion alone, EOS appended), so they index the cached ids.",
        "",
        f"- {settings.train_pairs} training pairs, {settings.eval_pairs} held-out pairs, {settings.generation_prompts} held-out prompts for generation",
        f"- completion length {data_stats['mean_tokens']:.1f} tokens on average; deciding tokens per completion "
        f"{data_stats['mean_deciding']:.2f} ({100 * data_stats['deciding_fraction']:.1f}% of completion tokens)",
        "",
        "## Models (trained from scratch here, one tokenizer)",
        "",
        f"Task accuracy of greedy generations on the {settings.generation_prompts} held-out prompts, overall and per rule.",
        "",
        f"| role | layers | hidden | parameters | SFT steps | SFT seconds | task accuracy | {' | '.join(RULES)} |",
        "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(RULES),
        *[f"| {name} | {m['spec']['layers']} | {m['spec']['hidden_size']} | {m['parameters']:,} | {m['steps']} | "
          f"{m['seconds']} | {generation[name]['all']:.3f} | {' | '.join(f'{generation[name][r]:.3f}' for r in RULES)} |"
          for name, m in models.items()],
        "",
        f"The policy start's held-out preference accuracy is {start_preference:.3f}: a tie, by definition (see below).",
        "",
        "## Selection quality at the start",
        "",
        "Precision and recall of the planted deciding tokens within the top-k mask of the alignment score "
        "(`selpipe.pipeline.selection.top_k_mask` on policy-start log-probs and cached reference log-probs), pooled over "
        f"both sides of the first {settings.selection_pairs} training pairs. Random selection has precision equal to the "
        "share of deciding tokens and recall about k.",
        "",
        "| reference | k | precision | recall | random precision |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {ref} | {k:g} | {q['precision']:.3f} | {q['recall']:.3f} | {q['base_rate']:.3f} |"
          for ref in REFERENCES for k, q in sorted(selection[ref].items())],
        "",
        f"![selection quality]({rel(images[1])})",
        "",
        "## Training: plain DPO against Selective-DPO",
        "",
        f"selpipe's stage two (`selpipe train`, DeepSpeed ZeRO-0 on CPU), {settings.steps} steps of {settings.global_batch_size} pairs, "
        f"lr {settings.learning_rate:g} (cosine, {settings.warmup_steps} warm-up), beta {settings.beta:g}, from the same policy start; "
        f"seeds {', '.join(map(str, settings.seeds))}. The seed sets the data order only: every run starts from the same "
        "policy and reads the same cache, so the spread understates what different initialisations would show. "
        "Mean ± standard deviation over seeds. "
        "*Task accuracy*: greedy generations on held-out prompts, checked by the program. *Preference accuracy*: share "
        "of held-out pairs whose chosen response gained more log-likelihood than the rejected one relative to the policy start "
        "(the eval cache is scored by the policy start, so this means the same for every reference).",
        "",
        f"| reference | k | task accuracy | {' | '.join(RULES)} | preference accuracy | wall s / run | train-loop s |",
        "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(RULES),
        f"| (policy start) | | {generation['policy']['all']:.3f} | {start_by_rule} | {start_preference:.3f} | | |",
        *[f"| {ref} | {k:g}{' (DPO)' if k == 1 else ''} | {_fmt([r['task_accuracy'] for r in rows])} | "
          f"{' | '.join(_fmt([r[f'task_accuracy/{rule}'] for r in rows]) for rule in RULES)} | "
          f"{_fmt([r['preference_accuracy'] for r in rows])} | {statistics.fmean(r['wall_seconds'] for r in rows):.1f} | "
          f"{statistics.fmean(r['train_loop_seconds'] for r in rows):.1f} |"
          for (ref, k), rows in sorted(groups.items(), key=lambda item: (item[0][0] != "strong", -item[0][1]))],
        "",
        f"Per rule ({per_rule}): the overall task accuracy is a mix of the two rules, so read it with this split.",
        "",
        f"![k sweep]({rel(images[0])})",
        "",
        "## Cost: one stage one, many runs",
        "",
        "| cache | scored by | rows | stage-one seconds | training runs reusing it | stage one per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, record in stage_one.items():
        reusing = sum(len(rows) for (ref, _), rows in groups.items() if ref == name) if name in REFERENCES else \
            sum(len(rows) for rows in groups.values())
        scorer = "policy start" if name == "eval" else f"{name} reference"
        lines.append(f"| {name} | {scorer} | {record['rows']} | {record['seconds']:.1f} | {reusing} | "
                     f"{record['seconds'] / max(reusing, 1):.2f} |")
    pairs_per_run = settings.steps * settings.global_batch_size
    strong = stage_one["strong"]
    online = strong["seconds"] * pairs_per_run / strong["rows"]
    strong_loop = statistics.fmean(r["train_loop_seconds"] for (ref, _), rows in groups.items() if ref == "strong" for r in rows)
    lines += [
        "",
        f"Each run sees {pairs_per_run} pairs; a trainer that ran the reference inside every step would pay about "
        f"{online:.1f} s of strong-reference forward passes per run (an estimate at stage one's measured throughput, "
        f"model loading included), {online / strong_loop:.1f}x the {strong_loop:.1f} s training loop of a run here. "
        f"selpipe paid {strong['seconds']:.1f} s once for all {sum(len(rows) for (ref, _), rows in groups.items() if ref == 'strong')} "
        "strong-reference runs.",
        "",
        "## Seeing the selection",
        "",
        "`selpipe.stages.inspect_html.render_html(cache, out, policy=...)` renders pairs with every completion token shaded by "
        "its alignment score under the policy (orange: the policy under-rates a chosen token or over-rates a rejected one), "
        "the selected top-k tokens boxed and, here, the planted deciding tokens underlined.",
        "",
    ]
    lines += [f"![token selection]({rel(shot)})", ""] if shot else \
        ["(No screenshot: Chromium was not available when this report was generated.)", ""]
    report = docs / "results.md"
    report.write_text("\n".join(lines))
    return report


# ---------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Relative defaults (run from the repository root): pages and summaries then name the paths as given.
    parser.add_argument("--runs", type=Path, default=Path("runs") / "reproduce", help="working directory (models, caches, runs)")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where results.md and img/ go")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the pipeline, not the outcome")
    parser.add_argument("--no-screenshot", action="store_true", help="skip the Chromium screenshot")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and in every `selpipe train` (more than the free cores thrash)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    runs, docs = args.runs, args.docs
    command = "python bench/reproduce.py" + (" --smoke" if args.smoke else "") + \
        (f" --threads {args.threads}" if args.threads != 1 else "")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the `selpipe train` subprocesses
    started = time.perf_counter()

    log("training the tokenizer and models")
    model_prompts = generate_prompts(settings.model_eval_prompts, settings.data_seed + 2)
    models = train_models(runs / "models", list(settings.models), settings.demonstrations, model_prompts, settings.data_seed)
    for name, record in models.items():
        log(f"  {name}: {record['steps']} steps, {record['seconds']} s, task accuracy {record['task_accuracy']:.3f}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs / "models" / "tokenizer")
    paths = write_data(settings, runs, tokenizer)
    truth = load_truth(paths["train"])
    policy = runs / "models" / "policy"

    log("stage one: one cache per reference, and a held-out cache scored by the policy start")
    caches = {"strong": runs / "caches" / "strong", "weak": runs / "caches" / "weak", "eval": runs / "caches" / "eval-policy"}
    stage_one = {name: score(paths["train"], runs / "models" / name, caches[name]) for name in REFERENCES}
    stage_one["eval"] = score(paths["eval"], policy, caches["eval"])

    log("selection quality at the start")
    pad_id = tokenizer.pad_token_id
    selection = {ref: selection_quality(settings, caches[ref], policy, truth, pad_id) for ref in REFERENCES}

    prompts = generate_prompts(settings.generation_prompts, settings.data_seed + 3)
    planned = [("strong", k, s) for k in settings.sweep_ks for s in settings.seeds]
    planned += [("weak", settings.reference_k, s) for s in settings.seeds]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for index, (ref, k, seed) in enumerate(planned, 1):
        result = train_run(settings, runs, caches, policy, ref, k, seed, prompts)
        groups.setdefault((ref, k), []).append(result)
        log(f"  run {index}/{len(planned)} {ref} k={k:g} seed={seed}: task {result['task_accuracy']:.3f}, "
            f"preference {result['preference_accuracy']:.3f}, {result['wall_seconds']} s")

    generation = {name: task_accuracy_by_rule(AutoModelForCausalLM.from_pretrained(runs / "models" / name), tokenizer, prompts)
                  for name in models}
    start = {"task_accuracy": generation["policy"]["all"],
             "preference_accuracy": next(iter(groups.values()))[0]["preference_accuracy_before"]}
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    train_rows = {r["id"]: r for r in read_rows(caches["strong"], load_manifest(caches["strong"]))}
    lengths = [len(train_rows[r["id"]][f"{side}_ids"]) for r in rows for side in ("chosen", "rejected")]
    deciding = [len(r[f"{side}_deciding"]) for r in rows for side in ("chosen", "rejected")]
    data_stats = {"mean_tokens": statistics.fmean(lengths), "mean_deciding": statistics.fmean(deciding),
                  "deciding_fraction": sum(deciding) / sum(lengths)}

    log("report")
    images = plot(settings, groups, selection, start, docs / "img")
    shot = None
    if not args.no_screenshot:
        page = render_html(caches["strong"], runs / "selection.html", policy=policy, samples=6, top_k=settings.reference_k,
                           seed=0, deciding=truth)
        png = docs / "img" / "reproduce-inspect-html.png"
        shot = png if screenshot(page, png) else None
    report = write_report(settings, docs, command, models, data_stats, stage_one, selection, groups, generation,
                          start["preference_accuracy"], images, shot, time.perf_counter() - started)
    log(f"wrote {report}")
    return report


if __name__ == "__main__":
    main()
