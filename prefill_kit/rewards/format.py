"""Format rewards: exact rules on tag structure, checked with plain string operations (fast, no regex loopholes).

open-r1's `^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$` with re.MULTILINE lets `$` match at any line
end, so text after `</answer>` passes. Here each rule is a whole-string check.
"""

from __future__ import annotations

from typing import Any

from prefill_kit.rewards.response import all_turn_responses, responses


def _tags(name: str) -> tuple[str, str]:
    return f"<{name}>", f"</{name}>"


def is_think_answer_format(text: str, think_tag: str = "think", answer_tag: str = "answer") -> bool:
    """True iff `text` is `<think>...</think>` then `<answer>...</answer>` and nothing else.

    Surrounding whitespace and whitespace between the two blocks are allowed; each of the four tags occurs
    exactly once.
    """
    t_open, t_close = _tags(think_tag)
    a_open, a_close = _tags(answer_tag)
    body = text.strip()
    if not (body.startswith(t_open) and body.endswith(a_close)):
        return False
    if any(body.count(tag) != 1 for tag in (t_open, t_close, a_open, a_close)):
        return False
    think_end = body.find(t_close)
    answer_start = body.find(a_open)
    # Order is implied by the count checks plus start/end anchors, except </think> vs <answer>.
    return think_end < answer_start and not body[think_end + len(t_close):answer_start].strip()


def is_think_format(text: str, think_tag: str = "think") -> bool:
    """True iff `text` starts with exactly one `<think>...</think>` block and a non-empty answer follows it."""
    t_open, t_close = _tags(think_tag)
    body = text.lstrip()
    if not body.startswith(t_open) or body.count(t_open) != 1 or body.count(t_close) != 1:
        return False
    return bool(body[body.find(t_close) + len(t_close):].strip())


def tag_count_score(text: str, think_tag: str = "think", answer_tag: str = "answer") -> float:
    """open-r1's tag_count_reward: 0.25 for each of `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>`
    occurring exactly once."""
    t_open, t_close = _tags(think_tag)
    a_open, a_close = _tags(answer_tag)
    pieces = (f"{t_open}\n", f"\n{t_close}\n", f"\n{a_open}\n", f"\n{a_close}")
    return 0.25 * sum(text.count(piece) == 1 for piece in pieces)


def opens_with_thought(text: str, think_tag: str = "think") -> bool:
    """An earlier turn of a multi-turn rollout (one that called tools): exactly one `<think>...</think>` block, at
    its start; what follows (text, the tool call) is free. The format rewards require it of every turn but the
    last, which must have the whole format."""
    opening, closing = f"<{think_tag}>", f"</{think_tag}>"
    return (text.lstrip().startswith(opening) and text.count(opening) == 1 and text.count(closing) == 1
            and text.find(closing) > text.find(opening))


class FormatReward:
    """1.0 iff the response (prefix + completion) is exactly `<think>...</think>` `<answer>...</answer>`."""

    __name__ = "format_reward"

    def __init__(self, think_tag: str = "think", answer_tag: str = "answer") -> None:
        self.think_tag = think_tag
        self.answer_tag = answer_tag

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        return [1.0 if is_think_answer_format(turns[-1], self.think_tag, self.answer_tag)
                and all(opens_with_thought(t, self.think_tag) for t in turns[:-1]) else 0.0
                for turns in all_turn_responses(completions, **kwargs)]


class ThinkFormatReward:
    """1.0 iff the response starts with exactly one `<think>...</think>` block followed by a non-empty answer."""

    __name__ = "think_format_reward"

    def __init__(self, think_tag: str = "think") -> None:
        self.think_tag = think_tag

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        return [1.0 if is_think_format(turns[-1], self.think_tag)
                and all(opens_with_thought(t, self.think_tag) for t in turns[:-1]) else 0.0
                for turns in all_turn_responses(completions, **kwargs)]


class TagCountReward:
    """Partial credit (0.25 per tag line) for the think/answer tags, as open-r1's tag_count_reward."""

    __name__ = "tag_count_reward"

    def __init__(self, think_tag: str = "think", answer_tag: str = "answer") -> None:
        self.think_tag = think_tag
        self.answer_tag = answer_tag

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        return [tag_count_score(text, self.think_tag, self.answer_tag) for text in responses(completions, **kwargs)]


format_reward = FormatReward()
think_format_reward = ThinkFormatReward()
tag_count_reward = TagCountReward()
