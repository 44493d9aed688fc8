"""Shipped templates: each writes its family's published format, as `apply_chat_template` would.

Three layers of evidence:
- the documented format, as literal strings worked out from each family's published prompt format;
- our renderer equals `transformers`' `apply_chat_template` on the same (shipped) source;
- byte equality with the family's OFFICIAL template from `../shared/reference/templates/` (skipped where
  that directory is absent), on conversations covering system turns, multi-turn, unicode, empty content,
  whitespace, <think> blocks, mid-conversation system turns, refused role orders and tools.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jinja2
import pytest

from prefill_kit.errors import TemplateError
from prefill_kit.templates import ChatTemplate, available_templates, load_template
from prefill_kit.tiny_model import build_tokenizer
from tests.conftest import REFERENCE_ABSENT

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

OFFICIAL = {
    "chatml": "chatml.jinja",
    "qwen2.5": "qwen2.5-instruct.jinja",
    "qwen3": "qwen3.jinja",
    "deepseek-r1": "deepseek-r1-distill-qwen.with-think.jinja",
    "llama3": "llama-3.1-instruct.jinja",
    "mistral": "mistral-7b-instruct-v0.3.jinja",
    "gemma": "gemma-3-it.jinja",
    "phi4": "phi-4.jinja",
}
SHIPPED = list(OFFICIAL)

# The tokens each family's tokenizer passes to its template (its tokenizer_config.json).
FAMILY_TOKENS = {
    "chatml": {"eos_token": "<|im_end|>"},
    "qwen2.5": {"eos_token": "<|im_end|>"},
    "qwen3": {"eos_token": "<|im_end|>"},
    "deepseek-r1": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "phi4": {"eos_token": "<|im_end|>"},
}

# --- conversations --------------------------------------------------------------------------------------------

SYS = {"role": "system", "content": "You are a careful math tutor."}


def _u(text: str) -> dict:
    return {"role": "user", "content": text}


def _a(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# name -> (messages, extra template kwargs, including `tools`)
CONVERSATIONS: dict[str, tuple[list[dict], dict]] = {
    "single_user": ([_u("What is 2 + 3?")], {}),
    "system_user": ([SYS, _u("What is 2 + 3?")], {}),
    "multi_turn": ([SYS, _u("What is 2 + 3?"), _a("2 + 3 = 5."), _u("And times 4?")], {}),
    "ends_with_assistant": ([_u("Hi"), _a("Hello!"), _u("What is 7 * 6?"), _a("42")], {}),
    "unicode": ([{"role": "system", "content": "Tu es un assistant. 你是一个助手。"},
                 _u("Ünïcödé café 数学 🙂 — ∫ x dx ?"), _a("Réponse : ½ x² + C ✓"), _u("مرحبا، كم ٢+٢؟")], {}),
    "empty_content": ([{"role": "system", "content": ""}, _u(""), _a(""), _u("")], {}),
    "whitespace": ([{"role": "system", "content": "  padded system \n"}, _u("\n  padded question  \n"),
                    _a("  answer with spaces \n\n"), _u("last\n")], {}),
    "system_only": ([SYS], {}),
    "think_history": ([SYS, _u("What is 2 + 3?"), _a("<think>\nAdd 2 and 3.\n</think>\n\n2 + 3 = 5."),
                       _u("And times 4?")], {}),
    "think_final": ([_u("What is 2 + 3?"), _a("<think>\nAdd them.\n</think>\n\nThe answer is 5.")], {}),
    "think_multi_step": ([SYS, _u("Q1"), _a("<think>\nr1\n</think>\n\nA1"), _u("Q2"), _a("<think>r2</think>A2"),
                          _u("Q3"), _a("<think>\n\n</think>\n\nA3")], {}),
    "think_odd_tags": ([_u("Q1"), _a("no opening tag</think>\nA1"), _u("Q2"), _a("x<think>r</think>y</think>\n\nA2"),
                        _u("Q3"), _a("plain answer")], {}),
    "reasoning_field": ([_u("Q1"), _a("A1", reasoning_content="\nthought one\n"), _u("Q2"),
                         _a("<think>ignored</think>A2", reasoning_content="thought two")], {}),
    "user_tool_response": ([_u("Q"), _a("<think>r1</think>calling"), _u("<tool_response>\n42\n</tool_response>"),
                            _a("<think>r2</think>It is 42.")], {}),
    "list_content": ([_u([{"type": "image"}, {"type": "text", "text": "  What is shown? "}]), _a("A cat."),
                      _u("Thanks")], {}),
    "list_system": ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, _u("Hi")], {}),
    "enable_thinking_false": ([SYS, _u("What is 2 + 3?")], {"enable_thinking": False}),
    "enable_thinking_true": ([_u("Q1"), _a("<think>r</think>A1"), _u("Q2")], {"enable_thinking": True}),
    "date_string": ([SYS, _u("What day is it?")], {"date_string": "01 Jan 2025"}),
    "mid_system": ([_u("Hi"), _a("Hello!"), {"role": "system", "content": "Answer in French."}, _u("Thanks")], {}),
    "two_system": ([SYS, _u("Hi"), {"role": "system", "content": "Be brief."}], {}),
    "consecutive_users": ([_u("Hi"), _u("Are you there?")], {}),
    "assistant_first": ([_a("How can I help?"), _u("Add 2 and 3.")], {}),
    "tool_round_trip": ([SYS, _u("Weather in Paris?"), _a("", tool_calls=[_call("get_weather", {"city": "Paris"})]),
                         {"role": "tool", "content": "18 °C, sunny"}, _a("It is 18 °C and sunny.")],
                        {"tools": [WEATHER_TOOL]}),
    "tools_in_system": ([_u("Weather in Oslo?")], {"tools": [WEATHER_TOOL], "tools_in_user_message": False}),
    "parallel_tool_calls": ([_u("Weather in Paris and Rome?"),
                             _a("Checking both.", tool_calls=[_call("get_weather", {"city": "Paris"}),
                                                              _call("get_weather", {"city": "Rome"})]),
                             {"role": "tool", "content": "18 °C"}, {"role": "tool", "content": "24 °C"}, _u("Thanks")],
                            {"tools": [WEATHER_TOOL]}),
    "builtin_tool": ([_u("Search the weather in Paris."),
                      _a("", tool_calls=[_call("brave_search", {"query": "weather Paris"})]),
                      {"role": "ipython", "content": "Sunny, 18 °C."}, _a("It is sunny.")],
                     {"builtin_tools": ["brave_search", "wolfram_alpha"]}),
}

# Content given as a list of parts: only these families' templates read it.
ONLY_FOR = {"list_content": ("gemma", "qwen3"), "list_system": ("gemma",)}

# Conversations the family's own template refuses (raise_exception): ours must refuse them too.
REFUSED = {
    ("mistral", "mid_system"), ("mistral", "two_system"), ("mistral", "consecutive_users"),
    ("mistral", "assistant_first"),
    ("gemma", "mid_system"), ("gemma", "consecutive_users"), ("gemma", "assistant_first"),
    ("gemma", "tool_round_trip"), ("gemma", "parallel_tool_calls"), ("gemma", "builtin_tool"),
    ("llama3", "parallel_tool_calls"),
}
# Deliberate differences, documented in each template's leading comment: tool calling is not implemented
# there, and our template raises where the official one renders. Excluded from the official comparison.
# (DeepSeek-R1's official template ignores `tools` itself, so a tools list alone renders the same.)
UNSUPPORTED = {("deepseek-r1", conv) for conv in ("tool_round_trip", "parallel_tool_calls", "builtin_tool")} | {
    ("mistral", conv) for conv in ("tool_round_trip", "tools_in_system", "parallel_tool_calls", "builtin_tool")}

CASES = [pytest.param(name, conv, gen, id=f"{name}-{conv}-{'gen' if gen else 'nogen'}")
         for name in SHIPPED for conv in CONVERSATIONS for gen in (False, True) if name in ONLY_FOR.get(conv, SHIPPED)]
OFFICIAL_CASES = [case for case in CASES if tuple(case.values[:2]) not in UNSUPPORTED]

# --- helpers ---------------------------------------------------------------------------------------------------


def _shipped(name: str) -> ChatTemplate:
    return dataclasses.replace(load_template(name), special_tokens=FAMILY_TOKENS[name])


@functools.cache
def _tokenizer(source: str, bos_token: str | None):
    return build_tokenizer(chat_template=source, bos_token=bos_token)


def _transformers_render(source: str, name: str, conv: str, gen: bool) -> str:
    """`apply_chat_template(tokenize=False)` on a tokenizer holding `source` and the family's special tokens."""
    messages, kwargs = CONVERSATIONS[conv]
    tokens = FAMILY_TOKENS[name]
    tok = _tokenizer(source, tokens.get("bos_token"))
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **tokens, **kwargs)


