"""Rows carrying `tools` render as `apply_chat_template(..., tools=...)` does; `prefill-kit templates audit`."""

from __future__ import annotations

import json

import pytest

from prefill_kit.cli import main
from prefill_kit.errors import DataError
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.render import render_row
from prefill_kit.prompts.template_audit import audit_template
from prefill_kit.templates import load_template
from prefill_kit.tiny_model import build_tokenizer
from tests.test_turns import WEATHER, _call, _tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [_call("Paris")]},
                {"role": "tool", "content": "18 °C"}, {"role": "user", "content": "Thanks"}]


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama3"])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_rows_tools_reach_the_template_byte_identical_to_apply_chat_template(name, as_json):
    template = load_template(name)
    row = {"messages": CONVERSATION, "tools": json.dumps([WEATHER]) if as_json else [WEATHER]}
    out = render_row(row, RenderOptions(template=template, prefix="<think>\n"), "messages")
    expected = build_tokenizer(chat_template=template.source).apply_chat_template(
        CONVERSATION, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert out["prompt"] == expected + "<think>\n"
    assert '"name": "get_weather"' in out["prompt"].split("Weather in Paris?")[0]  # the schema, before the question
    assert out["tools"] == row["tools"]  # passes through: a rollout renders its bridges with the same tools


@pytest.mark.parametrize("tools", ["{not json", {"a": 1}, [1, 2]])
def test_malformed_tools_are_data_errors_naming_the_field(tools):
    with pytest.raises(DataError, match="'tools'"):
        render_row({"messages": CONVERSATION, "tools": tools}, RenderOptions(template=load_template("qwen2.5")),
                   "messages")


def test_audit_reports_rewrites_stop_tokens_and_dropped_tool_results():
    audit = {name: audit_template(load_template(name), prefix="<think>\n")
             for name in ("qwen2.5", "qwen3", "deepseek-r1", "phi4", "mistral")}
    assert audit["qwen2.5"].append_only
    assert (audit["qwen2.5"].stop, audit["qwen2.5"].after_stop) == ("<|im_end|>", "\n")
    assert not audit["qwen3"].append_only and audit["qwen3"].tool_bridge.rewrites is None
    assert audit["qwen3"].user_bridge.rewrites.role == "assistant"
    assert audit["deepseek-r1"].opener == "<think>\n" and audit["deepseek-r1"].tool_error
    assert audit["deepseek-r1"].user_bridge.text == "<｜User｜>Thanks!<｜Assistant｜><think>\n"  # opener written once
    assert "a fixed start" not in audit["phi4"].tool_bridge.text
    assert audit["mistral"].stop == "</s>"


def test_audit_token_stability_needs_a_tokenizer():
    assert audit_template(load_template("qwen2.5")).bridges_stable is None
    audit = audit_template(load_template("qwen2.5"), prefix="<think>\n", tokenizer=_tokenizer("qwen", "qwen2.5"))
    assert audit.bridges_stable is not None and audit.prefix_stable is not None


def test_audit_cli_prints_a_row_per_template_and_strict_fails_on_rewrites(capsys):
    assert main(["templates", "audit", "qwen2.5", "--prefix", r"<think>\n", "--strict"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| qwen2.5 |") == 1 and "<think>\\n" in out
    assert main(["templates", "audit", "qwen2.5", "qwen3", "--strict"]) == 1
    assert main(["templates", "audit", "qwen3"]) == 0
    assert main(["templates"]) == 0
