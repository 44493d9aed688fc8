"""Whole multi-turn rollouts through `run_rollouts`, on every shipped template x every tokenizer family (issue 17).

A scripted policy writes what a model trained on the template writes: the template's own rendering of its turn,
encoded in context (one turn respelled in ids no tokenizer would choose). Two rollouts are sampled together; with a
template that renders tool calls, rollout A makes two calls in one turn (two tool messages in one bridge), then one,
then answers; then a user turn follows. Templates without tool support get user turns only. Checked on every
rollout: ids are `prompt_ids + sampled_1 + bridge_1 + ...` with the sampled ids as sampled, each bridge's ids are its
whole encoding after the stop token, the text is the template's rendering of the conversation where rendering is
append-only (elsewhere the rewrite names the turn the template changed), the mask is 1 exactly on sampled ids, and
every assistant turn opens with the prefix once.
"""

from __future__ import annotations

import functools

import pytest

from prefill_kit.grpo.multiturn import run_rollouts, turn_text
from prefill_kit.grpo.tools import load_tools, parse_turn
from prefill_kit.prompts.render import render_prompt
from prefill_kit.prompts.turns import TrajectoryBuilder
from prefill_kit.templates import SHIPPED_ADDED_TOKENS, available_templates, load_template
from tests.tokenizer_families import FAMILIES, build

# Each family's documented end-of-turn token (where its model stops).
STOP = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "phi4": "<|im_end|>",
        "deepseek-r1": "<｜end▁of▁sentence｜>", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>"}
# Templates that write a model's tool calls into its turn (ChatML and Phi-4 drop them, the others have no tools),
# and the families whose tiny vocabularies can write a call's JSON (the SentencePiece-style ones hold no '"', '_'
# or byte-fallback pieces): the other pairs get user turns only.
TOOL_TEMPLATES = ("qwen2.5", "qwen3", "llama3")
TOOL_FAMILIES = ("gpt2", "qwen", "llama3")
# Llama 3.1's response format, as transformers' new-style `response_template` (TRL ships the same): its calls are
# bare JSON, which only the tokenizer's own parser reads.
LLAMA3_RESPONSE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "fields": {
        "tool_calls": {"open_pattern": r'\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*',
                       "close_pattern": r"\}<\|eot_id\|>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
        "content": {"close_pattern": r"<\|eot_id\|>\s*", "content": "text"},
    },
}
# Where rendering is not append-only, worked out from each template's source: (template, prefix, tools) -> for
# rollout A and B, {bridge index: the message index the rewrite names}. DeepSeek-R1 strips the reasoning of the turn
# before each user message; Mistral writes a space before an assistant turn where the prompt had the prefix right
# after [/INST]; Qwen3 strips the reasoning of turns before the last user message (only the bridge bringing a user
# message rewrites, naming turn 1). Without a prefix, Qwen3 writes the empty think block `<think>\n\n</think>\n\n`
# only on the conversation's last assistant turn (reference qwen3.jinja, line 44: `{%- if loop.last or (not
# loop.last and reasoning_content) %}`), and the model, prompted without one, writes it: so every bridge drops it
# from the turn just sampled, whichever message follows, and names that turn.
REWRITES = {("deepseek-r1", "<think>\n", False): ({0: 1, 1: 3}, {0: 1}),
            ("mistral", "<think>\n", False): ({0: 1, 1: 3}, {0: 1}),
            ("qwen3", "", True): ({0: 1, 1: 4, 2: 6}, {0: 1, 1: 3}), ("qwen3", "<think>\n", True): ({2: 1}, {1: 1})}
# The SentencePiece-style families run only on the templates that stay append-only with them: their tiny
# vocabularies cannot write a tool call, and where a Metaspace pre-tokenizer prepends its space to every piece the
# in-context text of a turn is not the template's (left for a separate check, see the report of issue 17).
SP_TEMPLATES = ("chatml", "gemma", "mistral", "qwen2.5")