def _our_render(name: str, conv: str, gen: bool) -> str:
    messages, kwargs = CONVERSATIONS[conv]
    return _shipped(name).render(messages, add_generation_prompt=gen, **kwargs)


def _official_source(name: str) -> str:
    path = REFERENCE / "templates" / OFFICIAL[name]
    if not path.is_file():
        pytest.skip(f"official template not available: {path} ({REFERENCE_ABSENT})")
    return path.read_text(encoding="utf-8")


def _assert_same_or_both_refuse(name: str, conv: str, gen: bool, source: str) -> None:
    if (name, conv) in REFUSED | UNSUPPORTED:
        with pytest.raises(jinja2.TemplateError):
            _transformers_render(source, name, conv, gen)
        with pytest.raises(TemplateError, match=name):
            _our_render(name, conv, gen)
    else:
        assert _our_render(name, conv, gen) == _transformers_render(source, name, conv, gen)


# --- official templates (need ../shared/reference) ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "conv", "gen"), OFFICIAL_CASES)
def test_matches_official_template(name, conv, gen):
    _assert_same_or_both_refuse(name, conv, gen, _official_source(name))


@pytest.mark.parametrize(("config", "name"), [("deepseek-r1-distill-qwen-32b", "deepseek-r1"),
                                              ("mistral-7b-instruct-v0.3", "mistral")])
