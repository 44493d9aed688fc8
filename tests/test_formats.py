"""Chat-data formats: detection from the columns, conversion to messages, and message validation."""

from __future__ import annotations

import pytest

from prefill_kit.data.formats import FORMATS, detect_format, rename_columns, to_conversation, validate_messages
from prefill_kit.errors import DataError

USER = {"role": "user", "content": "What is 6*7?"}
SYSTEM = {"role": "system", "content": "Be brief."}

# (row, format, expected messages, expected reference answer, expected passthrough columns)
CASES = [
    ({"messages": [SYSTEM, USER], "id": 1}, "messages", [SYSTEM, USER], None, {"id"}),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 6*7?"},
                        {"from": "gpt", "value": "42"}], "source": "x"},
     "sharegpt", [SYSTEM, USER, {"role": "assistant", "content": "42"}], None, {"source"}),
    ({"conversations": [{"from": "user", "value": "What is 6*7?"}]}, "sharegpt", [USER], None, set()),
    ({"instruction": "What is", "input": "6*7?", "output": "42"}, "alpaca",
     [{"role": "user", "content": "What is\n\n6*7?"}], "42", set()),
    ({"instruction": "What is 6*7?", "input": "", "output": "42", "system": "Be brief."}, "alpaca",
     [SYSTEM, USER], "42", set()),
    ({"query": "What is 6*7?", "response": "42", "history": [["hi", "hello"]], "system": "Be brief."}, "query",
     [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, USER], "42", set()),
    ({"prompt": "What is 6*7?", "solution": "42"}, "prompt", [USER], None, {"solution"}),
    ({"prompt": [USER], "answer": "42"}, "prompt", [USER], "42", {"answer"}),
    ({"problem": "What is 6*7?", "solution": "$42$"}, "problem", [USER], None, {"solution"}),
    ({"question": "What is 6*7?", "answer": "6*7=42\n#### 42"}, "problem", [USER], "6*7=42\n#### 42", {"answer"}),
]


@pytest.mark.parametrize(("row", "fmt", "messages", "reference", "passthrough"), CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_format_is_detected_and_converted(row, fmt, messages, reference, passthrough):
    assert detect_format(row) == fmt
    conversation = to_conversation(row, fmt)
    assert conversation.messages == messages
    assert conversation.reference == reference
    assert set(row) - conversation.consumed == passthrough


def test_detection_failure_names_columns_seen_and_formats_known():
    with pytest.raises(DataError) as err:
        detect_format(["text", "label"])
    message = str(err.value)
    assert "['label', 'text']" in message
    for name in FORMATS:
        assert name in message


def test_column_renames_apply_before_detection():
    row = rename_columns({"q": "What is 6*7?", "gold": "42"}, {"q": "question", "gold": "answer"})
    assert row == {"question": "What is 6*7?", "answer": "42"}
    assert detect_format(row) == "problem"
    assert to_conversation(row, "problem").reference == "42"


def test_valid_messages_accept_every_role_and_typed_parts():
    messages = [{"role": r, "content": "x"} for r in ("system", "developer", "user", "assistant", "tool")]
    messages.append({"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]})
    assert validate_messages(messages, "messages") == messages


@pytest.mark.parametrize(("messages", "field", "reason"), [
    (None, "messages", "missing or empty conversation"),
    ([], "messages", "missing or empty conversation"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role", "unknown role 'wizard'"),
    ([{"role": "user", "content": 3}], "messages[0].content", "malformed content"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0]", "malformed content"),
    (["just a string"], "messages[0]", "malformed content"),
])
def test_invalid_messages_name_the_field_and_reason(messages, field, reason):
    with pytest.raises(DataError) as err:
        validate_messages(messages, "messages")
    assert err.value.field == field and reason in err.value.reason


@pytest.mark.parametrize(("row", "fmt", "field", "reason"), [
    ({"prompt": "  "}, "prompt", "prompt", "missing or empty conversation"),
    ({"question": None, "answer": "1"}, "problem", "question", "missing or empty conversation"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "conversations[0].from", "unknown role"),
    ({"query": "q", "history": [["only one"]]}, "query", "history[0]", "malformed content"),
])
def test_bad_rows_of_other_formats(row, fmt, field, reason):
    with pytest.raises(DataError) as err:
        to_conversation(row, fmt)
    assert err.value.field == field and reason in err.value.reason
