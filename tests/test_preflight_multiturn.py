"""Issue 17: preflight and evaluation run the multi-turn tool rollouts training runs, with a scripted policy.

The policy is a stub sampler (`multiturn.hf_sampler` replaced): each rollout's turns are chosen tool calls and
answers ending in the stop token, so the reported turns, calls and failures are known counts.
"""

from __future__ import annotations

import json

import pytest

from prefill_kit.cli import main
from prefill_kit.config import config_from_dict
from prefill_kit.grpo import multiturn
from prefill_kit.grpo.tools import ToolCall, run_tool_calls
from prefill_kit.runs.preflight import failure_kind, failure_kinds, run_preflight
from prefill_kit.templates import load_template
from tests.conftest import REPO
from tests.test_rollouts import _call, add, explode, sleepy

PREFIX = "<think>\n"
STOP = "<|im_end|>"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Script:
    """A stub policy. In the first sampling call, the first rollout writes `first` (its tool calls) and every other
    rollout answers at once; after a tool result, a rollout answers. Counts every turn it wrote."""

    def __init__(self, tokenizer, first: str, *, marker: str | None = None):
        self.tok, self.first, self.marker = tokenizer, first, marker
        self.calls = 0

    def __call__(self, prompts, budgets):
        out = []
        for j, ids in enumerate(prompts):
            text = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if "<tool_response>" in text or "<|im_start|>tool" in text:
                turn = "Sum.\n</think>\n\n<answer>3</answer>"
            elif self.marker is not None and self.marker in text or self.marker is None and self.calls == 0 and j == 0:
                turn = self.first
            else:
                turn = "Direct.\n</think>\n\n<answer>3</answer>"
            whole = self.tok(text + turn + STOP, add_special_tokens=False)["input_ids"]
            assert whole[:len(ids)] == ids
            out.append(whole[len(ids):] + [self.tok.pad_token_id] * 2)  # batched generation pads after the stop
        self.calls += 1
        return out


def _script(monkeypatch, tokenizer_dir, first: str, **kwargs) -> None:
    from transformers import AutoTokenizer

    script = Script(AutoTokenizer.from_pretrained(tokenizer_dir), first, **kwargs)
    monkeypatch.setattr(multiturn, "hf_sampler", lambda *a, **k: script)


TWO_CALLS = "Add.\n</think>\n\nOk." + _call("add", a=1, b=2) + _call("nope", x=1)


def _config(model_dir, *, template="qwen2.5", thinking_history="keep", **sections):
    raw = {"model": {"path": str(model_dir)},
           "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": PREFIX, "template": template,
                    "shuffle": False},
           "rewards": [{"name": "format", "weight": 1.0}],
           "rollout": {"tools": ["tests.test_rollouts:add", "tests.test_rollouts:explode"], "max_turns": 3,
                       "thinking_history": thinking_history},
           "grpo": {"num_generations": 4, "max_completion_length": 600},
           "train": {"per_device_train_batch_size": 8, "seed": 0},
           "output": {"dir": "unused"}}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return raw


