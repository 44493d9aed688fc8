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


# The columns each format turns into the conversation; every other column passes through.
_CONSUMED = {
    "messages": frozenset({"messages"}),
    "sharegpt": frozenset({"conversations", "system"}),
    "prompt": frozenset({"prompt", "system"}),
    "query": frozenset({"query", "response", "history", "system"}),
    "alpaca": frozenset({"instruction", "input", "output", "system"}),
}


def consumed_columns(fmt: str, columns: Iterable[str]) -> frozenset[str]:
    """The columns format `fmt` consumes from a row or table with these `columns`."""
    if fmt == "problem":
        return frozenset({"problem" if "problem" in columns else "question", "system"})
    return _CONSUMED[fmt]


def _text(row: dict, key: str, *, required: bool = True) -> str | None:
    """A string column; a required one that is absent or blank is a missing or empty conversation."""
    value = row.get(key)
    if value is None:
        if required:
            raise DataError("missing or empty conversation", field=key)
        return None
    if not isinstance(value, str):
        raise DataError(f"malformed content: expected a string, got {type(value).__name__}", field=key)
    if required and not value.strip():
        raise DataError("missing or empty conversation", field=key)
    return value


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    system = _text(row, "system", required=False)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _from_messages(row: dict) -> Conversation:
    return Conversation(validate_messages(row.get("messages"), "messages"), _CONSUMED["messages"])


def _from_sharegpt(row: dict) -> Conversation:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("missing or empty conversation", field="conversations")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError("malformed content: expected an object with 'from' and 'value', "
                            f"got {type(turn).__name__}", field=f"conversations[{i}]")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"unknown role {turn.get('from')!r}; expected one of {sorted(SHAREGPT_ROLES)}",
                            field=f"conversations[{i}].from")
        messages.append({"role": role, "content": turn.get("value")})
    messages = validate_messages(_with_system(row, messages), "conversations")
    return Conversation(messages, _CONSUMED["sharegpt"])


def _from_alpaca(row: dict) -> Conversation:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    reference = _text(row, "output", required=False)
    messages = _with_system(row, [{"role": "user", "content": user}])
    return Conversation(messages, _CONSUMED["alpaca"], reference)


def _from_query(row: dict) -> Conversation:
    query = _text(row, "query")
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError("malformed content: expected a list of [query, response] pairs", field="history")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DataError("malformed content: expected a [query, response] pair of strings",
                            field=f"history[{i}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages = _with_system(row, [*messages, {"role": "user", "content": query}])
    reference = _text(row, "response", required=False)
    return Conversation(messages, _CONSUMED["query"], reference)


def _from_prompt(row: dict) -> Conversation:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = validate_messages(prompt, "prompt")
        if messages[0].get("role") != "system":
            messages = _with_system(row, messages)
        return Conversation(messages, _CONSUMED["prompt"], _answer_as_solution(row))
    _text(row, "prompt")
    messages = _with_system(row, [{"role": "user", "content": prompt}])
    return Conversation(messages, _CONSUMED["prompt"], _answer_as_solution(row))


def _from_problem(row: dict) -> Conversation:
    key = "problem" if "problem" in row else "question"
    messages = _with_system(row, [{"role": "user", "content": _text(row, key)}])
    return Conversation(messages, consumed_columns("problem", row), _answer_as_solution(row))


def _answer_as_solution(row: dict) -> str | None:
    """An `answer` (or `response`) column as the reference answer, kept whole, when there is no `solution`.

    The column itself also passes through unchanged.
    """
    if row.get("solution") is not None:
        return None
    for key in ("answer", "response"):
        if row.get(key) is not None:
            return row[key] if isinstance(row[key], str) else str(row[key])
    return None


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


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the `text` parts of a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str | None:
    """The text of the last user message: the row's question (few-shot's leak check, the completion log's
    `question` column); None when no user spoke."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return None


def rename_columns(row: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """`row` with its keys renamed (`--columns '{"src": "dst"}'`), applied before detection."""
    return {renames.get(k, k): v for k, v in row.items()} if renames else row


def to_conversation(row: dict[str, Any], fmt: str) -> Conversation:
    """Convert one row of format `fmt` (see FORMATS); raises DataError naming the field."""
    try:
        return FORMATS[fmt][1](row)
    except KeyError:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A row's `tools` column: JSON schemas for the template, as a list of objects or a JSON string of one
    (how many datasets store them); None when absent. The column also passes through unchanged."""
    tools = row.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        import json

        try:
            tools = json.loads(tools)
        except ValueError as exc:
            raise DataError(f"expected a JSON list of tool schemas, got invalid JSON: {exc}", field="tools") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"expected a list of tool schemas (objects), got {type(tools).__name__}", field="tools")
    return tools or None


def validate_messages(messages: Any, field: str) -> list[dict[str, Any]]:
    """Check OpenAI-style messages: a non-empty list of {role, content}; content a string or typed parts."""
    if not isinstance(messages, list) or not messages:
        raise DataError("missing or empty conversation", field=field)
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"malformed content: expected an object with 'role' and 'content', "
                            f"got {type(message).__name__}",
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
                    raise DataError("malformed content: expected a typed part like {'type': 'text', 'text': ...}",
                                    field=f"{where}.content[{j}]")
        elif not isinstance(content, str):
            raise DataError(f"malformed content: expected a string or a list of typed parts, "
                            f"got {type(content).__name__}",
                            field=f"{where}.content")
    return messages
