"""Multi-turn tool rollouts (issue 17): tools, parsing, execution, and the rollout loop with a scripted policy."""

from __future__ import annotations

import functools
import json
import time

import pytest

from prefill_kit.config import config_from_dict
from prefill_kit.errors import ConfigError
from prefill_kit.grpo.multiturn import EnvironmentReward, run_rollouts, sample_and_score_turns, samples, to_rollout
from prefill_kit.grpo.tools import ToolCall, call_with_deadline, load_tools, parse_hermes, parse_turn, run_tool_calls
from prefill_kit.prompts.render import render_prompt
from prefill_kit.prompts.turns import TrajectoryBuilder

PREFIX = "<think>\n"


# --- tools the tests load by "module:function" ------------------------------------------------------------------

def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def explode(x: int) -> int:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("kaboom")


def sleepy(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


class Calculator:
    """An environment: reset takes the row, `multiply` is a tool, get_reward scores the last result."""

    def __init__(self):
        self.last = None
        self.target = None

    def reset(self, **row):
        self.last, self.target = None, row.get("solution")
        return None

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.last = a * b
        return self.last

    def get_reward(self) -> float:
        return 1.0 if self.last is not None and str(self.last) == str(self.target) else 0.0


def _config(**rollout):
    return config_from_dict({"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"},
                             "rollout": rollout})


# --- config and loading -----------------------------------------------------------------------------------------

def test_rollout_config_defaults_and_errors():
    c = _config()
    assert (c.rollout.tools, c.rollout.environment, c.rollout.max_turns, c.rollout.tool_timeout,
            c.rollout.thinking_history) == ([], None, 8, 10.0, "keep")
    assert not c.rollout.multi_turn and _config(tools=["tests.test_rollouts:add"]).rollout.multi_turn
    with pytest.raises(ConfigError, match=r"rollout.tools\[0\]: expected \"module:function\", got 'add'"):
        _config(tools=["add"])
    with pytest.raises(ConfigError, match="rollout.environment: expected"):
        _config(environment="tests.test_rollouts")
    with pytest.raises(ConfigError, match="rollout.thinking_history: expected one of keep, split"):
        _config(thinking_history="drop")
    with pytest.raises(ConfigError, match="rollout.max_turns: expected a positive integer"):
        _config(max_turns=0)
    with pytest.raises(ConfigError, match="rollout.tool_timeout"):
        _config(tool_timeout=0)


def test_load_tools_builds_schemas_and_environment_reward():
    tools = load_tools(["tests.test_rollouts:add"], "tests.test_rollouts:Calculator")
    assert [s["function"]["name"] for s in tools.schemas] == ["add", "multiply"]
    assert tools.schemas[0]["function"]["parameters"]["properties"]["a"] == {"type": "integer",
                                                                             "description": "The first number."}
    assert tools.reward_name == "Calculator"
    envs = tools.environments(3)
    assert len(envs) == 3 and len({id(e) for e in envs}) == 3 and tools.environments(2) == envs[:2]
    assert set(tools.tool_table(envs[0])) == {"add", "multiply"}
    with pytest.raises(ConfigError, match="rollout.tools\\[0\\]: cannot import 'no_such_module'"):
        load_tools(["no_such_module:f"], None)
    with pytest.raises(ConfigError, match="rollout.tools\\[0\\]: module 'tests.test_rollouts' has no 'nope'"):
        load_tools(["tests.test_rollouts:nope"], None)


# --- parsing ----------------------------------------------------------------------------------------------------