def test_preflight_reports_the_true_turns_calls_and_failures_of_the_rollouts(tiny_model_dir, monkeypatch, capsys,
                                                                              tmp_path):
    # one prompt x 4 rollouts: the first calls add (ok) and nope (unknown), then answers; the others answer at once
    _script(monkeypatch, tiny_model_dir, TWO_CALLS)
    report = run_preflight(config_from_dict(_config(tiny_model_dir)), num_prompts=1, progress=False)
    m = report.multi_turn
    assert (m.rollouts, m.turns_mean, m.tool_calls, m.tool_failures) == (4, (2 + 1 + 1 + 1) / 4, 2, 1)
    assert m.failure_kinds == {"unknown tool": 1} and m.loss_samples == 4
    assert m.audit.name == "qwen2.5" and m.append_only and m.rewritten == []
    assert not any("rewrites history" in p.message for p in report.problems)
    # the samples are the rollouts' turns, each assistant turn with its prefix
    turns = report.samples[0]["turns"]
    assert [t["role"] for t in turns] == ["assistant", "tool", "tool", "assistant"]
    assert turns[1] == {"role": "tool", "name": "add", "content": "3"}
    assert all(t["prefix"] == PREFIX for t in turns if t["role"] == "assistant")
    # rollout prompts hold the tools' schemas: longer than the rendered rows
    assert m.prompt_tokens[0] > report.prompt_tokens[2]
    over = [p for p in report.blocking if p.message.startswith("the rollouts' prompts, with the tools' schemas, are up "
                                                               f"to {m.prompt_tokens[2]} tokens")]
    assert len(over) == 1 and "of 512 tokens" in over[0].message

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(_config(tiny_model_dir)), encoding="utf-8")
    _script(monkeypatch, tiny_model_dir, TWO_CALLS)  # a fresh script: its first call writes the tool calls
    assert main(["preflight", str(config), "--prompts", "1"]) == 0
    out = capsys.readouterr().out
    assert "turns:       1.25 per rollout on average (rollout.max_turns 3)" in out
    assert "tool calls:  2, 1 failed (1 unknown tool)" in out
    assert "append-only: after a tool turn: yes; after a user turn: yes (template qwen2.5, probed); sampled " \
           "rollouts: no rewrite in 4" in out
    assert "history:     rollout.thinking_history keep: 4 loss row(s) from 4 rollouts" in out


def test_failure_kinds_are_read_from_the_tool_messages_and_sum_to_the_failures():
    calls = [ToolCall("add", {"a": 1, "b": 2}), ToolCall("nope", {}), ToolCall("explode", {"x": 1}),
             ToolCall(None, None, "malformed tool call: invalid JSON"), ToolCall("sleepy", {"seconds": 5}),
             ToolCall("add", {"a": 1})]
    messages, failed = run_tool_calls(calls, {"add": add, "explode": explode, "sleepy": sleepy}, timeout=0.05)
    assert [failure_kind(m["content"]) for m in messages] == [
        None, "unknown tool", "raised RuntimeError", "malformed call", "timed out", "raised TypeError"]

    class Result:  # what failure_kinds reads of a RolloutResult
        def __init__(self, completion, tool_failures):
            self.completion, self.tool_failures = completion, tool_failures

    assert failure_kinds([Result(messages, failed)]) == {
        "unknown tool": 1, "raised RuntimeError": 1, "malformed call": 1, "timed out": 1, "raised TypeError": 1}
    # a tool that itself returns {'error': ...} did not fail (run_tool_calls did not count it): the kinds still
    # sum to the failures, under `unclassified` where the messages cannot tell which failed
    returned = {"role": "tool", "name": "add", "content": "{'error': 'ValueError: bad'}"}
    assert failure_kinds([Result([returned, *messages[1:2]], 1)]) == {"unclassified": 1}
    assert failure_kinds([Result([returned], 0)]) == {}


def _stripping_template(tmp_path) -> str:
    """Qwen2.5 that strips the reasoning from earlier tool-calling turns, as DeepSeek-R1 strips it from every
    earlier turn: rendering stops being append-only after a tool turn."""
    source = load_template("qwen2.5").source
    old = "{{- ('\\n' + message.content) if message.content }}"
    assert old in source
    source = source.replace(old, "{%- set answer = message.content.split('</think>')[-1].lstrip('\\n') %}"
                                 "{{- ('\\n' + answer) if answer }}")
    path = tmp_path / "strips_reasoning.jinja"
    path.write_text(source, encoding="utf-8")
    return str(path)


