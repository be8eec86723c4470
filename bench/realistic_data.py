"""Preference pairs whose token lengths follow a real data set's, for benchmarks that depend on length.

    .venv/bin/python bench/realistic_data.py OUT.jsonl [--pairs 256] [--seed 0]

The demo pairs (`benchlib.preference_rows`) have prompts of about 10 tokens and completions of
one fixed length, so padding, prompt sharing and length sorting have nothing to act on. These
rows keep the demo's vocabulary (every token is one the demo tokenizer knows; the text is sums
like " 12 plus 7 is 19.") but draw each prompt's and completion's token count from a log-normal
distribution fitted to UltraFeedback (HuggingFaceH4/ultrafeedback_binarized), the data set
most DPO recipes train on:

| field    | median tokens | sigma of log length | p10 | p90 |
| -------- | ------------- | ------------------- | --- | --- |
| prompt   | 120           | 1.0                 | 33  | 432 |
| chosen   | 250           | 0.6                 | 116 | 540 |
| rejected | 220           | 0.6                 | 102 | 475 |

Sources and fit: the medians are those stated in selpipe's issue 11 (UltraFeedback-like:
prompt ~120, chosen ~250, rejected ~220 tokens). Wang and Hegde, "Accelerating Direct
Preference Optimization with Prefix Sharing" (arXiv 2410.20305, README of
github.com/frankxwang/dpo-prefix-sharing), report for UltraFeedback a median overall length of
409 tokens and a median prefix-to-completion length ratio of 0.42. With the sigmas above the
median of prompt + mean completion is 413 tokens (409 reported); the median prompt-to-completion
ratio is 0.51 (0.42 reported), so these prompts are, if anything, somewhat long relative to
their completions. The sigmas are not separately identified by one median: 1.0 for prompts
(short questions beside long pasted instructions) and 0.6 for completions are assumptions
constrained by that one statistic, not measurements. Chosen and rejected lengths are drawn
independently. Lengths are clipped to `max_prompt_length` and `max_length` when given, as
stage one's truncation would cut them, so every trainer sees the same tokens.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchlib import demo_tokenizer, write_jsonl


@dataclass(frozen=True)
class LogNormal:
    """Token counts with log(count) ~ Normal(log(median), sigma), at least `low`."""

    median: float
    sigma: float
    low: int

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        lengths = np.rint(self.median * np.exp(self.sigma * rng.standard_normal(count))).astype(int)
        return np.maximum(lengths, self.low)


ULTRAFEEDBACK = {"prompt": LogNormal(120, 1.0, 4), "chosen": LogNormal(250, 0.6, 8), "rejected": LogNormal(220, 0.6, 8)}


class TextOfLength:
    """Strings of exactly n demo-tokenizer tokens, cut from a stream of sum sentences.

    The byte-level pre-tokenizer splits at spaces and punctuation, so the ids of sentences that
    start with a space concatenate to the ids of the concatenated text, and a cut prefix decodes
    to a string that encodes back to the same n ids.
    """

    def __init__(self, tokenizer, seed: int):
        self.tokenizer, self.rng = tokenizer, random.Random(seed)
        self.sentences = [tokenizer.encode(f" {a} plus {b} is {a + b}.", add_special_tokens=False)
                          for a in range(0, 100, 3) for b in range(0, 100, 7)]

    def __call__(self, count: int, opening: str = "") -> str:
        ids = self.tokenizer.encode(opening, add_special_tokens=False)
        while len(ids) < count:
            ids += self.rng.choice(self.sentences)
        return self.tokenizer.decode(ids[:count])


def realistic_rows(count: int, seed: int = 0, profile: dict[str, LogNormal] = ULTRAFEEDBACK,
                   max_prompt_length: int | None = None, max_length: int | None = None) -> list[dict[str, str]]:
    """`count` pairs {id, prompt, chosen, rejected} with token lengths drawn from `profile`."""
    rng = np.random.default_rng(seed)
    lengths = {field: dist.sample(rng, count) for field, dist in profile.items()}
    if max_prompt_length is not None:
        lengths["prompt"] = np.minimum(lengths["prompt"], max_prompt_length)
    if max_length is not None:
        for side in ("chosen", "rejected"):
            lengths[side] = np.minimum(lengths[side], max_length - lengths["prompt"])
    text = TextOfLength(demo_tokenizer(), seed)
    return [{"id": f"real-{i:05d}",
             "prompt": text(int(lengths["prompt"][i]), "What is"),
             "chosen": text(int(lengths["chosen"][i])),
             "rejected": text(int(lengths["rejected"][i]))} for i in range(count)]


def length_summary(rows: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """p10 / median / p90 / mean token length of each field, as the demo tokenizer counts them."""
    tokenizer = demo_tokenizer()
    summary = {}
    for field in ("prompt", "chosen", "rejected"):
        counts = np.array([len(tokenizer.encode(r[field], add_special_tokens=False)) for r in rows])
        summary[field] = {"p10": float(np.quantile(counts, 0.1)), "median": float(np.median(counts)),
                          "p90": float(np.quantile(counts, 0.9)), "mean": float(counts.mean())}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt-length", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    args = parser.parse_args()
    rows = realistic_rows(args.pairs, args.seed, max_prompt_length=args.max_prompt_length, max_length=args.max_length)
    write_jsonl(rows, args.output)
    for field, stats in length_summary(rows).items():
        print(f"{field:>8}: " + ", ".join(f"{k} {v:,.0f}" for k, v in stats.items()))
    print(f"{len(rows)} pairs written to {args.output}")


if __name__ == "__main__":
    main()
