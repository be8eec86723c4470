"""What the GPU proof runs on: its sizes, a tokenizer of the full vocabulary, random models, data.

    python bench/gpu/fixtures.py --profile full|tiny --work DIR --device cuda|cpu

writes DIR/fixtures.json (paths, parameter counts) after building, or reusing, everything below.

Nothing is downloaded. The ~1B scorer and the ~0.5B policy are random Qwen2-style networks with
Qwen2's vocabulary size, 151,936. Training a BPE tokenizer with `tokenizers` to that size would
need a corpus with that many distinct merges; instead the vocabulary is *constructed*: the 256
byte-level symbols, then words of lowercase letters with a leading space (`Ġa` .. `Ġzz`, `Ġaaa`,
.. shortest first, every prefix of a word also a word, one merge each: `Ġab` + `c` -> `Ġabc`), then
the ChatML special tokens, 151,936 ids in all. It is a byte-level BPE with Qwen2's own
pre-tokenizer, because transformers loads any tokenizer beside a `qwen2` config as
`Qwen2Tokenizer`, which rebuilds exactly that from the vocabulary and merges. Since the only
merges extend a word by its next letter, the text ` abc` always tokenizes to the one token `Ġabc`.

The benchmark data are drawn as token ids and written as those words, so `score-ref` and TRL both
tokenize real strings with a real tokenizer of exactly the model's vocabulary size; the stage-one
check asserts that the cache holds the ids drawn. Prompts draw from every word; chosen
completions from a set of 64 "good" words and rejected ones from 64 "bad" words, so the policy
has something it can learn within 20 steps and the loss moves from step to step (a resume that
restarted wrong would show in its losses).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import string
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer applies it to any tokenizer of a qwen2 model).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


@dataclass(frozen=True)
class Shape:
    """A Qwen2-style trunk; the input embedding and the output head are tied, as in Qwen2.5 0.5B/1.5B."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class Data:
    """Pairs of `prompt` tokens and completions of at most `completion` tokens (EOS included)."""

    pairs: int
    prompt: int
    completion: int

    @property
    def max_length(self) -> int:
        return self.prompt + self.completion


@dataclass(frozen=True)
class Profile:
    vocab: int
    scorer: Shape                # the ~1B reference of stage one
    policy: Shape                # the ~0.5B policy of stage two (also its same-size reference)
    weights_dtype: str           # how the models are saved; fp32 scoring upcasts the same weights
    low_dtype: str               # stage one's low precision, compared with float32
    train_precision: str         # selpipe train --precision
    stage_one: Data              # parity caches, verify, and the k=1 comparison with TRL
    stage_one_speed: Data        # hf backend vs the naive loop
    stage_two: Data              # 20 steps of training, one epoch: pairs = steps x global batch
    micro_batch: int
    global_batch: int
    steps: int
    save_every: int              # the checkpoint the kill waits for
    warmup_steps: int            # steps left out of the throughput (first kernels, allocator growth)
    learning_rate: float
    memory_vocab: int            # bench/memory.py's one-pair step at this vocabulary ...
    memory_seq_len: int          # ... and sequence length
    timeout_s: int               # the most any one subprocess may take

    @property
    def train_dtype(self) -> str:
        """The dtype a cache is scored in for training: the training precision (see `selpipe train`'s warning)."""
        return "bfloat16" if self.train_precision == "bf16" else "float32"


PROFILES = {
    # One H100: stage one on ~1B parameters at ~1,024-token sequences, stage two on ~0.5B.
    "full": Profile(
        vocab=151936,
        scorer=Shape(hidden=2048, layers=14, heads=16, kv_heads=4, intermediate=6144),
        policy=Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),  # Qwen2.5-0.5B's shape
        weights_dtype="bfloat16", low_dtype="bfloat16", train_precision="bf16",
        stage_one=Data(pairs=32, prompt=128, completion=896),
        stage_one_speed=Data(pairs=128, prompt=128, completion=896),
        stage_two=Data(pairs=320, prompt=128, completion=896),
        micro_batch=4, global_batch=16, steps=20, save_every=10, warmup_steps=5, learning_rate=1e-5,
        memory_vocab=151936, memory_seq_len=2048, timeout_s=180,
    ),
    # This CPU machine: the same code paths at toy sizes, fp32 training (selpipe trains bf16 on GPUs only).
    "tiny": Profile(
        vocab=4096,
        scorer=Shape(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256),
        policy=Shape(hidden=64, layers=2, heads=1, kv_heads=1, intermediate=128),
        weights_dtype="float32", low_dtype="bfloat16", train_precision="fp32",
        stage_one=Data(pairs=8, prompt=8, completion=24),
        stage_one_speed=Data(pairs=16, prompt=8, completion=24),
        stage_two=Data(pairs=80, prompt=8, completion=24),
        micro_batch=2, global_batch=4, steps=20, save_every=10, warmup_steps=5, learning_rate=1e-3,
        memory_vocab=32000, memory_seq_len=256, timeout_s=300,
    ),
}


# ---------------------------------------------------------------------------- tokenizer


BYTE_SYMBOLS = 256


def word_strings(count: int) -> list[str]:
    """`count` words `Ġ<letters>`, shortest first, so every word's prefixes come before it."""
    words: list[str] = []
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            if len(words) == count:
                return words
            words.append("Ġ" + "".join(letters))
    raise AssertionError("unreachable")


def word_ids(vocab: int) -> range:
    """The ids of the words: after the byte symbols, before the special tokens."""
    return range(BYTE_SYMBOLS, vocab - len(SPECIAL_TOKENS))


