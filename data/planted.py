"""A planted-preference task: preference pairs where we know which tokens decide the preference.

Selective-DPO claims that a minority of response tokens carries the preference signal. On real
data nobody knows which tokens those are; here they are planted, so token selection can be scored
against the truth.

The task: a rule and eight distinct letters, e.g. `sort : k c a p e h b m`. The correct answer
applies the rule (`reverse` or `sort`) and is checked by a program (`check`). Every response
wraps the answer in words that carry no preference, drawn at random for each response:

    prompt    sort : k c a p e h b m
    chosen    okay so well , the answer is : a b c e h k m p . cheers enjoy bye .
    rejected  yes great fine , the answer is : a b c e k h m p . thanks done easy .

The rejected answer differs from the chosen one in one letter (`substitute`: a letter that is not
in the prompt) or in two adjacent letters (`swap`); its filler words differ too, harmlessly. The
letters where the answers differ are the *deciding* tokens: about 1.5 of the roughly 22 tokens of
each completion (about 7%).

Each row records the token positions of its deciding tokens within each completion
(`chosen_deciding`, `rejected_deciding`), computed with the task tokenizer exactly as selpipe
tokenizes a standard row (completion tokenized alone, no special tokens, EOS appended; see
`selpipe.pipeline.tokenization`), so they index the completion ids and log-probs of a score cache.
Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LETTERS = "abcdefghijklmnop"
ITEMS = 8
RULES = ("reverse", "sort")
OPENERS = ("sure", "okay", "fine", "well", "right", "great", "yes", "so")
CLOSERS = ("done", "enjoy", "cheers", "thanks", "bye", "easy", "good", "voila")
FILLER_WORDS = 3
ANSWER_LEAD = ", the answer is :"
ERROR_KINDS = ("substitute", "swap")


@dataclass(frozen=True)
class Problem:
    rule: str
    items: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return f"{self.rule} : {' '.join(self.items)}"

    @property
    def answer(self) -> tuple[str, ...]:
        return tuple(reversed(self.items)) if self.rule == "reverse" else tuple(sorted(self.items))


@dataclass(frozen=True)
class Response:
    """A rendered response and the character spans of its answer letters (for token positions)."""

    text: str
    letter_spans: tuple[tuple[int, int], ...]


def sample_problem(rng: random.Random) -> Problem:
    return Problem(rng.choice(RULES), tuple(rng.sample(LETTERS, ITEMS)))


def render_response(answer: tuple[str, ...], rng: random.Random) -> Response:
    """The answer between freshly drawn filler words; filler never changes correctness."""
    opener = " ".join(rng.choice(OPENERS) for _ in range(FILLER_WORDS))
    closer = " ".join(rng.choice(CLOSERS) for _ in range(FILLER_WORDS))
    text = f"{opener} {ANSWER_LEAD}"
    spans = []
    for letter in answer:
        text += " "
        spans.append((len(text), len(text) + len(letter)))
        text += letter
    text += f" . {closer} ."
    return Response(text, tuple(spans))


def corrupt(problem: Problem, rng: random.Random) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    """(kind, wrong answer, indices of the answer letters that differ from the correct answer)."""
    answer = list(problem.answer)
    kind = rng.choice(ERROR_KINDS)
    if kind == "substitute":
        index = rng.randrange(ITEMS)
        answer[index] = rng.choice([c for c in LETTERS if c not in problem.items])
        return kind, tuple(answer), (index,)
    index = rng.randrange(ITEMS - 1)
    answer[index], answer[index + 1] = answer[index + 1], answer[index]
    return kind, tuple(answer), (index, index + 1)


def parse_answer(text: str) -> tuple[str, ...] | None:
    """The letters between the answer lead and the next ' .', or None if the format is broken."""
    lead = text.find(ANSWER_LEAD)
    if lead < 0:
        return None
    rest = text[lead + len(ANSWER_LEAD):]
    end = rest.find(" .")
    if end < 0:
        return None
    return tuple(rest[:end].split())


def check(prompt: str, response: str) -> bool:
    """Whether `response` answers `prompt` correctly (filler words are ignored)."""
    rule, _, letters = prompt.partition(" : ")
    return parse_answer(response) == Problem(rule, tuple(letters.split())).answer


def completion_token_ids(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Completion ids as selpipe makes them (no special tokens, EOS appended) and each one's char span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    ids.append(tokenizer.eos_token_id)
    offsets.append((len(text), len(text)))
    return ids, offsets


def deciding_positions(tokenizer: Any, response: Response, letter_indices: tuple[int, ...]) -> list[int]:
    """Completion token positions that overlap the characters of the given answer letters."""
    _, offsets = completion_token_ids(tokenizer, response.text)
    spans = [response.letter_spans[i] for i in letter_indices]
    return [t for t, (start, end) in enumerate(offsets) if any(start < b and a < end for a, b in spans)]


def generate_pairs(count: int, seed: int, id_prefix: str, tokenizer: Any) -> list[dict[str, Any]]:
    """`count` preference rows in selpipe's standard format plus the planted truth."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        problem = sample_problem(rng)
        kind, wrong, differing = corrupt(problem, rng)
        chosen, rejected = render_response(problem.answer, rng), render_response(wrong, rng)
        rows.append({
            "id": f"{id_prefix}-{index:05d}", "prompt": problem.prompt,
            "chosen": chosen.text, "rejected": rejected.text, "rule": problem.rule, "error": kind,
            "chosen_deciding": deciding_positions(tokenizer, chosen, differing),
            "rejected_deciding": deciding_positions(tokenizer, rejected, differing),
        })
    return rows


def generate_demonstrations(count: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, correct response) pairs for supervised training of the reference and policy models."""
    rng = random.Random(seed)
    demos = []
    for _ in range(count):
        problem = sample_problem(rng)
        demos.append((problem.prompt, render_response(problem.answer, rng).text))
    return demos


def generate_prompts(count: int, seed: int) -> list[str]:
    """Held-out prompts for greedy-generation task accuracy."""
    rng = random.Random(seed)
    return [sample_problem(rng).prompt for _ in range(count)]


def corpus() -> list[str]:
    """Texts the task tokenizer is trained on: every word, letter and punctuation the task uses."""
    return [f"{prompt} {response}" for prompt, response in generate_demonstrations(2000, seed=0)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