def test_keep_with_a_template_that_rewrites_history_warns_and_split_does_not(tiny_model_dir, monkeypatch,
                                                                             tmp_path):
    template = _stripping_template(tmp_path)
    _script(monkeypatch, tiny_model_dir, TWO_CALLS)
    keep = run_preflight(config_from_dict(_config(tiny_model_dir, template=template)), num_prompts=1,
                         progress=False).multi_turn
    assert keep is not None and not keep.append_only
    assert keep.audit.tool_bridge.rewrites is not None  # the audit's probe sees it too
    assert [(i, k, r.turn, r.role) for i, k, r in keep.rewritten] == [(0, 0, 2, "assistant")]  # after system, user
    assert (keep.rewritten[0][2].was, keep.rewritten[0][2].now) == (PREFIX + "Add.\n</think>\n\n", "")  # stripped

    _script(monkeypatch, tiny_model_dir, TWO_CALLS)
    report = run_preflight(config_from_dict(_config(tiny_model_dir, template=template)), num_prompts=1,
                           progress=False)
    (warning,) = [p for p in report.problems if "rewrites history" in p.message]
    assert warning.severity == "warning"
    assert warning.message.startswith("the template rewrites history in 1 of 4 sampled rollouts; rollout 1, after "
                                      "its turn 1: message 2 (assistant): the template writes")
    assert "set rollout.thinking_history: split" in warning.message

    _script(monkeypatch, tiny_model_dir, TWO_CALLS)
    split = run_preflight(config_from_dict(_config(tiny_model_dir, template=template, thinking_history="split")),
                          num_prompts=1, progress=False)
    assert not any("rewrites history" in p.message for p in split.problems)
    assert split.multi_turn.loss_samples == 5  # the rewritten rollout is two samples, the others one each


def test_keep_warns_from_the_audits_probe_when_no_sampled_rollout_called_a_tool(tiny_model_dir, monkeypatch,
                                                                                tmp_path):
    _script(monkeypatch, tiny_model_dir, "Direct.\n</think>\n\n<answer>3</answer>")  # no tool call at all
    report = run_preflight(config_from_dict(_config(tiny_model_dir, template=_stripping_template(tmp_path))),
                           num_prompts=1, progress=False)
    assert report.multi_turn.tool_calls == 0 and report.multi_turn.rewritten == []
    (warning,) = [p.message for p in report.problems if "rewrites history" in p.message]
    assert warning.startswith("the template rewrites history after a tool turn (message 1 (assistant)")
    assert "in the audit's probe" in warning


def test_keep_warns_on_a_rewrite_the_sampled_rollouts_met_though_the_probe_saw_none(tiny_model_dir, monkeypatch):
    # ChatML writes no tool calls: the model's <tool_call> text is dropped from its turn once the result follows.
    # The audit's probe (whose turn text holds no call) renders append-only; the sampled rollout does not.
    _script(monkeypatch, tiny_model_dir, TWO_CALLS)
    report = run_preflight(config_from_dict(_config(tiny_model_dir, template="chatml")), num_prompts=1,
                           progress=False)
    m = report.multi_turn
    assert m.audit.tool_bridge.rewrites is None and len(m.rewritten) == 1 and not m.append_only
    assert any(p.message.startswith("the template rewrites history in 1 of 4 sampled rollouts")
               for p in report.problems)


def test_evaluation_runs_the_multi_turn_rollouts_on_the_eval_rows(tiny_model_dir, tmp_path, monkeypatch):
    """Eval rows hold a marker: their rollouts call add and an unknown tool; training rollouts answer at once. The
    Calculator environment is reset with the eval rows (solutions 3 and 4: add(1, 2) matches the first)."""
    from prefill_kit.backends import builtin
    from prefill_kit.config import load_config

    held_out = tmp_path / "heldout.jsonl"
    held_out.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"HELDOUT {q}"}],
                                            "solution": s}) + "\n" for q, s in (("1 + 2?", "3"), ("2 + 2?", "4"))),
                        encoding="utf-8")
    monkeypatch.chdir(REPO)
    first = "Add.\n</think>\n\nOk." + _call("add", a=1, b=2) + _call("nope")
    _script(monkeypatch, tiny_model_dir, first, marker="HELDOUT")
    config = load_config(REPO / "examples" / "grpo_tiny_tools.yaml", [
        f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.max_steps=1",
        "rewards=[{name: format}]", "grpo.max_completion_length=600", f"data.eval_path={held_out}",
        "train.eval_steps=1", "grpo.eval_num_generations=2"])
    result = builtin.train(config, progress=False)
    assert result.history[0]["turns/mean"] == 1.0 and result.history[0]["tools/calls"] == 0.0
    [row] = result.eval_history
    assert (row["eval/turns/mean"], row["eval/tools/calls"], row["eval/tools/failures"]) == (2.0, 8.0, 4.0)
    assert row["eval/rewards/Calculator"] == 0.5 and row["eval/rewards/format"] == 1.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("eval/tools/failures") == 4.0 for r in logged)
