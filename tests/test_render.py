"""Render semantics: the prefix written once, the effective prefix recorded, one BOS."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from prefill_kit.errors import DataError, TemplateError
from prefill_kit.prompts.render import decode_escapes, prefix_overlap, render_prompt
from prefill_kit.templates import ChatTemplate, load_template

HEAD = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
R1_STYLE = ChatTemplate(HEAD + "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}", "r1-style")
HALF = ChatTemplate(HEAD + "{% if add_generation_prompt %}<|Assistant|><think>{% endif %}", "half")
PLAIN = ChatTemplate(HEAD + "{% if add_generation_prompt %}<|Assistant|>\n{% endif %}", "plain")
CLOSED = ChatTemplate(HEAD + "{% if add_generation_prompt %}<|Assistant|><think>\n\n</think>\n\n{% endif %}")
USER = [{"role": "user", "content": "2+2?"}]


def test_prefix_is_appended_after_the_generation_prompt():
    out = render_prompt(USER, PLAIN, "<think>\n")
    assert out.prompt == "<|user|>2+2?<|Assistant|>\n<think>\n"
    assert out.prefix == "<think>\n"
    assert out.solution is None


def test_no_doubling_when_template_already_ends_with_the_prefix():
    out = render_prompt(USER, R1_STYLE, "<think>\n")
    assert out.prompt == "<|user|>2+2?<|Assistant|><think>\n"
    assert out.prompt.count("<think>") == 1
    assert out.prefix == "<think>\n"


def test_template_ending_in_half_the_prefix_gets_only_the_rest():
    out = render_prompt(USER, HALF, "<think>\n")
    assert out.prompt == "<|user|>2+2?<|Assistant|><think>\n"
    assert out.prefix == "<think>\n"


def test_template_opened_reasoning_is_part_of_the_effective_prefix():
    # No prefix asked for, but the template opens <think>: rewards must still see it.
    assert render_prompt(USER, R1_STYLE, "").prefix == "<think>\n"
    longer = render_prompt(USER, R1_STYLE, "Let me see")
    assert longer.prompt.endswith("<|Assistant|><think>\nLet me see")
    assert longer.prefix == "<think>\nLet me see"
    assert render_prompt(USER, CLOSED, "").prefix == "<think>\n\n</think>\n\n"


def test_whitespace_only_overlap_is_not_swallowed():
    # The header ends in "\n"; a prefix starting with "\n" keeps its own newline.
    assert render_prompt(USER, PLAIN, "\nStep 1").prompt.endswith("<|Assistant|>\n\nStep 1")
    assert prefix_overlap("abc\n", "\nx") == 0
    assert prefix_overlap("abc<th", "<think>") == 3


def test_trailing_assistant_message_becomes_the_solution():
    messages = [*USER, {"role": "assistant", "content": "4"}]
    out = render_prompt(messages, PLAIN, "<think>\n")
    assert out.prompt == "<|user|>2+2?<|Assistant|>\n<think>\n"
    assert out.solution == "4"


def test_continue_final_matches_transformers_and_becomes_the_prefix(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [*USER, {"role": "assistant", "content": "<think>\nFirst, 2+2"}]
    out = render_prompt(messages, load_template(tiny_model_dir), continue_final=True)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert out.prompt == expected
    assert out.prefix == "<think>\nFirst, 2+2"


def test_continue_final_applies_a_missing_prefix_once():
    messages = [*USER, {"role": "assistant", "content": "First"}]
    out = render_prompt(messages, load_template("chatml"), "<think>\n", continue_final=True)
    assert out.prompt.endswith("<|im_start|>assistant\n<think>\nFirst")
    again = render_prompt([*USER, {"role": "assistant", "content": "<think>\nFirst"}], load_template("chatml"),
                          "<think>\n", continue_final=True)
    assert again.prompt == out.prompt


def test_continue_final_needs_a_final_assistant_message():
    with pytest.raises(DataError, match="ending in an assistant message"):
        render_prompt(USER, PLAIN, continue_final=True)


def test_continue_final_refuses_a_template_that_drops_the_message():
    drops = ChatTemplate("{% for m in messages if m.role != 'assistant' %}{{ m.content }}{% endfor %}", "drops")
    with pytest.raises(TemplateError, match="drops"):
        render_prompt([*USER, {"role": "assistant", "content": "x"}], drops, continue_final=True)


def test_empty_conversation_is_a_data_error():
    with pytest.raises(DataError, match="empty conversation"):
        render_prompt([], PLAIN)


@pytest.mark.parametrize(("typed", "meant"), [
    (r"<think>\n", "<think>\n"),
    (r"a\tb\r\n", "a\tb\r\n"),
    (r"back\\slash", "back\\slash"),
    (r"\u00e9\u4e2d", "é中"),
    ("café 数学 🙂", "café 数学 🙂"),
    (r"\x41 \q \u12", r"\x41 \q \u12"),
    (r"\\n", "\\n"),
])
def test_decode_escapes(typed, meant):
    assert decode_escapes(typed) == meant


def test_exactly_one_bos_when_template_writes_it_and_tokenizer_adds_it(bos_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    bos = tokenizer.bos_token_id
    assert tokenizer("x").input_ids[0] == bos  # the trap: this tokenizer adds BOS by default
    out = render_prompt(USER, load_template(bos_tokenizer_dir), "<think>\n")
    assert out.prompt.startswith("<s>")
    ids = tokenizer(out.prompt, add_special_tokens=False).input_ids
    assert ids.count(bos) == 1 and ids[0] == bos
    assert tokenizer(out.prompt).input_ids[:2] == [bos, bos]  # what the default would have done


def test_continue_final_refuses_a_template_that_rewrites_the_message():
    # Qwen3-style: only the text after the reasoning is kept. The partial message cannot then be continued
    # verbatim, and continuing what the template made of it would train on other text than the row's.
    strips = ChatTemplate(HEAD.replace("{{ m.content }}", "{{ m.content.split('</think>')[-1] }}"), "strips")
    partial = [*USER, {"role": "assistant", "content": "<think>\nadd</think>\nThe answer"}]
    with pytest.raises(TemplateError, match="rewrites the final assistant message"):
        render_prompt(partial, strips, continue_final=True)
    kept = render_prompt([*USER, {"role": "assistant", "content": "The answer"}], strips, continue_final=True)
    assert kept.prompt == "<|user|>2+2?<|assistant|>The answer" and kept.prefix == "The answer"


@pytest.mark.parametrize(("text", "position", "inside"), [
    ("hi<|A|>x", 7, False),  # the token ends exactly at the position: a boundary, not a cut
    ("hi<|A|>x", 2, False),  # it starts there
    ("hi<|A|>x", 6, True),
    ("hi<|A|>x", 3, True),
    ("<|A|><|A|>", 5, False),
    ("<|A|><|A|>", 9, True),
])
def test_inside_token_is_strictly_inside(text, position, inside):
    from prefill_kit.prompts.render import _inside_token

    assert _inside_token(text, position, ("<|A|>",)) is inside


def test_an_overlap_starting_right_after_an_added_token_is_taken():
    assert prefix_overlap("hi<|A|>Step", "Step 1", ("<|A|>",)) == 4
    assert prefix_overlap("hi<|A|>", "|>x", ("<|A|>",)) == 0  # starts inside the token
    template = ChatTemplate(HEAD + "{% if add_generation_prompt %}<|A|><think>\n{% endif %}", added_tokens=("<|A|>",))
    assert render_prompt(USER, template, "<think>\n").prompt == "<|user|>2+2?<|A|><think>\n"
