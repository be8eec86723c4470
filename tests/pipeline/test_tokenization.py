import pytest

from selpipe.pipeline.formats import BadRowError, RawRow
from selpipe.pipeline.tokenization import (
    TokenizationSettings, fingerprint_differences, tokenize_pair, tokenizer_fingerprint, truncate_pair,
)

SETTINGS = TokenizationSettings(max_length=64, max_prompt_length=32)


def test_standard_row_prompt_then_completion_plus_eos(tokenizer):
    row = RawRow("a", 0, "What is 1 plus 2?", "1 plus 2 is 3.", "1 plus 2 is 4.")
    pair = tokenize_pair(tokenizer, row, SETTINGS)
    assert pair.prompt_ids == tokenizer("What is 1 plus 2?")["input_ids"]
    assert pair.chosen_ids == tokenizer("1 plus 2 is 3.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert pair.chosen_sequence == pair.prompt_ids + pair.chosen_ids


def test_chat_template_is_applied(tokenizer):
    row = RawRow("c", 0, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                 [{"role": "assistant", "content": "Bye"}])
    pair = tokenize_pair(tokenizer, row, SETTINGS)
    assert tokenizer.decode(pair.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(pair.chosen_ids) == "Hello<|im_end|>\n"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in pair.rejected_ids


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    settings = TokenizationSettings(max_length=12, max_prompt_length=4)
    row = RawRow("t", 0, "What is 10 plus 20? What is 30 plus 40?", "10 plus 20 is 30. Happy to help!", "No.")
    full = tokenize_pair(tokenizer, row, TokenizationSettings(max_length=200, max_prompt_length=100))
    cut = tokenize_pair(tokenizer, row, settings)
    assert cut.truncated and cut.prompt_ids == full.prompt_ids[-4:]
    assert cut.chosen_ids == full.chosen_ids[:8] and cut.rejected_ids == full.rejected_ids
    with pytest.raises(BadRowError, match="exceed") as info:
        tokenize_pair(tokenizer, row, TokenizationSettings(12, 4, truncation="skip"))
    assert info.value.reason == "too_long"


def test_fingerprint_names_the_part_that_differs(tokenizer):
    import copy

    changed = copy.deepcopy(tokenizer)
    changed.chat_template = "{{ messages }}"
    assert fingerprint_differences(tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(changed)) == ["chat_template"]
    assert fingerprint_differences(tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(tokenizer)) == []


def test_truncation_keeps_a_leading_bos():
    """Prompt [BOS=1, 2..9] cut to 4 tokens keeps BOS and the last 3: [1, 7, 8, 9]; the room left for
    completions is 6 - 4 = 2 tokens."""
    settings = TokenizationSettings(max_length=6, max_prompt_length=4)
    pair = truncate_pair("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], [20, 21, 22], [30], settings, keep_head=1)
    assert pair.prompt_ids == [1, 7, 8, 9] and pair.chosen_ids == [20, 21] and pair.rejected_ids == [30]
    assert truncate_pair("b", [1, 2, 3, 4, 5], [20], [30], settings).prompt_ids == [2, 3, 4, 5]


def test_chat_template_errors_are_bad_rows(tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    row = RawRow("r", 4, [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Again"}],
                 [{"role": "assistant", "content": "Bye"}])
    with pytest.raises(BadRowError) as info:
        tokenize_pair(strict, row, SETTINGS, source="in.jsonl")
    assert info.value.reason == "template_error"
    assert str(info.value) == ("in.jsonl: row 5 (id r), field 'chosen': the chat template failed: "
                               "Conversation roles must alternate user/assistant")


# Qwen-style: tools in a system block, tool calls as <tool_call> JSON, content as a string or text parts.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% elif m.content %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


@pytest.fixture
def tool_tokenizer(tokenizer):
    import copy

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = TOOL_TEMPLATE
    return templated


def test_tools_and_tool_calls_render_as_the_template_renders_them(tool_tokenizer):
    row = RawRow("t", 0, [{"role": "user", "content": "Weather in Paris?"}], [CALL],
                 [{"role": "assistant", "content": "No idea."}], tools=TOOLS)
    pair = tokenize_pair(tool_tokenizer, row, TokenizationSettings(max_length=1024, max_prompt_length=512))
    assert tool_tokenizer.decode(pair.prompt_ids) == (
        '<|im_start|>system\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n'
        "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert tool_tokenizer.decode(pair.chosen_ids) == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n')
    assert tool_tokenizer.decode(pair.rejected_ids) == "No idea.<|im_end|>\n"


def test_text_parts_render_where_the_template_renders_them(tool_tokenizer, tokenizer):
    """The same ids as the content given as one string; a template that prints the list is refused."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 1 plus 2"}, {"type": "text", "text": "?"}]}]
    plain = [{"role": "user", "content": "What is 1 plus 2?"}]
    answers = [{"role": "assistant", "content": "3."}], [{"role": "assistant", "content": "4."}]
    assert tokenize_pair(tool_tokenizer, RawRow("p", 0, parts, *answers), SETTINGS) == \
        tokenize_pair(tool_tokenizer, RawRow("p", 0, plain, *answers), SETTINGS)
    with pytest.raises(BadRowError) as info:
        tokenize_pair(tokenizer, RawRow("p", 2, parts, *answers), SETTINGS, source="in.jsonl")
    assert str(info.value) == ("in.jsonl: row 3 (id p), field 'prompt': the chat template does not render content given "
                               "as a list of text parts (message 0); give the content as a string")


def test_tools_whose_text_says_type_text_are_not_taken_for_unrendered_parts(tool_tokenizer):
    """A tool schema holding `"type": "text"` (JSON) and a description quoting `'type': 'text'`
    (Python) renders those words literally; text parts beside it still render as their text, so the
    row tokenizes exactly as the same row with string content does."""
    tools = [{"type": "function", "function": {"name": "reply", "description": "returns [{'type': 'text', 'text': ...}]",
                                               "parameters": {"type": "object", "properties": {"part": {"type": "text"}}}}}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 1 plus 2?"}]}]
    plain = [{"role": "user", "content": "What is 1 plus 2?"}]
    answers = [{"role": "assistant", "content": "3."}], [{"role": "assistant", "content": "4."}]
    got = tokenize_pair(tool_tokenizer, RawRow("p", 0, parts, *answers, tools=tools), TokenizationSettings(1024, 512))
    assert got == tokenize_pair(tool_tokenizer, RawRow("p", 0, plain, *answers, tools=tools), TokenizationSettings(1024, 512))
    assert "'type': 'text'" in tool_tokenizer.decode(got.prompt_ids) and '"type": "text"' in tool_tokenizer.decode(got.prompt_ids)