def word_text(token_id: int, vocab: int) -> str:
    """The text that tokenizes to `token_id` (a word id): a space and its letters."""
    return " " + _words(vocab)[token_id - BYTE_SYMBOLS][1:]


def eos_id(vocab: int) -> int:
    """`<|im_end|>`, the EOS that tokenization appends to each completion."""
    return vocab - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index("<|im_end|>")


@functools.cache
def _words(vocab: int) -> list[str]:
    return word_strings(len(word_ids(vocab)))


def build_tokenizer(vocab: int, directory: Path):
    """The constructed byte-level BPE of exactly `vocab` ids (see the module doc), saved to `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = _words(vocab)
    table = {token: i for i, token in enumerate(symbols + words)}
    merges = [(word[:-1], word[-1]) for word in words]
    core = Tokenizer(models.BPE(table, merges))
    # What Qwen2Tokenizer sets up around its BPE (transformers rebuilds it so when loading).
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    assert len(tokenizer) == vocab and tokenizer.eos_token_id == eos_id(vocab)
    tokenizer.save_pretrained(directory)
    return tokenizer


# ---------------------------------------------------------------------------- models


def build_model(shape: Shape, vocab: int, tokenizer: Any, directory: Path, *, seed: int, dtype: str, device: str) -> int:
    """A random Qwen2-style model saved with the tokenizer (reused if present); returns its parameter count."""
    import torch
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    if (directory / "tokenizer.json").exists():  # written last: the model before it is whole
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            return Qwen2ForCausalLM(config).num_parameters()
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 1B parameters on the GPU takes a second, on 16 cores much longer
        model = Qwen2ForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.num_parameters()


# ---------------------------------------------------------------------------- data


COMPLETION_WORDS = 64  # the "good" words of chosen completions, and as many "bad" ones of rejected

@dataclass(frozen=True)
class Pair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]      # without the EOS that tokenization appends
    rejected_ids: list[int]

    def requests(self, vocab: int) -> list[tuple[list[int], int]]:
        """The two sequences stage one scores, as (token ids, prompt length)."""
        return [(self.prompt_ids + ids + [eos_id(vocab)], len(self.prompt_ids)) for ids in (self.chosen_ids, self.rejected_ids)]

    def row(self, vocab: int) -> dict[str, str]:
        """The pair as input text. Every word starts with its space, so TRL's tokenization of
        prompt + completion as one string splits where selpipe's separate tokenization does."""
        text = lambda ids: "".join(word_text(i, vocab) for i in ids)  # noqa: E731
        return {"id": self.id, "prompt": text(self.prompt_ids),
                "chosen": text(self.chosen_ids), "rejected": text(self.rejected_ids)}


def make_pairs(data: Data, vocab: int, seed: int, prefix: str) -> list[Pair]:
    """Random pairs; completions of 3/4 to all of `data.completion` tokens, EOS included, so batches pad."""
    rng = random.Random(seed)
    ids = word_ids(vocab)
    good, bad = ids[:COMPLETION_WORDS], ids[COMPLETION_WORDS:2 * COMPLETION_WORDS]
    longest = data.completion - 1  # room for the EOS

    def completion(choices: range) -> list[int]:
        return [rng.choice(choices) for _ in range(rng.randint(longest * 3 // 4, longest))]

    return [Pair(f"{prefix}-{index:05d}", [rng.choice(ids) for _ in range(data.prompt)], completion(good), completion(bad))
            for index in range(data.pairs)]


def stage_one_pairs(profile: Profile) -> list[Pair]:
    return make_pairs(profile.stage_one, profile.vocab, seed=1, prefix="s1")


def stage_one_speed_pairs(profile: Profile) -> list[Pair]:
    return make_pairs(profile.stage_one_speed, profile.vocab, seed=2, prefix="speed")


def stage_two_pairs(profile: Profile) -> list[Pair]:
    return make_pairs(profile.stage_two, profile.vocab, seed=3, prefix="s2")


def write_jsonl(pairs: list[Pair], vocab: int, path: Path) -> Path:
    path.write_text("".join(json.dumps(p.row(vocab)) + "\n" for p in pairs))
    return path


# ---------------------------------------------------------------------------- all of it


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench/, for benchlib
    from benchlib import machine

    return machine()["cpu"]


def build_all(profile_name: str, work: Path, device: str) -> dict[str, Any]:
    profile = PROFILES[profile_name]
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(profile.vocab, work / "tokenizer")
    models = {
        "scorer": {"path": str(work / "scorer"), "shape": asdict(profile.scorer),
                   "parameters": build_model(profile.scorer, profile.vocab, tokenizer, work / "scorer", seed=1,
                                             dtype=profile.weights_dtype, device=device)},
        "policy": {"path": str(work / "policy"), "shape": asdict(profile.policy),
                   "parameters": build_model(profile.policy, profile.vocab, tokenizer, work / "policy", seed=0,
                                             dtype=profile.weights_dtype, device=device)},
    }
    fixtures = {
        "profile": profile_name, "device": device_name(device), "vocab": profile.vocab,
        "weights_dtype": profile.weights_dtype, "models": models,
        "data": {"stage_one": str(write_jsonl(stage_one_pairs(profile), profile.vocab, work / "stage-one.jsonl")),
                 "stage_two": str(write_jsonl(stage_two_pairs(profile), profile.vocab, work / "stage-two.jsonl"))},
    }
    (work / "fixtures.json").write_text(json.dumps(fixtures, indent=2) + "\n")
    return fixtures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(json.dumps(build_all(args.profile, args.work, args.device), indent=2))


if __name__ == "__main__":
    main()
