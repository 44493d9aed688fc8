"""The prefix contract at its edges: overlaps only on token boundaries, conflicting reasoning openers, rendered
input, one escape decoder for every --prefix, and rewards that never guess whether the prefix is there."""

from __future__ import annotations

import json

import pytest

from prefill_kit.errors import ConfigError, DataError
from prefill_kit.prompts.render import assistant_opening, render_prompt
from prefill_kit.templates import ChatTemplate, load_template
from tests.test_cli_render import read_jsonl, run_cli

USER = [{"role": "user", "content": "hi"}]


# --- overlap on token boundaries ----------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "prefix", "header"), [
    ("phi4", "> quoted", "<|im_start|>assistant<|im_sep|>"),  # the ">" of <|im_sep|> is not the prefix's
    ("mistral", "]] ok", "[/INST]"),  # nor the "]" of [/INST]
])
def test_overlap_never_starts_inside_an_added_token(template, prefix, header):
    rendered = render_prompt(USER, load_template(template), prefix)
    assert rendered.prompt.endswith(header + prefix)
    assert rendered.prefix == prefix


def test_prefix_column_is_the_text_after_the_generation_prompt():
    for name in ("chatml", "phi4", "mistral", "llama3", "gemma", "qwen2.5", "qwen3", "deepseek-r1"):
        template = load_template(name)
        generation_prompt = template.render(USER, add_generation_prompt=True)
        for prefix in ("", "<think>\n", "> quoted", "]] ok", "\nStep 1", "think>\n"):
            rendered = render_prompt(USER, template, prefix)
            assert rendered.prompt.startswith(generation_prompt)
            added = rendered.prompt[len(generation_prompt):]
            opener = rendered.prefix[:len(rendered.prefix) - len(added)]
            assert rendered.prefix.endswith(added) and generation_prompt.endswith(opener)
            assert opener.strip() in ("", "<think>", "<think>\n\n</think>") or prefix.startswith(opener), (name, prefix)


def test_a_real_overlap_on_a_boundary_is_still_taken():
    template = ChatTemplate("{{ messages[0].content }}<|A|><think>", added_tokens=("<|A|>",))
    rendered = render_prompt(USER, template, "<think>\n")
    assert rendered.prompt == "hi<|A|><think>\n" and rendered.prefix == "<think>\n"


def test_the_tokenizers_added_tokens_count_as_boundaries(tiny_tokenizer):
    from prefill_kit.prompts.options import resolve_template

    source = "{{ messages[0].content }}<|im_start|>"
    template = resolve_template(ChatTemplate(source), tiny_tokenizer)
    assert "<|im_start|>" in template.atomic_tokens
    assert render_prompt(USER, template, "|> x").prompt == "hi<|im_start|>|> x"
    assert render_prompt(USER, ChatTemplate(source), "|> x").prompt == "hi<|im_start|> x"  # no tokenizer: no idea


# --- conflicting reasoning openers --------------------------------------------------------------------------

def test_a_closed_empty_reasoning_block_and_an_opening_prefix_conflict():
    qwen3 = load_template("qwen3")
    with pytest.raises(ConfigError, match=r'enable_thinking.*prefix .<think>\\n. opens a new one'):
        render_prompt(USER, qwen3, "<think>\n", template_kwargs={"enable_thinking": False})
    # Either alone is fine: the template's own closed block, or the prefix opening one.
    closed = render_prompt(USER, qwen3, "", template_kwargs={"enable_thinking": False})
    assert closed.prefix == "<think>\n\n</think>\n\n"
    assert render_prompt(USER, qwen3, "<think>\n").prompt.endswith("assistant\n<think>\n")
    assert render_prompt(USER, qwen3, "The answer", template_kwargs={"enable_thinking": False}).prefix.endswith(
        "</think>\n\nThe answer")


def test_conflict_stops_render_and_training_data(tmp_path, tiny_tokenizer):
    from prefill_kit.config import DataSection
    from prefill_kit.prompts.training_data import load_training_data

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": USER}) + "\n")
    result = run_cli("render", str(data), "--template", "qwen3", "--template-kwargs", '{"enable_thinking": false}',
                     "--prefix", r"<think>\n", "--on-error", "skip", "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "enable_thinking" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.jsonl").exists()
    section = DataSection(path=str(data), prefix="<think>\n", template="qwen3",
                          template_kwargs={"enable_thinking": False})
    with pytest.raises(ConfigError, match="enable_thinking"):
        load_training_data(section, tiny_tokenizer)


# --- rendered input -----------------------------------------------------------------------------------------

