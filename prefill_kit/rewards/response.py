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
        content = completion_text(completion.get("content"))
        carried = completion.get("prefix")  # a multi-turn turn's content starts with its prefix, which it names
        return content[len(carried):] if isinstance(carried, str) and content.startswith(carried) else content
    if isinstance(completion, Sequence):
        # Conversational: the assistant turn(s) the model produced, in order; tool results are not generated text.
        return "".join(completion_text(m) for m in completion if not _is_other_role(m))
    return str(completion)


def _is_other_role(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role", "assistant") != "assistant"


def turn_responses(completion: Any, prefix: Any) -> list[str]:
    """The response of each assistant turn of one completion (a single completion is one turn).

    Multi-turn rollouts give each assistant message its own `prefix` key (its content starts with it: every turn
    opens with the prefix); a message without one (TRL's conversational form) gets the row's `prefix` on the first
    turn, where the model continued from it.
    """
    if isinstance(completion, Sequence) and not isinstance(completion, str | bytes | bytearray):
        turns, first = [], True
        for message in completion:
            if _is_other_role(message):
                continue
            own = message.get("prefix") if isinstance(message, dict) else None
            lead = own if isinstance(own, str) else (completion_text(prefix) if first else "")
            turns.append(lead + completion_text(message))
            first = False
        return turns or [completion_text(prefix)]
    return [join_prefix(prefix, completion_text(completion))]


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
    """The texts to score, one per completion: prefix (from the `prefix` column) + generated text; of a
    multi-turn completion, its last assistant turn (the final answer; `turn_responses`)."""
    return [turns[-1] for turns in all_turn_responses(completions, **kwargs)]


def all_turn_responses(completions: Sequence[Any], **kwargs: Any) -> list[list[str]]:
    """`turn_responses` of each completion: what a reward that checks every turn (format) scores."""
    prefixes = column(kwargs, "prefix", len(completions))
    return [turn_responses(c, prefix) for prefix, c in zip(prefixes, completions, strict=True)]


def gold_column(kwargs: dict[str, Any], n: int, reward: str) -> list[Any]:
    """The gold answer of each completion: `solution`, else `answer`. A reward that needs gold answers and
    gets neither column is misconfigured, which is an error rather than a silent 0."""
    if "solution" not in kwargs and "answer" not in kwargs:
        raise ConfigError(f"{reward} reward needs a `solution` (or `answer`) column with the gold answers")
    return [s if s is not None else a
            for s, a in zip(column(kwargs, "solution", n), column(kwargs, "answer", n), strict=True)]