# How a rewrite changes the turn it names, where each rewrite of a case changes it the same way (Qwen3 without a
# prefix: the empty think block goes).
REWRITTEN = {("qwen3", "", True): ("<think>\n\n</think>\n\n", "")}


def _expected_rewrites(name: str, prefix: str, tools: bool, rollout: int) -> dict[int, int]:
    return REWRITES.get((name, prefix, tools), ({}, {}))[rollout]


# Lowercase ASCII: the tiny SentencePiece-style vocabularies hold no capitals but a few, nor byte-fallback pieces.
WEATHER = {"paris": "18 c", "rome": "24 c", "berlin": "11 c", "oslo": "3 c"}


def weather(city: str) -> str:
    """Current weather in a city.

    Args:
        city: The city.
    """
    return WEATHER[city]


def _call(city: str) -> dict:
    return {"type": "function", "function": {"name": "weather", "arguments": {"city": city}}}


def _scripts(name: str, prefix: str, tools: bool) -> dict[str, list[dict]]:
    """First user message -> the model's turns (content after the effective prefix, tool calls), in order. The
    turns after a rollout's last tool-call turn are answered by user messages (`USER_TURNS`)."""
    think = "it is in france.\n</think>\n\n" if prefix else ""
    if tools:
        text = (lambda t: "") if name == "llama3" else (lambda t: think + t)  # Llama 3 writes a call alone
        two = [_call("paris")] if name == "llama3" else [_call("paris"), _call("rome")]  # Llama 3: one per turn
        return {"weather in paris and rome?": [{"content": text("let me check."), "tool_calls": two},
                                               {"content": text("now berlin."), "tool_calls": [_call("berlin")]},
                                               {"content": think + "18 and 24 and 11 c."},
                                               {"content": think + "the same i think."}],
                "weather in oslo?": [{"content": text("checking."), "tool_calls": [_call("oslo")]},
                                     {"content": think + "it is 3 c."}, {"content": think + "yes."}]}
    return {"what is 2 + 3?": [{"content": think + "5."}, {"content": think + "20."}, {"content": think + "bye."}],
            "what is 7 * 6?": [{"content": think + "42."}, {"content": think + "sure."}]}


USER_TURNS = ["and tomorrow?", "thanks!"]


@functools.cache
def _tokenizer(family: str, name: str):
    """A tokenizer of `family` keeping the template's added tokens whole, as the family's real one does; Llama 3's
    parses its responses."""
    tok = build(family)
    tok.add_special_tokens({"additional_special_tokens": list(SHIPPED_ADDED_TOKENS[name])})
    if name == "llama3":
        tok.response_template = LLAMA3_RESPONSE
    return tok


def _with_tools(name: str, family: str, prefix: str) -> bool:
    return name in TOOL_TEMPLATES and family in TOOL_FAMILIES and not (name == "llama3" and prefix)


@functools.cache
def _tools():
    return load_tools(["tests.test_rollout_matrix:weather"], None)


def _respell(tok, ids: list[int]) -> list[int]:
    """The same text in other ids: the first token that splits into two vocabulary tokens, split (a valid
    tokenization the tokenizer itself would never produce); `ids` unchanged where none does."""
    vocab, special = tok.get_vocab(), set(tok.all_special_ids)
    for k, token_id in enumerate(ids):
        piece = tok.convert_ids_to_tokens(token_id)
        if token_id in special or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if a is not None and b is not None:
                new = [*ids[:k], a, b, *ids[k + 1:]]
                if tok.decode(new, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False):
                    return new
    return ids