def test_family_tokens_match_official_tokenizer_config(config, name):
    path = REFERENCE / "templates" / "tokenizer_configs" / f"{config}.tokenizer_config.json"
    if not path.is_file():
        pytest.skip(f"official tokenizer config not available: {path} ({REFERENCE_ABSENT})")
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in FAMILY_TOKENS[name].items():
        official = data[key]["content"] if isinstance(data[key], dict) else data[key]
        assert official == value


# --- core: no reference needed ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "conv", "gen"), CASES)
def test_render_equals_transformers_on_shipped_source(name, conv, gen):
    _assert_same_or_both_refuse(name, conv, gen, load_template(name).source)


def test_all_families_are_shipped_with_a_leading_comment():
    assert set(SHIPPED) <= set(available_templates())
    for name in SHIPPED:
        assert load_template(name).source.startswith("{#"), name


# The generation prompt each family documents: what add_generation_prompt appends after the last user turn.
GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "qwen2.5": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "deepseek-r1": "<｜Assistant｜><think>\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "",  # none: the prompt already ends with the user turn's [/INST]
    "gemma": "<start_of_turn>model\n",
    "phi4": "<|im_start|>assistant<|im_sep|>",
}
# How a prompt ending in a user turn ends, generation prompt included.
PROMPT_ENDING = {**GENERATION_PROMPT, "mistral": "What is 2 + 3?[/INST]"}


@pytest.mark.parametrize("name", SHIPPED)
def test_generation_prompt_is_the_documented_one(name):
    messages = [SYS, _u("What is 2 + 3?")]
    template = load_template(name)
    without = template.render(messages, add_generation_prompt=False)
    with_prompt = template.render(messages, add_generation_prompt=True)
    assert with_prompt == without + GENERATION_PROMPT[name]
    assert with_prompt.endswith(PROMPT_ENDING[name])


