"""`choice_accuracy`: multiple choice (A to E style) answers."""

from __future__ import annotations

import re
from typing import Any

from prefill_kit.errors import ConfigError
from prefill_kit.rewards.extract import last_boxed
from prefill_kit.rewards.response import completion_text, gold_column, responses, unfinished_thinking


def _letter_pattern(choices: str) -> re.Pattern[str]:
    letters = re.escape(choices)
    # A letter standing alone: "(B)", "B)", "B.", "**B**", "\text{B}", "B" at a word boundary.
    return re.compile(rf"(?<![A-Za-z])[(\[]?([{letters}])[)\].:]?(?![A-Za-z])")


def choice_letter(text: str, choices: str = "ABCDE", answer_tag: str = "answer", think_tag: str = "think") -> \
        str | None:
    """The chosen letter: in `<answer>`, else `\\boxed{}`, else after "answer is", else the last standalone
    letter of the final line (all after `</think>` if present)."""
    pattern = _letter_pattern(choices)
    close = text.rfind(f"</{think_tag}>")
    region = text[close + len(think_tag) + 3:] if close >= 0 else text
    tag_close = region.rfind(f"</{answer_tag}>")
    tag_open = region.rfind(f"<{answer_tag}>", 0, tag_close) if tag_close >= 0 else -1
    candidates = []
    if tag_open >= 0:
        candidates.append(region[tag_open + len(answer_tag) + 2:tag_close])
    boxed = last_boxed(region)
    if boxed:
        candidates.append(boxed)
    answer_is = list(re.finditer(r"answer\s+is\s*:?\s*", region[-3000:], re.IGNORECASE))
    if answer_is:
        candidates.append(region[-3000:][answer_is[-1].end():][:40])
    stripped = region.rstrip()
    candidates.append(stripped[stripped.rfind("\n") + 1:][-200:])
    for candidate in candidates:
        found = pattern.findall(candidate.replace("\\text{", "{"))
        if found:
            return found[0] if candidate is not candidates[-1] else found[-1]
    return None


class ChoiceAccuracyReward:
    """1.0 iff the chosen letter equals the gold letter (from `solution` or `answer`); None without a gold letter.
    0.0 when the response opens `<think>` and never closes it (unless `require_closed_think=False`)."""

    __name__ = "choice_accuracy_reward"

    def __init__(self, choices: str = "ABCDE", think_tag: str = "think", answer_tag: str = "answer",
                 require_closed_think: bool = True) -> None:
        if not choices or not choices.isalpha():
            raise ConfigError(f"choice_accuracy: choices must be letters, got {choices!r}")
        self.choices = choices
        self.think_tag = think_tag
        self.answer_tag = answer_tag
        self.require_closed_think = require_closed_think

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        n = len(completions)
        golds = gold_column(kwargs, n, "choice_accuracy")
        rewards: list[float | None] = []
        for gold, text in zip(golds, responses(completions, **kwargs), strict=True):
            gold_letter = choice_letter(completion_text(gold).strip(), self.choices, self.answer_tag, self.think_tag)
            if gold_letter is None:
                rewards.append(None)
                continue
            if self.require_closed_think and unfinished_thinking(text, self.think_tag):
                rewards.append(0.0)
                continue
            chosen = choice_letter(text, self.choices, self.answer_tag, self.think_tag)
            rewards.append(1.0 if chosen == gold_letter else 0.0)
        return rewards


choice_accuracy_reward = ChoiceAccuracyReward()