def test_hermes_parser_reads_calls_and_names_malformed_ones():
    content, calls = parse_hermes('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                                  '</tool_call>')
    assert content == "Let me add." and calls == [ToolCall("add", {"a": 1, "b": 2})]
    assert parse_hermes("no calls here") == ("no calls here", [])
    _, calls = parse_hermes("<tool_call>{not json}</tool_call><tool_call>[1]</tool_call>"
                            '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name"')
    assert [c.error is not None for c in calls] == [True, True, False, True]
    assert calls[2] == ToolCall("f", {"x": 1}) and "without </tool_call>" in calls[3].error


def test_tool_errors_become_tool_messages_and_never_raise():
    table = {"add": add, "explode": explode, "sleepy": sleepy}
    calls = [ToolCall("add", {"a": 2, "b": 3}), ToolCall("missing", {}), ToolCall("explode", {"x": 1}),
             ToolCall("add", {"a": 1}), ToolCall(None, None, "malformed tool call: invalid JSON")]
    messages, failures = run_tool_calls(calls, table, timeout=5)
    assert [m["content"] for m in messages] == [
        "5", "{'error': 'Tool missing not found.'}", "{'error': 'RuntimeError: kaboom'}",
        "{'error': \"TypeError: add() missing 1 required positional argument: 'b'\"}",
        "{'error': 'malformed tool call: invalid JSON'}"]
    assert [m["name"] for m in messages] == ["add", "missing", "explode", "add", "unknown"]
    assert failures == 4


def test_a_tool_past_its_timeout_is_an_error_and_does_not_block():
    start = time.perf_counter()
    result, failed = call_with_deadline(sleepy, {"seconds": 30}, timeout=0.2)
    assert failed and result == {"error": "Tool sleepy timed out after 0.2 s."}
    assert time.perf_counter() - start < 5  # abandoned, not joined
    assert call_with_deadline(sleepy, {"seconds": 0}, timeout=5) == ("awake", False)


# --- the rollout loop with a scripted policy ------------------------------------------------------------------


@functools.cache
def _tokenizer():
    """The tiny BPE tokenizer; Qwen2.5's tool tags are added (not special) tokens, as in Qwen's own tokenizer."""
    from prefill_kit.templates import load_template
    from prefill_kit.tiny_model import build_tokenizer

    tok = build_tokenizer(chat_template=load_template("qwen2.5").source)
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    return tok


def _call(name: str, **arguments) -> str:
    return f'\n<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


class ScriptedSampler:
    """A stub policy: for the rollout whose prompt holds `key`, its n-th turn writes `script[key][n]` (+ stop)."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], stop: str = "<|im_end|>"):
        self.tok, self.scripts, self.stop = tokenizer, scripts, stop
        self.seen: dict[str, int] = {}
        self.calls: list[int] = []  # how many rollouts each call sampled together
        self.sampled: dict[str, list[list[int]]] = {}

    def __call__(self, prompts, budgets):
        self.calls.append(len(prompts))
        out = []
        for ids in prompts:
            text = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            key = next(k for k in self.scripts if k in text)
            n = self.seen[key] = self.seen.get(key, -1) + 1
            turn = self.scripts[key][n] + self.stop
            whole = self.tok(text + turn, add_special_tokens=False)["input_ids"]
            assert whole[:len(ids)] == ids, "the scripted turn must not merge into the prompt's last token"
            new = whole[len(ids):]
            self.sampled.setdefault(key, []).append(new)
            out.append(new + [self.tok.pad_token_id] * 3)  # batched generation pads after the stop
        return out


def _rollout(scripts, *, tools=None, max_turns=8, max_completion_length=400, questions=None, timeout=5.0):
    tok = _tokenizer()
    tools = tools or load_tools(["tests.test_rollouts:add", "tests.test_rollouts:explode"], None, timeout)
    questions = questions or list(scripts)
    builders = [TrajectoryBuilder([{"role": "user", "content": q}], "qwen2.5", tok, prefix=PREFIX,
                                  tools=tools.schemas) for q in questions]
    sampler = ScriptedSampler(tok, scripts)
    results = run_rollouts(builders, sampler, tokenizer=tok, eos_ids=[tok.eos_token_id],
                           tables=[tools.tool_table()] * len(builders), schemas=[tools.schemas] * len(builders),
                           max_turns=max_turns, max_completion_length=max_completion_length, tool_timeout=timeout)
    return results, sampler, tools


SCRIPTS = {
    "What is 2 + 3?": ["I add.\n</think>\n\nLet me add." + _call("add", a=2, b=3),
                       "Got 5.\n</think>\n\n<answer>5</answer>"],
    "What is 7 + 1?": ["Direct.\n</think>\n\n<answer>8</answer>"],
    "Break it": ["Try.\n</think>\n\nHm." + _call("explode", x=1) + _call("nope"),
                 "Again.\n</think>\n\nOk." + _call("add", a=1, b=1), "Done.\n</think>\n\n<answer>2</answer>"],
}


def test_rollouts_are_token_in_token_out_with_masks_over_sampled_ids_only():
    results, sampler, tools = _rollout(SCRIPTS)
    tok = _tokenizer()
    assert sampler.calls == [3, 2, 1]  # batched across the live rollouts, which end one by one
    for r, key in zip(results, SCRIPTS, strict=True):
        traj = r.trajectory
        sampled = sampler.sampled[key]
        assert r.turns == len(SCRIPTS[key]) and not r.truncated
        # ids = prompt + sampled_1 + bridge_1 + ...; the mask is 1 on sampled ids exactly
        pieces = [tok(render_prompt([{"role": "user", "content": key}], "qwen2.5", PREFIX,
                                    tools=tools.schemas).prompt, add_special_tokens=False)["input_ids"]]
        expected_mask = [0] * len(pieces[0])
        for k, ids in enumerate(sampled):
            pieces.append(ids)
            expected_mask += [1] * len(ids)
            if k < len(traj.bridges):
                pieces.append(traj.bridges[k].ids)
                expected_mask += [0] * len(traj.bridges[k].ids)
        assert traj.ids == [t for p in pieces for t in p]
        assert traj.mask == expected_mask
        # Qwen2.5 renders these conversations append-only: the text is the template's rendering of it all
        assert all(b.rewrites is None for b in traj.bridges)
        assert traj.text == render_prompt(traj.messages, "qwen2.5", PREFIX, tools=tools.schemas,
                                          continue_final=True).prompt + "<|im_end|>"
        assert traj.ids == tok(traj.text, add_special_tokens=False)["input_ids"]
        # every assistant turn opens with the prefix once
        assert traj.text.count("<|im_start|>assistant\n" + PREFIX) == r.turns
    broken = results[2]
    assert (broken.tool_calls, broken.tool_failures) == (3, 2)
    assert [m["role"] for m in broken.completion] == ["assistant", "tool", "tool", "assistant", "tool", "assistant"]
    assert broken.completion[1]["content"] == "{'error': 'RuntimeError: kaboom'}"
    assert broken.completion[2]["content"] == "{'error': 'Tool nope not found.'}"
    assert all(m["content"].startswith(PREFIX) and m["prefix"] == PREFIX
               for m in broken.completion if m["role"] == "assistant")


def test_max_turns_ends_a_rollout_after_its_last_allowed_turn():
    results, sampler, _ = _rollout({"What is 2 + 3?": SCRIPTS["What is 2 + 3?"]}, max_turns=1)
    assert results[0].turns == 1 and results[0].tool_calls == 0 and not results[0].trajectory.bridges


def test_max_completion_length_bounds_sampled_ids_and_bridges_together():
    scripts = {"What is 2 + 3?": SCRIPTS["What is 2 + 3?"]}
    full, sampler, _ = _rollout(scripts)
    first_turn = len(sampler.sampled["What is 2 + 3?"][0])
    # room for the first turn, not for its tool result: the rollout ends there, truncated
    cut, _, _ = _rollout(scripts, max_completion_length=first_turn + 3)
    assert cut[0].truncated and cut[0].turns == 1 and not cut[0].trajectory.bridges
    assert len(cut[0].completion_ids) <= first_turn + 3
    # a turn cut by the budget is truncated, and keeps only what fits
    short, _, _ = _rollout(scripts, max_completion_length=5)
    assert short[0].truncated and len(short[0].completion_ids) == 5 and sum(short[0].trajectory.mask) == 5
    # everything after the prompt is within the bound
    bound = first_turn + len(full[0].trajectory.bridges[0].ids) + 4
    mid, _, _ = _rollout(scripts, max_completion_length=bound)
    assert mid[0].truncated and len(mid[0].completion_ids) == bound and mid[0].turns == 2


def test_loss_rows_keep_is_one_sample_whose_mask_is_the_trajectory_after_the_prompt():
    results, _, _ = _rollout(SCRIPTS)
    tok = _tokenizer()
    r = results[2]
    [s] = samples(r, "keep", lambda t: tok(t, add_special_tokens=False)["input_ids"])
    assert s.prompt_ids + s.completion_ids == r.trajectory.ids
    assert s.completion_mask == r.trajectory.mask[r.prompt_length:]
    batch = to_rollout([s], pad_token_id=tok.pad_token_id, truncated=[False])
    assert batch.completion_mask[0].tolist() == s.completion_mask
    assert batch.completion_attention_mask[0].tolist() == [1] * len(s.completion_ids)  # bridges are attended to


def test_scoring_gets_message_lists_prefix_and_environment_reward():
    tok = _tokenizer()
    tools = load_tools([], "tests.test_rollouts:Calculator")
    scripts = {"What is 6 * 7?": ["Use it.\n</think>\n\nOk." + _call("multiply", a=6, b=7),
                                  "So.\n</think>\n\n<answer>42</answer>"],
               "What is 2 * 2?": ["Guess.\n</think>\n\n<answer>5</answer>"]}
    questions = list(scripts)
    envs = tools.environments(2)
    for env, sol in zip(envs, ["42", "4"], strict=True):
        env.reset(solution=sol)
    seen = {}

    class Recording:
        name, weight = "recording", 1.0

        def fn(self, prompts, completions, completion_ids, **kwargs):
            seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            return [0.0] * len(completions)

    builders = [TrajectoryBuilder([{"role": "user", "content": q}], "qwen2.5", tok, prefix=PREFIX,
                                  tools=tools.schemas) for q in questions]
    scored = sample_and_score_turns(
        builders, ScriptedSampler(tok, scripts), rows={"solution": ["42", "4"]},
        prompts=[[{"role": "user", "content": q}] for q in questions],
        rewards=[Recording(), EnvironmentReward("Calculator")], tokenizer=tok, eos_ids=[tok.eos_token_id],
        tools=tools, environments=envs, schemas=[tools.schemas] * 2, max_turns=4, max_completion_length=300,
        thinking_history="keep")
    assert scored.scores[:, 1].tolist() == [1.0, 0.0]
    assert seen["prefix"] == [PREFIX, PREFIX] and seen["solution"] == ["42", "4"]
    assert seen["environments"] == envs
    first = seen["completions"][0]
    assert [m["role"] for m in first] == ["assistant", "tool", "assistant"]
    assert first[0]["content"] == PREFIX + "Use it.\n</think>\n\nOk." and first[1]["content"] == "42"
    assert first[2]["content"] == PREFIX + "So.\n</think>\n\n<answer>42</answer>"
    assert seen["completion_ids"][0] == scored.results[0].completion_ids
    assert scored.owners == [0, 1] and scored.lengths == [sum(r.trajectory.mask) for r in scored.results]


def test_parse_turn_uses_hermes_without_a_response_parser():
    tok = _tokenizer()
    ids = tok("Hi." + _call("add", a=1, b=2) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    message, calls = parse_turn(tok, ids)
    assert message == {"role": "assistant", "content": "Hi.", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
    assert calls == [ToolCall("add", {"a": 1, "b": 2})]


# --- split samples (thinking_history) ------------------------------------------------------------------------


def test_split_starts_a_sample_at_the_rewrite_with_the_templates_own_prompt():
    """ChatML drops tool calls from its rendering: the model's own tool-call turn is rewritten, so with `split` the
    turn after it is a sample of its own, whose prompt is ChatML's rendering of the conversation so far."""
    from prefill_kit.tiny_model import build_tokenizer

    tok = build_tokenizer(chat_template="")
    tools = load_tools(["tests.test_rollouts:add"], None)
    scripts = {"What is 2 + 3?": SCRIPTS["What is 2 + 3?"]}
    builder = TrajectoryBuilder([{"role": "user", "content": "What is 2 + 3?"}], "chatml", tok, prefix=PREFIX)
    [r] = run_rollouts([builder], ScriptedSampler(tok, scripts), tokenizer=tok, eos_ids=[tok.eos_token_id],
                       tables=[tools.tool_table()], schemas=[None], max_turns=4, max_completion_length=400,
                       tool_timeout=5)
    traj = r.trajectory
    assert r.turns == 2 and traj.bridges[0].rewrites is not None
    def encode(t):
        return tok(t, add_special_tokens=False)["input_ids"]
    [keep] = samples(r, "keep", encode)
    first, second = samples(r, "split", encode)
    assert keep.prompt_ids + keep.completion_ids == traj.ids
    # the first sample: the prompt, turn 1 and its bridge; the second: the template's rendering, then turn 2
    assert first.prompt_ids + first.completion_ids == traj.ids[:traj.turn_starts[1]]
    shown = render_prompt(traj.messages[:3], "chatml", PREFIX).prompt
    assert shown == traj.turn_prompts[1] and "<tool_call>" not in shown
    assert second.prompt_ids == encode(shown)
    assert second.completion_ids == traj.ids[traj.turn_starts[1]:]
    assert sum(first.completion_mask) + sum(second.completion_mask) == sum(traj.mask)  # each sampled id once
    assert set(second.completion_mask) == {1}


def test_every_split_sample_takes_its_rollouts_advantage():
    import torch

    from prefill_kit.grpo.multiturn import sample_advantages

    got = sample_advantages(torch.tensor([0.5, -1.0, 2.0]), [0, 0, 1, 2, 2, 2])
    assert got.tolist() == [0.5, 0.5, -1.0, 2.0, 2.0, 2.0]


# --- the built-in loop, end to end -----------------------------------------------------------------------------


def _loop_sampler(tok):
    """Every rollout calls `add` once, then answers: the same script through the real training loop."""
    def sample(prompts, budgets):
        out = []
        for ids in prompts:
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            turn = ("Sum.\n</think>\n\n<answer>3</answer>" if "<tool_response>" in text
                    else "Add.\n</think>\n\nOk." + _call("add", a=1, b=2)) + "<|im_end|>"
            whole = tok(text + turn, add_special_tokens=False)["input_ids"]
            out.append(whole[len(ids):])
        return out
    return lambda *a, **k: sample


def test_builtin_loop_trains_on_scripted_tool_rollouts(tiny_model_dir, tmp_path, monkeypatch, one_torch_thread):
    import math

    from prefill_kit.backends import builtin
    from prefill_kit.config import load_config
    from prefill_kit.grpo import multiturn
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    config = load_config(REPO / "examples" / "grpo_tiny_tools.yaml", [
        f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.max_steps=2",
        "output.log_completions_steps=1",
        "rewards=[{name: format}]", "grpo.max_completion_length=200"])
    from transformers import AutoTokenizer

    monkeypatch.setattr(multiturn, "hf_sampler", _loop_sampler(AutoTokenizer.from_pretrained(tiny_model_dir)))
    result = builtin.train(config, progress=False)
    rows = result.history
    assert [r["turns/mean"] for r in rows] == [2.0, 2.0]
    assert [r["tools/calls"] for r in rows] == [8.0, 8.0] and [r["tools/failures"] for r in rows] == [0.0, 0.0]
    assert all(r["rewards/format"] == 1.0 and math.isfinite(r["loss"]) for r in rows)
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 16 and all(row["Calculator"] == (1.0 if row["solution"] == "3" else 0.0) for row in logged)
    turns = logged[0]["turns"]
    assert [t["role"] for t in turns] == ["assistant", "tool", "assistant"]
    assert turns[0]["prefix"] == PREFIX and turns[0]["content"] == "Add.\n</think>\n\nOk."
    assert turns[1] == {"role": "tool", "name": "add", "content": "3"}
    assert turns[0]["trained_tokens"] > 0 and turns[2]["trained_tokens"] > 0
    assert logged[0]["completion_length"] == turns[0]["trained_tokens"] + turns[2]["trained_tokens"]


def test_the_tools_example_runs_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch, one_torch_thread):
    """The shipped example, real sampling (a random model: few or no well-formed calls), two steps."""
    import math

    from prefill_kit.backends import builtin
    from prefill_kit.config import load_config
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    config = load_config(REPO / "examples" / "grpo_tiny_tools.yaml", [
        f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.max_steps=2"])
    rows = builtin.train(config, progress=False).history
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(1.0 <= r["turns/mean"] <= 3.0 and r["tools/failures"] <= r["tools/calls"] for r in rows)
    assert all(r["completion_length"] <= 48 for r in rows)