def test_qwen3_generation_prompt_without_thinking_prefills_an_empty_think_block():
    text = load_template("qwen3").render([_u("Q")], add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    text = load_template("qwen3").render([_u("Q")], add_generation_prompt=True, enable_thinking=True)
    assert text.endswith("<|im_start|>assistant\n")


# One conversation in every family's documented layout, rendered with no special tokens given: the
# templates fall back to their family's own BOS/EOS.
FORMAT_CONVERSATION = [{"role": "system", "content": "S"}, _u("Q"), _a("<think>\nR\n</think>\n\nA"), _u("Q2")]
EXPECTED_FORMAT = {
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
              "<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
              "<|im_start|>assistant\n",
    "qwen2.5": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
               "<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
               "<|im_start|>assistant\n",
    # reasoning before the last user query is dropped
    "qwen3": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
             "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n",
    # system text bare after BOS; only the text after </think> is kept, as is
    "deepseek-r1": "<｜begin▁of▁sentence｜>S<｜User｜>Q<｜Assistant｜>\n\nA<｜end▁of▁sentence｜>"
                   "<｜User｜>Q2<｜Assistant｜><think>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nS<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nR\n</think>\n\nA<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    # the system text joins the last user message only
    "mistral": "<s>[INST] Q[/INST] <think>\nR\n</think>\n\nA</s>[INST] S\n\nQ2[/INST]",
    # the system text opens the first user turn
    "gemma": "<bos><start_of_turn>user\nS\n\nQ<end_of_turn>\n"
             "<start_of_turn>model\n<think>\nR\n</think>\n\nA<end_of_turn>\n"
             "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n",
    "phi4": "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Q<|im_end|>"
            "<|im_start|>assistant<|im_sep|><think>\nR\n</think>\n\nA<|im_end|>"
            "<|im_start|>user<|im_sep|>Q2<|im_end|><|im_start|>assistant<|im_sep|>",
}


@pytest.mark.parametrize("name", SHIPPED)
def test_documented_format(name):
    assert load_template(name).render(FORMAT_CONVERSATION, add_generation_prompt=True) == EXPECTED_FORMAT[name]


@pytest.mark.parametrize("name", ["deepseek-r1", "llama3", "mistral", "gemma"])
def test_given_special_tokens_replace_the_family_defaults(name):
    template = dataclasses.replace(load_template(name), special_tokens={"bos_token": "<B>", "eos_token": "<E>"})
    text = template.render([_u("Q"), _a("A")])
    assert text.startswith("<B>")
    assert FAMILY_TOKENS[name]["bos_token"] not in text
    assert ("<E>" in text) == (name == "mistral")  # only Mistral's assistant turns end with eos_token


def test_qwen3_keeps_reasoning_only_after_the_last_user_query():
    messages = CONVERSATIONS["think_multi_step"][0]
    text = load_template("qwen3").render(messages)
    assert "r1" not in text and "r2" not in text
    # the last turn has empty reasoning but is the final message after the last query: its block stays
    assert text.endswith("<|im_start|>user\nQ3<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA3<|im_end|>\n")


def test_qwen3_prefers_reasoning_content_over_think_tags():
    text = load_template("qwen3").render(CONVERSATIONS["reasoning_field"][0])
    assert "thought one" not in text  # before the last query
    assert text.endswith("<|im_start|>assistant\n<think>\nthought two\n</think>\n\n<think>ignored</think>A2"
                         "<|im_end|>\n")


def test_deepseek_r1_drops_reasoning_from_every_assistant_turn():
    text = load_template("deepseek-r1").render(CONVERSATIONS["think_final"][0])
    assert text == ("<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?"
                    "<｜Assistant｜>\n\nThe answer is 5.<｜end▁of▁sentence｜>")


def test_llama3_date_string_and_trimming():
    text = load_template("llama3").render(CONVERSATIONS["whitespace"][0], date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n\npadded system<|eot_id|>" in text
    assert "<|start_header_id|>user<|end_header_id|>\n\npadded question<|eot_id|>" in text


def test_llama3_tool_call_round_trip():
    messages, kwargs = CONVERSATIONS["tool_round_trip"]
    text = load_template("llama3").render(messages, **kwargs)
    assert "Environment: ipython\n" in text
    assert text.count('"name": "get_weather"') == 2  # the schema, then the call
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Paris"}}<|eot_id|>') in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18 °C, sunny"<|eot_id|>' in text


def test_qwen_tool_responses_share_one_user_turn():
    messages, kwargs = CONVERSATIONS["parallel_tool_calls"]
    for name in ("qwen2.5", "qwen3"):
        text = load_template(name).render(messages, **kwargs)
        assert ("<|im_start|>user\n<tool_response>\n18 °C\n</tool_response>\n<tool_response>\n24 °C\n"
                "</tool_response><|im_end|>\n") in text, name
        assert text.count("<tool_call>\n{\"name\": \"get_weather\"") == 2, name


@pytest.mark.parametrize(("name", "conv"), sorted(REFUSED | UNSUPPORTED))
def test_refusals_are_template_errors_naming_the_template(name, conv):
    with pytest.raises(TemplateError, match=name):
        _our_render(name, conv, True)


def test_mistral_ignores_add_generation_prompt():
    template = load_template("mistral")
    messages = CONVERSATIONS["multi_turn"][0]
    assert template.render(messages, add_generation_prompt=True) == template.render(messages)
