"""What a reward scores: the model's response, i.e. the prefix it was forced to start with plus what it generated.

With a prefilled `<think>\\n` the generated completion starts mid-thought; scoring the completion alone would make
every format check fail. So rewards score `prefix + completion`, always: the prefix is carried from the rendered
row, never guessed from the completion. A caller whose completions already include the prefix (ms-swift, a
pipeline that decodes it back in) passes no `prefix`. A completion that repeats the prefix is scored as the
response the user sees, with the prefix twice.
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
    """`prefix + completion`; a missing prefix (None) is empty."""
    return completion_text(prefix) + completion


def unfinished_thinking(response: str, think_tag: str = "think") -> bool:
    """The response opened a reasoning block and never closed it: its last `<think>` has no `</think>` after it.

    A truncated or rambling rollout that merely mentions the right number inside its thoughts has not answered.
    """
    opened = response.rfind(f"<{think_tag}>")
    return opened >= 0 and response.find(f"</{think_tag}>", opened) < 0


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
