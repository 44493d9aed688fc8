"""Answer extraction: the gold answer from a solution, the predicted answer from a response.

Pure string scanning in linear time (no backtracking regexes over the whole text), so 1 MB of junk or thousands
of unclosed `\\boxed{` cost milliseconds, and nothing here raises.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_TRIES = 8  # unclosed boxes scanned from the end; bounds the work on adversarial input
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_GSM8K_MARK = "####"
_BRACE = re.compile(r"[{}]")


def _braced(text: str, start: int) -> str | None:
    """Content of the `{...}` group opening at `text[start]`, honouring nesting; None when unclosed."""
    depth = 0
    for brace in _BRACE.finditer(text, start):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start + 1:brace.start()]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`); None if there is none."""
    end = len(text)
    for _ in range(_MAX_BOX_TRIES):
        pos, command = max((text.rfind(c, 0, end), c) for c in _BOX_COMMANDS)
        if pos < 0:
            return None
        i = pos + len(command)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _braced(text, i)
            if content is not None:
                return content.strip()
        elif i > pos + len(command) and i < len(text):
            # `\boxed 5`: one token, up to whitespace or `$`.
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
        end = pos
    return None


def _tag_content(text: str, tag: str) -> str | None:
    """Content of the last `<tag>...</tag>` block; None if there is none."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = text.rfind(f"<{tag}>", 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(tag) + 2:close].strip()


def _strip_math_delimiters(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left):len(answer) - len(right)].strip()
    return answer


def _after_answer_is(text: str) -> str | None:
    """X in the last "the answer is X" (to the end of its line, sentence full stop removed)."""
    tail = text[-5000:]
    match = next(reversed(list(_ANSWER_IS.finditer(tail))), None)
    if match is None:
        return None
    rest = tail[match.end():]
    line = rest.split("\n", 1)[0]
    # Cut at a sentence end ". " but keep decimals like 3.5 and the `$...$` span intact.
    cut = re.search(r"\.\s+[A-Z]|\.$|\s+(?:I hope|Hope)", line)
    answer = _strip_math_delimiters(line[:cut.start()] if cut else line)
    return answer or None


def last_number(text: str) -> str | None:
    """The last number-looking token (`1,234.5`, `-3`, `3/4`, `.5`)."""
    tail = text[-2000:]  # the final answer sits at the end; bounds the scan on huge inputs
    numbers = _NUMBER.findall(tail)
    return numbers[-1] if numbers else None


def extract_prediction(response: str, answer_tag: str = "answer", think_tag: str = "think") -> str | None:
    """The model's final answer: after `</think>` if present, then `<answer>` content, else the last `\\boxed{}`,
    else "the answer is X", else the last number (in the answer block, the whole block when none of these match)."""
    close = response.rfind(f"</{think_tag}>")
    region = response[close + len(think_tag) + 3:] if close >= 0 else response
    tagged = _tag_content(region, answer_tag)
    if tagged is not None:
        region = tagged
    answer = last_boxed(region) or _after_answer_is(region)
    if answer is None and tagged is not None:
        answer = _strip_math_delimiters(tagged) or None
    if answer is None:
        # A response that is one math span (`$...$`, `\[...\]`) is the answer as a whole, e.g. `$f(y) = y$`.
        stripped = region.strip()
        inner = _strip_math_delimiters(stripped)
        if inner != stripped.rstrip(".").strip() and "$" not in inner and len(inner) <= 500:
            answer = inner or None
    if answer is None:
        answer = last_number(region)
    return answer or None


def extract_gold(solution: str, answer_tag: str = "answer") -> str | None:
    """The reference answer: after GSM8K's `####`, else the last `\\boxed{}`, else `<answer>` content, else the
    whole (plain) value. None when nothing is left, or when the only box never closes."""
    if _GSM8K_MARK in solution:
        answer = solution[solution.rfind(_GSM8K_MARK) + len(_GSM8K_MARK):]
    else:
        answer = last_boxed(solution)
        if answer is None:
            answer = _tag_content(solution, answer_tag)
        if answer is None:
            if any(command in solution for command in _BOX_COMMANDS):
                return None  # a box that never closes: the gold is malformed, not a plain value
            answer = solution
    answer = _strip_math_delimiters(answer)
    return answer or None
