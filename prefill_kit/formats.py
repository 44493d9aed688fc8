"""Turn a data row of any common chat-data shape into OpenAI-style messages.

Each format names the columns that hold the conversation; those are *consumed* (they become the
prompt), every other column passes through to the output unchanged. A reference answer found in
the conversation (a response, an Alpaca output, a trailing assistant turn) goes to `solution`,
kept whole: rewards extract the final answer themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prefill_kit.errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function": "tool", "observation": "tool"}


@dataclass(frozen=True)
class Conversation:
    """A row's messages, the columns they came from, and the reference answer when the row had one."""

    messages: list[dict[str, Any]]
    consumed: frozenset[str]
    reference: str | None = None


def _text(row: dict, key: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=key)
    if required and not value.strip():
        raise DataError("empty text", field=key)
    return value


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    system = _text(row, "system", required=False)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _from_messages(row: dict) -> Conversation:
    return Conversation(validate_messages(row.get("messages"), "messages"), frozenset({"messages"}))


def _from_sharegpt(row: dict) -> Conversation:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("missing or empty conversation", field="conversations")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"expected an object with 'from' and 'value', got {type(turn).__name__}",
                            field=f"conversations[{i}]")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"unknown role {turn.get('from')!r}; expected one of {sorted(SHAREGPT_ROLES)}",
                            field=f"conversations[{i}].from")
        messages.append({"role": role, "content": turn.get("value")})
    messages = validate_messages(_with_system(row, messages), "conversations")
    return Conversation(messages, frozenset({"conversations", "system"}))


def _from_alpaca(row: dict) -> Conversation:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    reference = _text(row, "output", required=False)
    messages = _with_system(row, [{"role": "user", "content": user}])
    return Conversation(messages, frozenset({"instruction", "input", "output", "system"}), reference)


def _from_query(row: dict) -> Conversation:
    query = _text(row, "query")
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError("expected a list of [query, response] pairs", field="history")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DataError("expected a [query, response] pair of strings", field=f"history[{i}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages = _with_system(row, [*messages, {"role": "user", "content": query}])
    reference = _text(row, "response", required=False)
    return Conversation(messages, frozenset({"query", "response", "history", "system"}), reference)


def _from_prompt(row: dict) -> Conversation:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return Conversation(validate_messages(prompt, "prompt"), frozenset({"prompt"}))
    _text(row, "prompt")
    return Conversation(_with_system(row, [{"role": "user", "content": prompt}]), frozenset({"prompt", "system"}))


def _from_problem(row: dict) -> Conversation:
    key = "problem" if "problem" in row else "question"
    messages = _with_system(row, [{"role": "user", "content": _text(row, key)}])
    reference = None
    if "solution" not in row:
        reference = _text(row, "answer", required=False) if "answer" in row else None
    return Conversation(messages, frozenset({key, "system"}), reference)


# Detection order: the first format whose key column is present wins.
FORMATS = {
    "messages": (("messages",), _from_messages),
    "sharegpt": (("conversations",), _from_sharegpt),
    "prompt": (("prompt",), _from_prompt),
    "query": (("query",), _from_query),
    "alpaca": (("instruction",), _from_alpaca),
    "problem": (("problem", "question"), _from_problem),
}


def detect_format(columns: Iterable[str]) -> str:
    """The format whose key column is among `columns`; DataError naming what was seen otherwise."""
    seen = set(columns)
    for name, (keys, _) in FORMATS.items():
        if seen & set(keys):
            return name
    known = ", ".join(f"{n} ({'/'.join(k)})" for n, (k, _) in FORMATS.items())
    raise DataError(f"cannot detect the data format from columns {sorted(seen)}; known formats (key column): "
                    f"{known}. Use --format, or --columns to rename")


def to_conversation(row: dict[str, Any], fmt: str) -> Conversation:
    """Convert one row of format `fmt` (see FORMATS); raises DataError naming the field."""
    try:
        return FORMATS[fmt][1](row)
    except KeyError:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


def validate_messages(messages: Any, field: str) -> list[dict[str, Any]]:
    """Check OpenAI-style messages: a non-empty list of {role, content}; content a string or typed parts."""
    if not isinstance(messages, list) or not messages:
        raise DataError("missing or empty conversation", field=field)
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"expected an object with 'role' and 'content', got {type(message).__name__}",
                            field=where)
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", field=f"{where}.role")
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            continue
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and isinstance(part.get("type"), str)):
                    raise DataError("expected a typed content part like {'type': 'text', 'text': ...}",
                                    field=f"{where}.content[{j}]")
        elif not isinstance(content, str):
            raise DataError(f"expected a string or a list of typed parts, got {type(content).__name__}",
                            field=f"{where}.content")
    return messages
