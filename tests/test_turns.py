"""The multi-turn bridge and token-in-token-out trajectories, with a scripted policy on every shipped template
and every tokenizer family."""

from __future__ import annotations

import functools

import pytest

from prefill_kit import TurnBridge, turn_bridge
from prefill_kit.errors import ConfigError, DataError
from prefill_kit.prompts.render import render_prompt
from prefill_kit.prompts.turns import TrajectoryBuilder, check_thinking_history, split_turns
from prefill_kit.templates import SHIPPED_ADDED_TOKENS, available_templates, load_template
from tests.tokenizer_families import FAMILIES, build

# Where each family's model stops its turn (its documented end-of-turn token), independent of the code.
STOP = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "phi4": "<|im_end|>",
        "deepseek-r1": "<｜end▁of▁sentence｜>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>"}
# What each template writes after that stop token, before the next turn.
AFTER_STOP = {"chatml": "\n", "qwen2.5": "\n", "qwen3": "\n", "phi4": "", "deepseek-r1": "", "llama3": "",
              "mistral": "", "gemma": "\n"}
# Where the scripted conversation is not append-only: DeepSeek-R1 strips the reasoning; Mistral writes a space
# before the turn that render puts the prefix right after [/INST]; Qwen3 strips reasoning before the last
# user query and drops the empty think block it writes in the last turn.
REWRITES = {("deepseek-r1", "<think>\n"), ("mistral", "<think>\n"), ("qwen3", ""), ("qwen3", "<think>\n")}
TOOL_TEMPLATES = ("chatml", "qwen2.5", "qwen3", "llama3", "phi4")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def _call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def test_every_shipped_template_has_a_stop_token_here():
    assert set(STOP) == set(available_templates())


@functools.cache
def _tokenizer(family: str, name: str):
    """A tokenizer of `family` that keeps the template's added tokens whole, as the family's real one does."""
    tok = build(family)
    tok.add_special_tokens({"additional_special_tokens": list(SHIPPED_ADDED_TOKENS[name])})
    return tok


def _script(name: str, prefix: str) -> tuple[list[dict], list[tuple[dict, list[dict]]], list | None]:
    """(first messages, [(the model's turn without its effective prefix, the messages that answer it)], tools)."""
    think = "Paris is in France.\n</think>\n\n" if prefix else ""
    if name in TOOL_TEMPLATES and not (name == "llama3" and prefix):  # Llama 3 writes no text beside a call
        content = "" if name == "llama3" else think + "Let me check."
        return ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}], [
            ({"content": content, "tool_calls": [_call("Paris")]}, [{"role": "tool", "content": "18 °C"}]),
            ({"content": think + "It is 18 °C."}, [{"role": "user", "content": "And in Rome?"}]),
            ({"content": "" if name == "llama3" else think, "tool_calls": [_call("Rome")]},
             [{"role": "tool", "content": "24 °C"}]),
            ({"content": think + "It is 24 °C in Rome."}, []),
        ], [WEATHER])
    return ([{"role": "user", "content": "What is 2 + 3?"}], [
        ({"content": think + "5."}, [{"role": "user", "content": "And times 4?"}]),
        ({"content": think + "20."}, [{"role": "user", "content": "Thanks!"}]),
        ({"content": think + "You are welcome."}, []),
    ], None)


def _sampled_text(name, conversation, message, prefix, tools, turn_prefix) -> str:
    """What a model trained on the template writes after its prompt: the template's own rendering of its
    turn through the stop token (or the turn as given, where the template strips it, as DeepSeek-R1 does)."""
    template = load_template(name)
    prompt = render_prompt(conversation, template, prefix, tools=tools).prompt
    full = {**message, "role": "assistant", "content": turn_prefix + message["content"]}
    rendered = template.render([*conversation, full], tools=tools)
    if rendered.startswith(prompt):
        return rendered[len(prompt):rendered.rfind(STOP[name]) + len(STOP[name])]
    return message["content"] + STOP[name]


