"""The multi-turn bridge: what a template writes between the model's stop token and its next turn.

A multi-turn rollout (tool calls, tool results, follow-up user messages) is token-in-token-out:

    ids = prompt_ids + sampled_1 + bridge_1 + sampled_2 + bridge_2 + ...

The sampled ids are kept as the model produced them, never decoded and re-encoded. Each bridge is derived by
rendering, for any template: the template renders the whole conversation, and the bridge is what it writes
after the model's stop token, up to the next assistant turn, plus the part of the prefix the template does not
already write (render's no-doubling rule). So no template family is hand-coded, and the prefix (`<think>\\n`)
opens every assistant turn, not only the first.

Names used here:

- **stop token**: where the model's finished turn ends: the last added token in the template's rendering of
  the conversation that ends with that turn (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`,
  `<｜end▁of▁sentence｜>`). What the template writes after it (the `\\n` after `<|im_end|>`) belongs to the
  bridge: the model stopped before it.
- **old text**: what the model saw and wrote, up to and including its stop token: the prompt of its turn
  (the template's rendering of the history before it, plus the prefix) and its turn.
- **rewrite**: the template renders the whole conversation with other text before the stop token than the
  old text: it rewrote an earlier turn (DeepSeek-R1 strips every turn's reasoning; Qwen3 strips it from turns
  before the last user query). Rendering is *append-only* where no bridge has a rewrite.

A bridge's ids are exact: its text starts right after the stop token, an added token, where a tokenizer cuts
any text before anything else (`tokens` module docstring). So the ids of `stop + text` are the stop
token's id followed by exactly the ids this text has inside the whole conversation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefill_kit.data.formats import message_text
from prefill_kit.errors import ConfigError, DataError, TemplateError
from prefill_kit.prompts.render import _inside_token, render_prompt
from prefill_kit.prompts.tokens import PromptTokenizer
from prefill_kit.templates import ChatTemplate, load_template

THINKING_HISTORY = ("keep", "split")
_SENTINEL = "\x00PREFILL_KIT_TURN\x00"


@dataclass(frozen=True)
class Rewrite:
    """An earlier turn the template renders differently once the conversation goes on: message `turn`
    (0-based, of the whole conversation) of `role`, where the old text had `was` and the template now writes
    `now` (the smallest differing span)."""

    turn: int
    role: str
    was: str
    now: str

    def describe(self) -> str:
        return f"message {self.turn} ({self.role}): the template writes {self.now!r} where the model saw {self.was!r}"


@dataclass(frozen=True)
class TurnBridge:
    """What follows the model's stop token: `text`, its exact `ids` (None without a tokenizer), the earlier
    turn the template rewrote (None where rendering is append-only), and the effective `prefix` the next
    assistant turn starts from (rewards score it with the next completion)."""

    text: str
    ids: list[int] | None
    rewrites: Rewrite | None
    prefix: str = ""


def turn_bridge(history: list[dict[str, Any]], new_messages: list[dict[str, Any]],
                template: ChatTemplate | str | Path, *, prefix: str = "", tokenizer: Any = None,
                template_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None
                ) -> TurnBridge:
    """The text (and ids) that follow the model's finished turn `history[-1]` when `new_messages` (tool
    results, a user message) arrive, up to and including the next assistant opening and prefix.

    `history[-1]["content"]` is the model's whole turn after the assistant opening, the effective prefix
    included (as rewards score it), with its `tool_calls` when it made any. Checked on every call: the
    template renders `history + new_messages` as exactly the old text (module docstring) + `text`, or
    `rewrites` names the turn it changed. `tokenizer` (a tokenizer or a `PromptTokenizer`) adds exact `ids`.
    Raises `DataError` for a malformed history, `TemplateError` where the template's turns have no stop token.
    """
    if not isinstance(template, ChatTemplate):
        template = load_template(template)
    encoder = _encoder(tokenizer)
    return _bridge(history, new_messages, template, prefix, dict(template_kwargs or {}), tools, encoder)[0]


@functools.lru_cache(maxsize=8)
def _cached_encoder(tokenizer: Any) -> PromptTokenizer:
    return PromptTokenizer(tokenizer)


def _encoder(tokenizer: Any) -> PromptTokenizer | None:
    if tokenizer is None or isinstance(tokenizer, PromptTokenizer):
        return tokenizer
    return _cached_encoder(tokenizer)


def _atomic(template: ChatTemplate, encoder: PromptTokenizer | None) -> tuple[str, ...]:
    if encoder is None:
        return template.atomic_tokens
    added = getattr(encoder.tokenizer, "added_tokens_decoder", None) or {}
    return tuple(dict.fromkeys((*template.atomic_tokens, *(str(getattr(t, "content", t)) for t in added.values()))))


def last_added_token(text: str, atomic: tuple[str, ...]) -> tuple[int, str] | None:
    """The end position and text of the added token that ends last in `text` (the longest at a tie)."""
    best = None
    for token in atomic:
        start = text.rfind(token) if token else -1
        if start >= 0 and (best is None or (start + len(token), len(token)) > (best[0], len(best[1]))):
            best = (start + len(token), token)
    return best


def _stop(rendered: str, atomic: tuple[str, ...], template: ChatTemplate) -> tuple[int, str]:
    found = last_added_token(rendered, atomic)
    if found is None:
        raise TemplateError(f"template {template.name}: cannot tell where an assistant turn ends: its rendering "
                            "holds no added token to stop at (give the tokenizer, whose added tokens include the "
                            "stop token)")
    return found


def _check_history(history: list[dict[str, Any]], new_messages: list[dict[str, Any]]) -> None:
    if not history or not isinstance(history[-1], dict) or history[-1].get("role") != "assistant":
        raise DataError("expected the conversation so far to end with the model's finished turn (an assistant "
                        "message)", field="history")
    if not new_messages:
        raise DataError("expected at least one new message (tool results or a user message) to bridge to",
                        field="new_messages")
    for i, message in enumerate(new_messages):
        if not isinstance(message, dict) or message.get("role") == "assistant":
            raise DataError("expected tool or user messages: the next assistant turn is the model's to write",
                            field=f"new_messages[{i}]")


def _bridge(history, new_messages, template, prefix, kwargs, tools, encoder, model_turn=None, prompt=None):
    """(TurnBridge, old text, stop token, the whole conversation's RenderedPrompt). `model_turn`: what the model
    sampled after its prompt (through its stop token), when known; else the template's rendering of
    `history[-1]` stands for it. `prompt`: `history[:-1]` rendered (the previous call's whole rendering).

    With `model_turn`, where the whole rendering begins with the old text, which ends with an added token, the
    bridge is the rest: one render. Otherwise the history is rendered too, to find the stop token and the rewrite.
    """
    _check_history(history, new_messages)
    atomic = _atomic(template, encoder)
    conversation = [*history, *new_messages]
    if prompt is None:
        prompt = render_prompt(history[:-1], template, prefix, template_kwargs=kwargs, tools=tools)
    if model_turn is not None:
        old = prompt.prompt + model_turn
        found = last_added_token(model_turn, atomic)
        whole = render_prompt(conversation, template, prefix, template_kwargs=kwargs, tools=tools)
        if found is not None and found[0] == len(model_turn) and whole.prompt.startswith(old):
            text = whole.prompt[len(old):]
            ids = _bridge_ids(encoder, found[1], text) if encoder is not None else None
            return TurnBridge(text, ids, None, whole.prefix), old, found[1], whole
    content = message_text(history[-1].get("content"))
    if not content.startswith(prompt.prefix):
        raise DataError(f"the model's turn must start with its prompt's effective prefix {prompt.prefix!r} (the "
                        f"content is the whole turn after the assistant opening), got {content[:40]!r}",
                        field=f"history[{len(history) - 1}].content")
    rendered = template.render(history, tools=tools, **kwargs)
    stop_end, stop = _stop(rendered, atomic, template)
    if model_turn is not None:
        old = prompt.prompt + model_turn
    elif rendered.startswith(prompt.prompt):
        old = rendered[:stop_end]
    else:  # the template writes this very turn otherwise than it continues its own prompt (it strips reasoning)
        old = prompt.prompt + content[len(prompt.prefix):] + _turn_end(history, template, kwargs, tools, atomic,
                                                                       rendered[:stop_end])
    whole = render_prompt(conversation, template, prefix, template_kwargs=kwargs, tools=tools)
    end = _nth_end(whole.prompt, stop, rendered[:stop_end].count(stop), template)
    text = whole.prompt[end:]
    rewrite = None
    if whole.prompt[:end] != old:
        rewrite = _rewrite(old, whole.prompt[:end], conversation, len(history) - 1, len(prompt.prompt),
                           template, kwargs, tools, atomic)
    ids = _bridge_ids(encoder, stop, text) if encoder is not None else None
    return TurnBridge(text, ids, rewrite, whole.prefix), old, stop, whole


def _turn_end(history, template, kwargs, tools, atomic, rendered: str) -> str:
    """What the template writes after the final assistant message's content, through its stop token: its tool
    calls and the stop token (found with a sentinel after the content). A template that does not write the
    content at all (Llama 3's tool-call turns) writes its whole turn after it: what follows its assistant
    opening in `rendered`, the history's rendering through the stop token."""
    last = history[-1]
    marked = template.render([*history[:-1], {**last, "content": message_text(last.get("content")) + _SENTINEL}],
                             tools=tools, **kwargs)
    cut = marked.rfind(_SENTINEL)
    found = last_added_token(marked[cut + len(_SENTINEL):], atomic) if cut >= 0 else None
    if found is not None:
        return marked[cut + len(_SENTINEL):][:found[0]]
    opening = template.render(history[:-1], add_generation_prompt=True, tools=tools, **kwargs)
    return rendered[_common_prefix(opening, rendered):]


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _nth_end(text: str, token: str, n: int, template: ChatTemplate) -> int:
    end = 0
    for _ in range(n):
        start = text.find(token, end)
        if start < 0:
            raise TemplateError(f"template {template.name}: the model's turn and its stop token {token!r} are not "
                                "in the rendering of the whole conversation")
        end = start + len(token)
    return end


def _rewrite(old: str, new: str, messages, model_turn: int, prompt_end: int, template, kwargs, tools,
             atomic) -> Rewrite:
    """The smallest span where `new` differs from `old` (never cutting an added token), and its message: the
    model's own turn where the difference lies after its prompt, else the first message whose rendering, as
    the conversation's last, is no beginning of `new`."""
    d = _common_prefix(old, new)
    while d and (_inside_token(old, d, atomic) or _inside_token(new, d, atomic)):
        d -= 1
    s = 0
    while s < min(len(old), len(new)) - d and old[len(old) - 1 - s] == new[len(new) - 1 - s]:
        s += 1
    while s and (_inside_token(old, len(old) - s, atomic) or _inside_token(new, len(new) - s, atomic)):
        s -= 1
    turn = model_turn
    if d < prompt_end:
        turn = next((i for i in range(model_turn) if not new.startswith(
            template.render(messages[:i + 1], tools=tools, **kwargs)[:d + 1])), model_turn)
    return Rewrite(turn, str(messages[turn].get("role")), old[d:len(old) - s], new[d:len(new) - s])


@functools.lru_cache(maxsize=64)
def _stop_id(encoder: PromptTokenizer, stop: str) -> int:
    ids = encoder.encode([stop])[0]
    if len(ids) != 1:
        raise ConfigError(f"the stop token {stop!r} is not one token of this tokenizer (it encodes as {ids}): a "
                          "bridge's ids are exact only after an added token")
    return ids[0]


def _bridge_ids(encoder: PromptTokenizer, stop: str, text: str) -> list[int]:
    """Exact ids of `text` after the stop token (module docstring): those of `stop + text`, less the stop's id.

    Memoised: the bridges of a rollout recur in shape (every tool turn of a calculator writes the same closing,
    tool header and opening), and their ids are a pure function of the key (`encoder`, `stop`, `text`). The encoder
    is fixed once made (`PromptTokenizer` snapshots the tokenizer's added tokens and backend), so a hit is the very
    list a miss would compute; the bridge's text itself is still derived and checked by rendering on every call.
    """
    key = (encoder, stop, text)
    ids = _BRIDGE_IDS.get(key)
    if ids is None:
        stop_id = _stop_id(encoder, stop)
        whole = encoder.encode([stop + text])[0]
        if whole[:1] != [stop_id]:
            raise ConfigError(f"the stop token {stop!r} does not stay one token before the bridge {text[:20]!r}")
        ids = tuple(whole[1:])
        if len(_BRIDGE_IDS) >= BRIDGE_MEMO_LIMIT:
            _BRIDGE_IDS.clear()
        _BRIDGE_IDS[key] = ids
    return list(ids)


BRIDGE_MEMO_LIMIT = 4096  # distinct (encoder, stop, bridge text) kept; a workload has a few shapes per template
_BRIDGE_IDS: dict[tuple[PromptTokenizer, str, str], tuple[int, ...]] = {}


# --- trajectories -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trajectory:
    """One multi-turn rollout, token-in-token-out: `ids` = prompt ids + sampled + bridge + sampled + ...;
    `mask` is 1 exactly on sampled ids (the loss covers them only); `text` the same sequence as text;
    `messages` the conversation (assistant contents with their effective prefix); `bridges` in order;
    `turn_starts` where each sampled turn starts in `ids`; `prefix` the first turn's effective prefix;
    `turn_prompts` the template's own rendering of the conversation before each sampled turn (its prompt, with the
    turn's prefix), which differs from `text` there only where a bridge rewrote history."""

    ids: list[int]
    mask: list[int]
    text: str
    messages: list[dict[str, Any]]
    bridges: list[TurnBridge]
    turn_starts: list[int]
    prefix: str
    turn_prompts: list[str] = field(default_factory=list)


@dataclass
class TrajectoryBuilder:
    """Builds a `Trajectory` turn by turn: `add_turn` what the model sampled, `add_messages` what came back.

    Nothing sampled is decoded or re-encoded: the sampled ids go in as the policy produced them; its text is
    kept for the record and for the check that the parsed message renders as what the model wrote.
    """

    messages: list[dict[str, Any]]
    template: ChatTemplate | str | Path
    tokenizer: Any
    prefix: str = ""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, ChatTemplate):
            self.template = load_template(self.template)
        if not self.messages or self.messages[-1].get("role") == "assistant":
            raise DataError("a rollout starts from a conversation that ends with a user or tool message",
                            field="messages")
        self._encoder = _encoder(self.tokenizer)
        rendered = render_prompt(self.messages, self.template, self.prefix, template_kwargs=self.template_kwargs,
                                 tools=self.tools)
        self._conversation = list(self.messages)
        self._ids = self._encoder.encode([rendered.prompt])[0]
        self._mask = [0] * len(self._ids)
        self._text = rendered.prompt
        self._first_prefix = self._turn_prefix = rendered.prefix
        self._bridges: list[TurnBridge] = []
        self._turn_starts: list[int] = []
        self._sampled: str | None = None
        self._rendered = rendered  # the conversation before the model's current turn, rendered
        self._turn_prompts: list[str] = []

    @property
    def prompt_ids(self) -> list[int]:
        """The ids the model continues from now (the whole trajectory so far)."""
        return list(self._ids)

    @property
    def turn_prefix(self) -> str:
        """The effective prefix of the turn the model writes next."""
        return self._turn_prefix

    def add_turn(self, ids: list[int], text: str, message: dict[str, Any]) -> None:
        """The model's turn: the `ids` it sampled (through its stop token), their `text` as the policy returned
        it, and the assistant `message` parsed from it (content without the effective prefix, which the model
        did not sample; `tool_calls` when it made any)."""
        if self._sampled is not None:
            raise DataError("the model's turn came twice without new messages between", field="message")
        content = message_text(message.get("content")) if message.get("content") is not None else ""
        self._conversation.append({**message, "role": "assistant", "content": self._turn_prefix + content})
        self._turn_starts.append(len(self._ids))
        self._turn_prompts.append(self._rendered.prompt)
        self._ids += ids
        self._mask += [1] * len(ids)
        self._text += text
        self._sampled = text

    def add_messages(self, new_messages: list[dict[str, Any]], *, limit: int | None = None) -> TurnBridge | None:
        """Tool results or a user message after the model's turn: appends the bridge and returns it. With `limit`,
        a bridge that would make the trajectory longer than `limit` ids is not appended (None): the rollout ends."""
        if self._sampled is None:
            raise DataError("new messages need a finished model turn before them", field="new_messages")
        bridge, _, stop, rendered = _bridge(
            self._conversation, new_messages, self.template, self.prefix, self.template_kwargs, self.tools,
            self._encoder, model_turn=self._sampled, prompt=self._rendered)
        if not self._sampled.endswith(stop) or self._ids[-1] != _stop_id(self._encoder, stop):
            raise DataError("the model's turn did not end with its stop token (it was cut off): the rollout ends "
                            "there", field="ids")
        if limit is not None and len(self._ids) + len(bridge.ids) > limit:
            return None
        self._rendered = rendered
        self._conversation += new_messages
        self._ids += bridge.ids
        self._mask += [0] * len(bridge.ids)
        self._text += bridge.text
        self._bridges.append(bridge)
        self._turn_prefix = bridge.prefix
        self._sampled = None
        return bridge

    def result(self) -> Trajectory:
        return Trajectory(list(self._ids), list(self._mask), self._text, list(self._conversation),
                          list(self._bridges), list(self._turn_starts), self._first_prefix, list(self._turn_prompts))


# --- templates that rewrite history -------------------------------------------------------------------------


def check_thinking_history(value: str) -> str:
    """`rollout.thinking_history`: `keep` (one sample per trajectory) or `split` (a new sample from each rewrite)."""
    if value not in THINKING_HISTORY:
        raise ConfigError(f"rollout.thinking_history: expected one of {', '.join(THINKING_HISTORY)}, got {value!r}")
    return value


def split_turns(trajectory: Trajectory, thinking_history: str = "keep") -> list[int]:
    """The sampled turns (0-based) that start a sample: 0, and with `split` every turn after a bridge whose
    rendering rewrote an earlier turn (there the template shows the model other text than the trajectory)."""
    check_thinking_history(thinking_history)
    if thinking_history == "keep":
        return [0]
    return [0, *(i + 1 for i, bridge in enumerate(trajectory.bridges) if bridge.rewrites is not None)]