class Policy:
    """The scripted sampler: for the live rollouts (found by their prompt ids), each writes its next scripted turn
    as the template renders it, in context. Records what it sampled and, before each turn after the first, the
    template's own rendering of the conversation so far beside the trajectory's text."""

    def __init__(self, name: str, prefix: str, builders: dict[str, TrajectoryBuilder], scripts, tools):
        self.name, self.prefix, self.tools = name, prefix, tools
        self.template = load_template(name)
        self.builders, self.scripts = builders, scripts
        self.tok = builders[next(iter(builders))].tokenizer
        self.sampled: dict[str, list[list[int]]] = {key: [] for key in builders}
        self.checks: dict[str, list[tuple[str, str]]] = {key: [] for key in builders}

    def __call__(self, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        out = []
        for prompt in prompts:
            key = next(k for k, b in self.builders.items() if b.prompt_ids == prompt and not self._done(k))
            out.append(self.turn(key) + [self.tok.pad_token_id or 0] * 2)  # batched generation pads after the stop
        return out

    def _done(self, key: str) -> bool:
        return len(self.sampled[key]) >= len(self.scripts[key])

    def turn(self, key: str) -> list[int]:
        builder, k = self.builders[key], len(self.sampled[key])
        traj = builder.result()
        rendered_prompt = render_prompt(traj.messages, self.template, self.prefix, tools=self.tools).prompt
        if k:
            self.checks[key].append((traj.text, rendered_prompt))
        message = self.scripts[key][k]
        full = {**message, "role": "assistant", "content": builder.turn_prefix + message["content"]}
        rendered = self.template.render([*traj.messages, full], tools=self.tools)
        stop = STOP[self.name]
        # The template's own rendering of the turn, through its stop token: after the trajectory where the template
        # continues it, else after the template's own prompt (it rewrote an earlier turn: Qwen3 drops the empty think
        # block of a turn a tool message follows); where it writes this very turn otherwise than it continues its
        # prompt (DeepSeek-R1 strips the turn's reasoning), the turn as given, which then has no tool calls.
        if rendered.startswith(traj.text):
            text = rendered[len(traj.text):rendered.index(stop, len(traj.text)) + len(stop)]
        elif rendered.startswith(rendered_prompt):
            text = rendered[len(rendered_prompt):rendered.index(stop, len(rendered_prompt)) + len(stop)]
        else:
            assert not message.get("tool_calls"), "a tool call must be written as the template writes it"
            text = message["content"] + stop
        before = self.tok(traj.text, add_special_tokens=False)["input_ids"]  # canonical (turn 1 may be respelled)
        whole = self.tok(traj.text + text, add_special_tokens=False)["input_ids"]
        assert whole[:len(before)] == before, "the scripted turn must not merge into the prompt's last token"
        ids = whole[len(before):]
        if key == next(iter(self.builders)) and k == 0:
            ids = _respell(self.tok, ids)
        self.sampled[key].append(ids)
        return ids


def _rollouts(name: str, family: str, prefix: str):
    tok = _tokenizer(family, name)
    tools = _tools().schemas if _with_tools(name, family, prefix) else None
    scripts = _scripts(name, prefix, tools is not None)
    builders = {q: TrajectoryBuilder([{"role": "user", "content": q}], name, tok, prefix=prefix, tools=tools)
                for q in scripts}
    policy = Policy(name, prefix, builders, scripts, tools)
    stop_id = tok.convert_tokens_to_ids(STOP[name])
    table = _tools().tool_table()
    results = run_rollouts(list(builders.values()), policy, tokenizer=tok, eos_ids=[stop_id],
                           tables=[table] * len(builders), schemas=[tools] * len(builders), max_turns=8,
                           max_completion_length=2000, tool_timeout=10)
    for result, (key, builder) in zip(results, builders.items(), strict=True):
        assert not result.truncated
        for user in USER_TURNS:  # the rest of the script answers user messages, as a chat front end would
            if policy._done(key):
                break
            builder.add_messages([{"role": "user", "content": user}])
            ids = policy.turn(key)
            message, _ = parse_turn(tok, ids, tools, prompt_ids=builder.prompt_ids, turn_prefix=builder.turn_prefix)
            builder.add_turn(ids, turn_text(tok, builder.prompt_ids[-1], ids), message)
        assert policy._done(key), key
    return {key: b.result() for key, b in builders.items()}, results, policy


CASES = [(name, family) for name in available_templates() for family in FAMILIES
         if family in TOOL_FAMILIES or name in SP_TEMPLATES]


@pytest.mark.parametrize(("name", "family", "prefix"), [(n, f, p) for n, f in CASES for p in ("", "<think>\n")])
def test_whole_rollouts_are_exact(name, family, prefix):
    trajectories, results, policy = _rollouts(name, family, prefix)
    tok, stop = _tokenizer(family, name), STOP[name]
    tools = _tools().schemas if _with_tools(name, family, prefix) else None
    for key, traj in trajectories.items():
        sampled = policy.sampled[key]
        # ids: prompt_ids + sampled_1 + bridge_1 + ..., the sampled ids exactly as the policy wrote them
        prompt = render_prompt([{"role": "user", "content": key}], name, prefix, tools=tools).prompt
        pieces = [tok(prompt, add_special_tokens=False)["input_ids"]]
        for k, ids in enumerate(sampled):
            pieces.append(ids)
            if k < len(traj.bridges):
                pieces.append(traj.bridges[k].ids)
        assert traj.ids == [t for piece in pieces for t in piece]
        assert [traj.ids[s:s + len(ids)] for s, ids in zip(traj.turn_starts, sampled, strict=True)] == sampled
        # each bridge: its text starts right after the stop token, its ids are that text's whole encoding there
        for bridge in traj.bridges:
            assert bridge.ids == tok(stop + bridge.text, add_special_tokens=False)["input_ids"][1:]
        # the mask: 1 exactly on sampled ids
        expected = [0] * len(traj.ids)
        for start, ids in zip(traj.turn_starts, sampled, strict=True):
            expected[start:start + len(ids)] = [1] * len(ids)
        assert traj.mask == expected
        # the text: the template's rendering of the conversation before each turn while rendering is append-only;
        # from a rewrite on, other text, and the rewrite names the turn the template changed
        rewrites = {k: b.rewrites.turn for k, b in enumerate(traj.bridges) if b.rewrites is not None}
        if (name, prefix, tools is not None) in REWRITTEN:
            assert {(b.rewrites.role, b.rewrites.was, b.rewrites.now) for b in traj.bridges if b.rewrites} == {
                ("assistant", *REWRITTEN[name, prefix, tools is not None])}
        assert rewrites == _expected_rewrites(name, prefix, tools is not None, list(trajectories).index(key)), key
        for k, (text, rendered) in enumerate(policy.checks[key]):
            assert (text == rendered) == all(j not in rewrites for j in range(k + 1)), (k, text, rendered)
            assert text.endswith(traj.bridges[k].text) and rendered.endswith(traj.bridges[k].text)
        # the prefix opens every assistant turn once
        if prefix:
            assert all(m["content"].startswith(prefix) for m in traj.messages if m["role"] == "assistant")
            assert traj.text.count(prefix) == len(sampled)
    # tool turns: two calls in one turn come back as two tool messages in one bridge
    if tools is not None:
        first = results[0]
        roles = [m["role"] for m in first.completion]
        two = 1 if name == "llama3" else 2
        assert roles == ["assistant", *["tool"] * two, "assistant", "tool", "assistant"]
        assert (first.tool_calls, first.tool_failures) == (two + 1, 0)
        assert [m["content"] for m in first.completion if m["role"] == "tool"] == (
            ["18 c", "24 c", "11 c"] if two == 2 else ["18 c", "11 c"])


# --- the tokenizer's own response parser, the bridge-ids memo, the in-context turn text ---------------------------


def test_a_tokenizer_with_a_response_template_parses_its_own_turns_given_the_prompt():
    from prefill_kit.grpo.tools import ToolCall, has_response_parser

    tok = _tokenizer("llama3", "llama3")
    plain = build("llama3")
    assert has_response_parser(tok) and not has_response_parser(plain)
    prompt = tok("<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                 "\n\n", add_special_tokens=False)["input_ids"]
    ids = tok('{"name": "weather", "parameters": {"city": "oslo"}}<|eot_id|>', add_special_tokens=False)["input_ids"]
    message, calls = parse_turn(tok, ids, _tools().schemas, prompt_ids=prompt)
    assert calls == [ToolCall("weather", {"city": "oslo"})]
    assert message == {"role": "assistant", "content": "", "tool_calls": [_call("oslo")]}
    # Hermes cannot read Llama 3's bare JSON: without the tokenizer's parser the turn is plain text
    assert parse_turn(plain, ids)[1] == []


def test_a_bridge_from_the_memo_is_the_bridge_computed_afresh():
    from prefill_kit.prompts import turns

    history = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "a", "tool_calls": [_call("oslo")]}]
    new = [{"role": "tool", "content": "3 c"}]
    made = {}
    for family in ("qwen", "gpt2"):  # same text, two tokenizers: the memo must tell them apart
        tok = _tokenizer(family, "qwen2.5")
        turns._BRIDGE_IDS.clear()
        miss = turns.turn_bridge(history, new, "qwen2.5", tokenizer=tok, tools=_tools().schemas)
        hit = turns.turn_bridge(history, new, "qwen2.5", tokenizer=tok, tools=_tools().schemas)
        assert (hit.text, hit.ids) == (miss.text, miss.ids)
        assert miss.ids == tok("<|im_end|>" + miss.text, add_special_tokens=False)["input_ids"][1:]
        made[family] = miss
    turns._BRIDGE_IDS.clear()
    for family in ("qwen", "gpt2"):  # both through one memo
        again = turns.turn_bridge(history, new, "qwen2.5", tokenizer=_tokenizer(family, "qwen2.5"),
                                  tools=_tools().schemas)
        assert again.ids == made[family].ids
    assert made["qwen"].ids != made["gpt2"].ids