def _rollout(name: str, family: str, prefix: str):
    """Run the scripted policy; returns the trajectory, each turn's sampled ids, and each bridge's old text."""
    tok = _tokenizer(family, name)
    first, turns, tools = _script(name, prefix)
    builder = TrajectoryBuilder(first, name, tok, prefix=prefix, tools=tools)
    conversation, sampled, checks = list(first), [], []
    for message, answer in turns:
        text = _sampled_text(name, conversation, message, prefix, tools, builder.turn_prefix)
        ids = tok(builder._text + text, add_special_tokens=False)["input_ids"]  # the policy, in context
        assert ids[:len(builder.prompt_ids)] == builder.prompt_ids, "boundary not token-stable"
        sampled.append(ids[len(builder.prompt_ids):])
        conversation.append({**message, "role": "assistant", "content": builder.turn_prefix + message["content"]})
        builder.add_turn(sampled[-1], text, message)
        if answer:
            bridge = builder.add_messages(answer)
            conversation += answer
            checks.append((bridge, builder._text, render_prompt(conversation, name, prefix, tools=tools).prompt))
    return builder.result(), sampled, checks


@pytest.mark.parametrize("prefix", ["", "<think>\n"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", available_templates())
def test_scripted_trajectory_is_token_in_token_out(name, family, prefix):
    traj, sampled, checks = _rollout(name, family, prefix)
    tok = _tokenizer(family, name)
    # ids are the concatenation prompt_ids + sampled_1 + bridge_1 + ..., and exactly the encoding of the text
    prompt_ids = tok(render_prompt(traj.messages[:len(_script(name, prefix)[0])], name, prefix,
                                   tools=_script(name, prefix)[2]).prompt, add_special_tokens=False)["input_ids"]
    pieces = [prompt_ids]
    for i, ids in enumerate(sampled):
        pieces.append(ids)
        if i < len(traj.bridges):
            pieces.append(traj.bridges[i].ids)
    assert traj.ids == [t for piece in pieces for t in piece]
    assert traj.ids == tok(traj.text, add_special_tokens=False)["input_ids"]
    # the mask covers the sampled ids and nothing else
    expected = [0] * len(traj.ids)
    for start, ids in zip(traj.turn_starts, sampled, strict=True):
        assert traj.ids[start:start + len(ids)] == ids
        expected[start:start + len(ids)] = [1] * len(ids)
    assert traj.mask == expected
    # where rendering is append-only, the trajectory is the template's rendering of the conversation
    append_only = True
    assert any(bridge.rewrites for bridge, _, _ in checks) == ((name, prefix) in REWRITES)
    for bridge, text_so_far, rendered in checks:
        append_only = append_only and bridge.rewrites is None
        assert bridge.text.startswith(AFTER_STOP[name])
        assert text_so_far.endswith(bridge.text) and rendered.endswith(bridge.text)
        assert rendered[:len(rendered) - len(bridge.text)].endswith(STOP[name])  # the bridge starts at the stop
        if append_only:
            assert text_so_far == rendered
        else:
            assert text_so_far != rendered
        assert bridge.ids == tok(STOP[name] + bridge.text, add_special_tokens=False)["input_ids"][1:]


@pytest.mark.parametrize("name", ["chatml", "qwen2.5", "qwen3", "llama3", "gemma", "phi4"])
def test_every_turn_opens_with_the_prefix_once(name):
    traj, _, checks = _rollout(name, "qwen", "<think>\n")
    for bridge, _, _ in checks:
        assert bridge.text.endswith("<think>\n") and not bridge.text.endswith("<think>\n<think>\n")
        assert bridge.prefix == "<think>\n"
    assert traj.text.count("<think>\n") == len(traj.turn_starts)


def test_deepseek_r1_bridge_writes_the_templates_own_opener_once_and_names_the_stripped_reasoning():
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr</think>A"}]
    bridge = turn_bridge(history, [{"role": "user", "content": "Q2"}], "deepseek-r1", prefix="<think>\n")
    assert bridge.text == "<｜User｜>Q2<｜Assistant｜><think>\n"
    assert bridge.rewrites is not None and bridge.rewrites.turn == 1 and bridge.rewrites.role == "assistant"
    assert (bridge.rewrites.was, bridge.rewrites.now) == ("<think>\nr</think>", "")


def test_qwen3_rewrite_is_reported_at_a_user_turn_not_at_a_tool_turn():
    think = "<think>\nr\n</think>\n\n"
    history = [{"role": "user", "content": "Q"},
               {"role": "assistant", "content": think + "ok", "tool_calls": [_call("Paris")]}]
    tool = turn_bridge(history, [{"role": "tool", "content": "18"}], "qwen3", tools=[WEATHER])
    assert tool.rewrites is None
    assert tool.text == "\n<|im_start|>user\n<tool_response>\n18\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    user = turn_bridge(history, [{"role": "user", "content": "Q2"}], "qwen3", tools=[WEATHER])
    assert user.rewrites is not None and user.rewrites.turn == 1 and user.rewrites.was == think
    assert user.text == "\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"


def test_consecutive_tool_results_go_into_one_bridge():
    history = [{"role": "user", "content": "Q"},
               {"role": "assistant", "content": "", "tool_calls": [_call("Paris"), _call("Rome")]}]
    bridge = turn_bridge(history, [{"role": "tool", "content": "18"}, {"role": "tool", "content": "24"}], "qwen2.5",
                         tools=[WEATHER])
    assert bridge.text == ("\n<|im_start|>user\n<tool_response>\n18\n</tool_response>\n<tool_response>\n24\n"
                           "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert isinstance(bridge, TurnBridge) and bridge.ids is None and bridge.rewrites is None


def test_sampled_ids_are_kept_as_sampled_never_re_encoded():
    tok = _tokenizer("qwen", "chatml")
    builder = TrajectoryBuilder([{"role": "user", "content": "Hi"}], "chatml", tok)
    # a valid but non-canonical tokenization: one id per character, then the stop token
    odd = [tok.convert_tokens_to_ids(c) for c in "number"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert odd != tok("number<|im_end|>", add_special_tokens=False)["input_ids"]
    start = len(builder.prompt_ids)
    builder.add_turn(odd, "number<|im_end|>", {"content": "number"})
    builder.add_messages([{"role": "user", "content": "Bye"}])
    traj = builder.result()
    assert traj.ids[start:start + len(odd)] == odd
    assert traj.mask[start:start + len(odd)] == [1] * len(odd) and sum(traj.mask) == len(odd)


def test_a_turn_cut_off_before_its_stop_token_cannot_be_bridged():
    tok = _tokenizer("qwen", "chatml")
    builder = TrajectoryBuilder([{"role": "user", "content": "Hi"}], "chatml", tok)
    builder.add_turn(tok("Hello", add_special_tokens=False)["input_ids"], "Hello", {"content": "Hello"})
    with pytest.raises(DataError, match="stop token"):
        builder.add_messages([{"role": "user", "content": "Bye"}])


def test_bad_histories_are_data_errors():
    user = {"role": "user", "content": "Q"}
    with pytest.raises(DataError, match="finished turn"):
        turn_bridge([user], [user], "chatml")
    with pytest.raises(DataError, match="new message"):
        turn_bridge([user, {"role": "assistant", "content": "A"}], [], "chatml")
    with pytest.raises(DataError, match="effective prefix"):
        turn_bridge([user, {"role": "assistant", "content": "A"}], [user], "chatml", prefix="<think>\n")


def test_stop_token_that_is_not_one_token_is_refused():
    tok = build("qwen")  # no <|eot_id|> among its added tokens
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(ConfigError, match="not one token"):
        turn_bridge(history, [{"role": "user", "content": "Q2"}], "llama3", tokenizer=tok)


def test_thinking_history_keep_is_one_sample_and_split_starts_after_each_rewrite():
    traj, _, checks = _rollout("qwen3", "qwen", "<think>\n")
    rewritten = [i for i, (bridge, _, _) in enumerate(checks) if bridge.rewrites is not None]
    assert rewritten == [1]  # the user turn after the second model turn strips the earlier reasoning
    assert split_turns(traj, "keep") == [0]
    assert split_turns(traj, "split") == [0, 2]
    with pytest.raises(ConfigError, match="thinking_history"):
        check_thinking_history("drop")
