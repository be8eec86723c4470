"""Tokenization, done once in stage one; the ids go into the cache.

Prompt and each completion are tokenized separately and concatenated, so the boundary between
prompt and completion is exact (no re-tokenization across it can move a token). Standard rows:
the prompt gets the tokenizer's own special tokens (BOS where it has one) and each completion
gets EOS appended. Conversational rows: the prompt is rendered with the chat template and the
generation prompt; a completion is the rest of the template's rendering of prompt + that turn,
so it ends with the template's end-of-turn token.

A `tools` list goes to the template with the messages, so tool schemas and assistant `tool_calls`
render as the template renders them.

Truncation (`truncate`): a prompt over `max_prompt_length` keeps its BOS (if it starts with one)
and its last tokens (those next to the response); then completions over `max_length - len(prompt)` keep their first tokens.
With `skip` a row over either limit is skipped with reason `too_long`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .errors import BadRowError, ConfigError, first_line
from .formats import RawRow


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False

    @property
    def chosen_sequence(self) -> list[int]:
        return self.prompt_ids + self.chosen_ids

    @property
    def rejected_sequence(self) -> list[int]:
        return self.prompt_ids + self.rejected_ids


@dataclass(frozen=True)
class TokenizationSettings:
    max_length: int
    max_prompt_length: int
    truncation: str = "truncate"
    append_eos: bool = True


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_text(tokenizer: Any, row: RawRow, field: str, source: str, generation_prompt: bool) -> str:
    """The chat template's rendering of the prompt, plus the `field` turn unless that is the prompt."""
    messages = row.prompt if field == "prompt" else row.prompt + getattr(row, field)  # type: ignore[operator]
    try:
        text = tokenizer.apply_chat_template(messages, tools=row.tools, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # templates reject rows their own way (raise_exception, TypeError, ...): all are this row's fault
        raise BadRowError(source, row.position + 1, field, "template_error", f"the chat template failed: {err}", row.id) from None
    _check_parts_rendered(text, messages, row, field, source)
    return text


def _check_parts_rendered(text: str, messages: list[dict[str, Any]], row: RawRow, field: str, source: str) -> None:
    """Content given as a list of text parts must come out as its text. A template written for string
    content prints such a list as a Python list, or as JSON (or drops it), which would be scored as if
    said. What is looked for is a part itself printed, not the words `'type': 'text'`, which a tool
    schema or a message may well contain."""
    for index, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        missing = [part["text"] for part in content if part["text"].strip() and part["text"].strip() not in text]
        printed = [form for part in content for form in _printed_forms(part) if form in text]
        if missing or printed:
            raise BadRowError(source, row.position + 1, field, "template_error",
                              f"the chat template does not render content given as a list of text parts (message {index}); "
                              f"give the content as a string", row.id)


def _printed_forms(part: dict[str, Any]) -> list[str]:
    """How a template that does not know parts prints one: Python's repr (Jinja's `{{ content }}`) or JSON (`tojson`)."""
    forms = [repr(part), json.dumps(part), json.dumps(part, sort_keys=True), json.dumps(part, ensure_ascii=False)]
    return list(dict.fromkeys(forms))


def tokenize_pair(tokenizer: Any, row: RawRow, settings: TokenizationSettings, source: str = "input") -> TokenizedPair:
    """Tokenize one row. Raises BadRowError (reason `too_long`, `template_mismatch`, ...)."""
    line = row.position + 1
    if row.conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise BadRowError(source, line, "prompt", "no_chat_template", "conversational row but the tokenizer has no chat template", row.id)
        prompt_text = _chat_text(tokenizer, row, "prompt", source, generation_prompt=True)
        prompt_ids = _encode(tokenizer, prompt_text, special=False)
        completions = []
        for name in ("chosen", "rejected"):
            full = _chat_text(tokenizer, row, name, source, generation_prompt=False)
            if not full.startswith(prompt_text):
                raise BadRowError(source, line, name, "template_mismatch",
                                  "the chat template's rendering of prompt + response does not start with its rendering of the prompt", row.id)
            completions.append(_encode(tokenizer, full[len(prompt_text):], special=False))
    else:
        prompt_ids = _encode(tokenizer, row.prompt, special=True)  # type: ignore[arg-type]
        completions = []
        for name in ("chosen", "rejected"):
            ids = _encode(tokenizer, getattr(row, name), special=False)
            if settings.append_eos and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            completions.append(ids)
    if not prompt_ids:
        raise BadRowError(source, line, "prompt", "empty_prompt",
                          "tokenizes to no tokens and the tokenizer adds no BOS, so the first completion token has no context", row.id)
    for name, ids in zip(("chosen", "rejected"), completions):
        if not ids:
            raise BadRowError(source, line, name, "empty_completion", "tokenizes to no tokens", row.id)
    chosen_ids, rejected_ids = completions
    keep_head = 1 if tokenizer.bos_token_id is not None and prompt_ids[0] == tokenizer.bos_token_id else 0
    return truncate_pair(row.id, prompt_ids, chosen_ids, rejected_ids, settings, source, line, keep_head)


def truncate_pair(row_id: str, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                  settings: TokenizationSettings, source: str = "input", line: int = 0, keep_head: int = 0) -> TokenizedPair:
    """Apply the truncation rule; the first `keep_head` prompt tokens (a BOS) always stay."""
    longest = max(len(chosen_ids), len(rejected_ids))
    fits = len(prompt_ids) <= settings.max_prompt_length and len(prompt_ids) + longest <= settings.max_length
    if fits:
        return TokenizedPair(row_id, prompt_ids, chosen_ids, rejected_ids)
    if settings.truncation == "skip":
        raise BadRowError(source, line, None, "too_long",
                          f"prompt {len(prompt_ids)} + longest completion {longest} tokens exceed "
                          f"--max-prompt-length {settings.max_prompt_length} / --max-length {settings.max_length}", row_id)
    if len(prompt_ids) > settings.max_prompt_length:
        tail = settings.max_prompt_length - keep_head
        prompt_ids = prompt_ids[:keep_head] + prompt_ids[len(prompt_ids) - tail:]
    room = settings.max_length - len(prompt_ids)
    return TokenizedPair(row_id, prompt_ids, chosen_ids[:room], rejected_ids[:room], truncated=True)


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    """Hashes of the parts of a tokenizer that decide token ids, one per part.

    Kept apart so a mismatch can say which part differs (vocabulary, merges, normalisation,
    special tokens, chat template). `all` hashes the rest together.
    """
    parts: dict[str, Any] = {"vocab": sorted(tokenizer.get_vocab().items())}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        parts["merges"] = model.get("merges")
        parts["model_type"] = model.get("type")
        parts["normalization"] = [spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("post_processor")]
        parts["added_tokens"] = spec.get("added_tokens")
    parts["special_tokens"] = {
        "map": tokenizer.special_tokens_map,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    parts["chat_template"] = getattr(tokenizer, "chat_template", None)
    hashed = {name: _sha(value) for name, value in parts.items()}
    hashed["all"] = _sha(hashed)
    return hashed


def fingerprint_differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names of the tokenizer parts whose hashes differ."""
    return sorted(name for name in set(expected) | set(actual) if name != "all" and expected.get(name) != actual.get(name))


def load_tokenizer(model: str, revision: str | None = None, *, local_only: bool = False) -> Any:
    """The model's tokenizer, or a one-line error saying the model cannot be found or read.

    `local_only`: a local directory or what the Hugging Face cache already holds, never the Hub
    (a name that resolves nowhere fails at once instead of retrying the network for a minute).
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, revision=revision, local_files_only=local_only)
    except Exception as err:  # noqa: BLE001
        # A missing directory, a damaged tokenizer.json or config (the tokenizers library raises
        # plain Exceptions for some): all the user's to fix.
        first = first_line(err)
        raise ConfigError(f"cannot load a tokenizer from {model!r}: give a local model directory with a readable "
                          f"tokenizer (no downloads here) ({first[:300]})") from None


def pad_id(tokenizer: Any) -> int:
    """The id that fills padding; any id works (padding is masked out), 0 when the tokenizer has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
