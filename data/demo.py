"""The embedded default: demo preference data and the tiny local models it runs on.

Nothing is downloaded. `python data/demo.py models OUT` trains a byte-level BPE tokenizer on
the demo texts and writes two Qwen2-style models with it: `OUT/reference` and `OUT/policy`
(the policy starts as a copy of the reference, as DPO policies start from the SFT model).
`python data/demo.py data OUT` regenerates `data/demo/{train,eval}.jsonl`.

The demo task: "What is a plus b?". The chosen answer is right and polite, the rejected one is
wrong or rude (or both), so the deciding tokens are a few numbers and words of each response.
The head dimension is 64 because vLLM's CPU attention does not support smaller ones.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"

POLITE = ["Happy to help!", "Glad I could help.", "Hope that helps!", "Let me know if you need more."]
RUDE = ["Figure it out yourself.", "Stop asking me.", "Do your own homework.", "Whatever."]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def generate_pairs(count: int, seed: int, id_prefix: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        wrong = a + b + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
        prompt = f"What is {a} plus {b}?"
        chosen = f"{a} plus {b} is {a + b}. {rng.choice(POLITE)}"
        kind = rng.random()
        if kind < 0.4:
            rejected = f"{a} plus {b} is {wrong}. {rng.choice(POLITE)}"
        elif kind < 0.7:
            rejected = f"{a} plus {b} is {a + b}. {rng.choice(RUDE)}"
        else:
            rejected = f"{a} plus {b} is {wrong}. {rng.choice(RUDE)}"
        rows.append({"id": f"{id_prefix}-{index:05d}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def corpus() -> list[str]:
    """Texts the demo tokenizer is trained on: every word and number the demo uses."""
    texts = [f"What is {a} plus {b}? {a} plus {b} is {a + b}." for a in range(100) for b in range(0, 100, 7)]
    texts += [str(n) for n in range(250)]
    return texts + POLITE + RUDE


def build_tokenizer(out: Path, texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def build_model(out: Path, tokenizer, *, hidden_size: int = 128, layers: int = 2, heads: int = 2,
                kv_heads: int = 1, intermediate_size: int = 256, seed: int = 0, dtype: str = "float32"):
    """A randomly initialised Qwen2-style causal LM, saved with its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def build_demo_models(out: Path) -> None:
    out = Path(out)
    if (out / "policy" / "config.json").exists() and (out / "reference" / "config.json").exists():
        return
    tokenizer = build_tokenizer(out / "tokenizer", corpus())
    build_model(out / "reference", tokenizer, seed=0)
    build_model(out / "policy", tokenizer, seed=0)


def write_demo_data(out: Path = DEMO_DIR) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", 512, 1), ("eval", 128, 2)):
        rows = generate_pairs(count, seed, name)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("models", "data"):
        sys.exit("usage: python data/demo.py models OUT | data OUT")
    if sys.argv[1] == "models":
        build_demo_models(Path(sys.argv[2]))
    else:
        write_demo_data(Path(sys.argv[2]))
