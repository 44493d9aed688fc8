"""Template loading and sandboxed rendering: same text as transformers, no code execution."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from prefill_kit.errors import TemplateError, TemplateSecurityError
from prefill_kit.templates import ChatTemplate, available_templates, load_template
from prefill_kit.tiny_model import build_tokenizer

# A template that exercises what apply_chat_template provides: loop controls, namespace, tojson,
# raise_exception, special tokens, extra kwargs, tools, trim_blocks/lstrip_blocks whitespace handling.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) -%}
{% if tools %}TOOLS:{{ tools | tojson }}
{% endif %}
{%- for m in messages %}
    {% if m.role == 'developer' %}{% continue %}{% endif %}
    {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
    {% if ns.n > 50 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>\nhm\n</think>\nHello"}, {"role": "user", "content": "Again"}],
    [{"role": "user", "content": "Ünïcödé café 数学 🙂 \"quotes\" <tags> & {{ braces }}"}],
    [{"role": "user", "content": ""}],
    [{"role": "developer", "content": "skipped"}, {"role": "user", "content": "after continue"}],
]


@pytest.fixture(scope="module")
def rich_tokenizer():
    return build_tokenizer(chat_template=RICH_TEMPLATE, add_bos=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_render_is_byte_identical_to_apply_chat_template(rich_tokenizer, messages, gen, kwargs):
    template = ChatTemplate(RICH_TEMPLATE, "rich", {"bos_token": rich_tokenizer.bos_token,
                                                    "eos_token": rich_tokenizer.eos_token})
    expected = rich_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
    assert template.render(messages, add_generation_prompt=gen, **kwargs) == expected


def test_tools_render_like_transformers(rich_tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "description": "ä+b",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = CONVERSATIONS[0]
    template = ChatTemplate(RICH_TEMPLATE, "rich", {"bos_token": "<s>"})
    expected = rich_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert template.render(messages, tools=tools, add_generation_prompt=True) == expected
    assert 'ä+b' in expected  # tojson keeps non-ASCII, as transformers' tojson does


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_fields_are_aliased_like_transformers(field):
    source = ("{% for m in messages %}[{{ m.role }}|{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }}]"
              "{% endfor %}")
    tokenizer = build_tokenizer(chat_template=source)
    messages = [{"role": "user", "content": "q", "tool_calls": None},
                {"role": "assistant", "content": "a", field: "because"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ChatTemplate(source).render(messages) == expected
    assert "|because|because|a]" in expected


def test_keys_whose_value_is_none_are_dropped_like_transformers():
    """A `tool_calls: None` is not defined for the template (Mistral's checks `tool_calls is defined`); a message
    with nothing to drop or alias reaches the template as it is."""
    source = "{% for m in messages %}[{{ m.tool_calls is defined }}|{{ m.content }}]{% endfor %}"
    tokenizer = build_tokenizer(chat_template=source)
    messages = [{"role": "user", "content": "q", "tool_calls": None}, {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b", "tool_calls": []}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ChatTemplate(source).render(messages) == expected == "[False|q][False|a][True|b]"


def test_strftime_now_is_available():
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]).isdigit()


def test_raise_exception_is_a_template_error_naming_the_template():
    template = ChatTemplate(RICH_TEMPLATE, "rich")
    with pytest.raises(TemplateError, match="rich.*bad role tool"):
        template.render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("source", ["{% for m in messages %}", "{{ messages | nosuchfilter }}"])
def test_syntax_errors_name_the_template(source):
    with pytest.raises(TemplateError, match="broken.jinja"):
        ChatTemplate(source, "broken.jinja").render([])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ raise_exception.__globals__ }}",
    "{% set ns = namespace(__dict__=1) %}",
    "{{ messages.append('x') }}",
])
def test_sandbox_blocks_python_internals(source):
    with pytest.raises(TemplateSecurityError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_shipped_names_are_listed_and_load():
    names = available_templates()
    assert "chatml" in names
    for name in names:
        assert load_template(name).name == name


def test_load_from_jinja_file(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{{ messages[0].content }}!", encoding="utf-8")
    assert load_template(path).render([{"role": "user", "content": "hey"}]) == "hey!"


def test_load_from_model_dir_matches_its_tokenizer(tmp_path, bos_template):
    tokenizer = build_tokenizer(chat_template=bos_template, add_bos=True)
    tokenizer.save_pretrained(tmp_path)
    template = load_template(tmp_path)
    assert template.special_tokens["bos_token"] == "<s>"
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[1]
    assert template.render(messages, add_generation_prompt=True) == reloaded.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_load_from_tokenizer_config_with_named_templates(tmp_path):
    config = {"bos_token": {"content": "<B>", "lstrip": False}, "eos_token": "<E>",
              "chat_template": [{"name": "default", "template": "{{ bos_token }}D"},
                                {"name": "tool_use", "template": "{{ eos_token }}T"}]}
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert load_template(path).render([]) == "<B>D"
    assert load_template(tmp_path, name="tool_use").render([]) == "<E>T"
    with pytest.raises(TemplateError, match="no chat template named 'rag'"):
        load_template(path, name="rag")


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(TemplateError, match="unknown template 'no-such-thing'.*chatml"):
        load_template("no-such-thing")
