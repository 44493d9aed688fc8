"""What a reward scores: the model's response, i.e. the prefix it was forced to start with plus what it generated.

With a prefilled `<think>\\n` the generated completion starts mid-thought; scoring the completion alone would make
every format check fail. So rewards score `prefix + completion`, except where the completion already carries the
prefix (some pipelines decode it back in) or there is no prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefill_kit.errors import ConfigError


def completion_text(completion: Any) -> str:
    """The generated text of one completion: a string, or the content of a conversational `[{"content": ...}]`.

    Anything else (None, bytes, a malformed message list) becomes text rather than an exception: a reward must
    never crash a training step on one odd row.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, bytes | bytearray):
        return bytes(completion).decode("utf-8", errors="replace")
    if isinstance(completion, dict):
        return completion_text(completion.get("content"))
    if isinstance(completion, Sequence):
        # Conversational: the assistant turn(s) the model produced; join in order if there are several.
        return "".join(completion_text(message) for message in completion)
    return str(completion)


def join_prefix(prefix: Any, completion: str) -> str:
    """`prefix + completion`, unless the completion already starts with the prefix or there is no prefix."""
    prefix_text = completion_text(prefix)
    if not prefix_text or completion.startswith(prefix_text):
        return completion
    return prefix_text + completion


def column(kwargs: dict[str, Any], name: str, n: int) -> list[Any]:
    """One value per completion from a dataset column passed as a kwarg; missing column -> Nones.

    A scalar (e.g. a single prefix string passed by hand) is broadcast to every completion.
    """
    values = kwargs.get(name)
    if values is None:
        return [None] * n
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        return [values] * n
    values = list(values)
    if len(values) != n:
        # TRL always passes aligned columns; a misaligned hand call is padded/truncated rather than crashing.
        values = (values + [None] * n)[:n]
    return values


def responses(completions: Sequence[Any], **kwargs: Any) -> list[str]:
    """The texts to score, one per completion: prefix (from the `prefix` column) + generated text."""
    n = len(completions)
    prefixes = column(kwargs, "prefix", n)
    return [join_prefix(prefix, completion_text(c)) for prefix, c in zip(prefixes, completions, strict=True)]


def gold_column(kwargs: dict[str, Any], n: int, reward: str) -> list[Any]:
    """The gold answer of each completion: `solution`, else `answer`. A reward that needs gold answers and
    gets neither column is misconfigured, which is an error rather than a silent 0."""
    if "solution" not in kwargs and "answer" not in kwargs:
        raise ConfigError(f"{reward} reward needs a `solution` (or `answer`) column with the gold answers")
    return [s if s is not None else a
            for s, a in zip(column(kwargs, "solution", n), column(kwargs, "answer", n), strict=True)]