def test_assistant_opening_of_each_shipped_template():
    assert assistant_opening(load_template("chatml")) == "<|im_end|>\n<|im_start|>assistant\n"
    assert assistant_opening(load_template("mistral")) == "[/INST]"
    assert assistant_opening(load_template("qwen3"), {"enable_thinking": False}) == \
        "<|im_end|>\n<|im_start|>assistant\n"  # the reasoning opener is the prefix's, not the opening's


def test_rendering_a_rendered_file_stops_or_passes_through(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps({"messages": USER, "solution": "4"}) + "\n")
    first = tmp_path / "once.jsonl"
    assert run_cli("render", str(source), "-o", str(first), "--prefix", r"<think>\n").returncode == 0
    again = run_cli("render", str(first), "-o", str(tmp_path / "twice.jsonl"))
    assert again.returncode == 2 and "already rendered" in again.stderr and "--pass-rendered" in again.stderr
    assert "once.jsonl:1" in again.stderr
    passed = run_cli("render", str(first), "-o", str(tmp_path / "twice.jsonl"), "--pass-rendered")
    assert passed.returncode == 0, passed.stderr
    assert read_jsonl(tmp_path / "twice.jsonl") == read_jsonl(first)


def test_pass_rendered_checks_the_prefix_column(chatml):
    from prefill_kit.prompts.options import RenderOptions
    from prefill_kit.prompts.render import render_row

    options = RenderOptions(chatml, pass_rendered=True)
    opening = assistant_opening(chatml)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert render_row({"prompt": prompt}, options, "prompt", opening=opening)["prefix"] == "<think>\n"
    with pytest.raises(DataError, match="prefix"):
        render_row({"prompt": prompt, "prefix": "<answer>"}, options, "prompt", opening=opening)


def test_a_raw_trl_prompt_with_a_prefix_column_still_renders(tmp_path):
    source = tmp_path / "trl.jsonl"
    source.write_text(json.dumps({"prompt": "What is 2+2?", "prefix": "<think>\n"}) + "\n")
    result = run_cli("render", str(source), "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode == 0, result.stderr
    [row] = read_jsonl(tmp_path / "o.jsonl")
    assert row["prompt"] == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"


# --- one escape decoder -------------------------------------------------------------------------------------

def test_every_prefix_option_decodes_escapes(tmp_path):
    from prefill_kit.config import apply_overrides

    assert apply_overrides({}, [r"data.prefix=<think>\n"])["data"]["prefix"] == "<think>\n"
    assert apply_overrides({}, ["data.prefix=a: b"])["data"]["prefix"] == "a: b"  # not YAML: kept as typed
    rows = tmp_path / "c.jsonl"
    rows.write_text(json.dumps({"completion": "r</think>\n<answer>4</answer>"}) + "\n")
    scored = tmp_path / "s.jsonl"
    result = run_cli("reward", str(rows), "--rewards", "format", "--prefix", r"<think>\n", "-o", str(scored))
    assert result.returncode == 0, result.stderr
    assert read_jsonl(scored)[0]["format"] == 1.0  # "<think>\n" decoded: the full response is well formed


def test_reward_cli_completions_that_include_the_prefix(tmp_path):
    rows = tmp_path / "c.jsonl"
    full = "<think>\nr</think>\n<answer>4</answer>"
    rows.write_text(json.dumps({"completion": full, "prefix": "<think>\n"}) + "\n")
    scored = tmp_path / "s.jsonl"
    as_generated = run_cli("reward", str(rows), "--rewards", "format", "-o", str(scored))
    assert as_generated.returncode == 0 and read_jsonl(scored)[0]["format"] == 0.0  # prefix + completion: doubled
    included = run_cli("reward", str(rows), "--rewards", "format", "--completions-include-prefix", "-o", str(scored))
    assert included.returncode == 0 and read_jsonl(scored)[0]["format"] == 1.0


def test_pass_rendered_takes_the_prefix_after_the_last_assistant_opening(chatml):
    # A multi-turn rendered prompt holds the opening once per assistant turn; the prefix follows the last one.
    from prefill_kit.prompts.options import RenderOptions
    from prefill_kit.prompts.render import render_row

    options = RenderOptions(chatml, pass_rendered=True)
    opening = assistant_opening(chatml)
    prompt = ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert prompt.count(opening) == 2
    row = render_row({"prompt": prompt}, options, "prompt", opening=opening)
    assert row["prefix"] == "<think>\n" and row["prompt"] == prompt
    assert render_row({"prompt": prompt, "prefix": "<think>\n"}, options, "prompt", opening=opening)["prefix"] == \
        "<think>\n"