def test_a_turn_is_decoded_where_it_stands_not_alone():
    tok = _tokenizer("metaspace-first", "mistral")
    prompt = tok("[INST] q [/INST]", add_special_tokens=False)["input_ids"]
    whole = tok("[INST] q [/INST] 5.</s>", add_special_tokens=False)["input_ids"]
    ids = whole[len(prompt):]
    assert whole[:len(prompt)] == prompt
    assert tok.decode(ids, skip_special_tokens=False) == "5.</s>"  # alone, the space is lost
    assert turn_text(tok, prompt[-1], ids) == " 5.</s>"


def test_a_turn_after_an_added_token_reads_as_the_tokenizer_encodes_it():
    """Legacy SentencePiece: the normalizer prepends `▁` to the segment after `[/INST]`, so the template's ` 5.`
    there is `▁ ▁5 .`; in context the decoder reads `  5.` (two spaces, which encode otherwise), alone ` 5.`."""
    tok = _tokenizer("sentencepiece-legacy", "mistral")
    prompt = tok("[INST] q[/INST]", add_special_tokens=False)["input_ids"]
    whole = tok("[INST] q[/INST] 5.</s>", add_special_tokens=False)["input_ids"]
    ids = whole[len(prompt):]
    assert whole[:len(prompt)] == prompt
    assert tok.decode([prompt[-1], *ids], skip_special_tokens=False) == "[/INST]  5.</s>"
    assert turn_text(tok, prompt[-1], ids) == " 5.</s>"


def test_the_parsed_content_leaves_out_the_prefix_the_prompt_wrote():
    """transformers' response parser reads from the assistant opening on, the prompt's `<think>\n` included; the
    message content is what the model sampled (the trajectory adds the prefix back once)."""
    tok = _tokenizer("llama3", "llama3")
    prompt = tok("<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                 "\n\n<think>\n", add_special_tokens=False)["input_ids"]
    ids = tok("so.\n</think>\n\n5.<|eot_id|>", add_special_tokens=False)["input_ids"]
    message, calls = parse_turn(tok, ids, None, prompt_ids=prompt, turn_prefix="<think>\n")
    assert (message["content"], calls) == ("so.\n</think>\n\n5.", [])
