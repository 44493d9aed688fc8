"""Fast answer equivalence without sympy: exact strings after light LaTeX normalisation, then exact rationals.

Returns True (equal), False (certainly different) or None (undecided: hand it to the symbolic check). It only
says False when both sides are plain numbers whose exact values differ by more than a rounding margin, so it never
overrules a symbolic equality such as `\\frac{\\sqrt{3}}{2}` vs `0.8660254`.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SPACING = re.compile(r"\\(?:left|right|displaystyle|!|,|;|:| )|\s+|~")
_LIST_COMMA = re.compile(r",\s+")
_FRAC_VARIANT = re.compile(r"\\[dtc]frac")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mbox|mathrm|textrm)\{([^{}]*)\}$")
_UNIT_SUFFIX = re.compile(r"\\(?:text|mbox|mathrm|textrm)\{[A-Za-z. ]*\}(?:\^\{?\d\}?)?$")
_ASSIGNMENT = re.compile(r"^[A-Za-z]=(?!=)")
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_DECIMAL = re.compile(rf"^([+-]?)({_INT}(?:\.\d*)?|\.\d+)$")
_SLASH = re.compile(r"^([+-]?)(\d+)/(\d+)$")
_MIXED = re.compile(r"^([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")  # 1\frac{1}{4}: MATH's mixed numbers
_LATEX_FRAC = re.compile(r"^([+-]?)\\frac(?:\{([+-]?\d+)\}|(\d))(?:\{(\d+)\}|(\d))$")
_WORD = re.compile(r"^[A-Za-z]{1,40}$")
_CLOSE_MARGIN = Fraction(1, 1000)  # a decimal this close may be a rounding: let the symbolic check decide


def normalize(answer: str) -> tuple[str, bool]:
    """Canonical text of an answer and whether it was given as a percentage."""
    text = answer.replace("\\$", "").replace("$", "").replace("{,}", ",")
    text = _LIST_COMMA.sub(";", text)  # "32, 349" is a list of two numbers (as math-verify reads it), not 32349
    text = _SPACING.sub("", text)
    text = _FRAC_VARIANT.sub(r"\\frac", text)
    text = _DEGREES.sub("", text)
    percent = text.endswith(("\\%", "%"))
    if percent:
        text = text.removesuffix("%").removesuffix("\\")
    wrapped = _TEXT_WRAP.match(text)
    if wrapped:
        text = wrapped.group(1).strip()
    unitless = _UNIT_SUFFIX.sub("", text)
    if unitless:
        text = unitless
    text = _ASSIGNMENT.sub("", text).rstrip(".")
    return text, percent


def to_number(text: str) -> Fraction | None:
    """The exact value of a plain number (`-1,234.50`, `3/4`, `\\frac{3}{4}`, `\\frac34`); None otherwise."""
    if len(text) > 64:
        return None
    match = _DECIMAL.match(text)
    if match:
        return Fraction(match.group(1) + match.group(2).replace(",", ""))
    match = _SLASH.match(text)
    if match and int(match.group(3)) != 0:
        return Fraction(int(match.group(2)), int(match.group(3))) * (-1 if match.group(1) == "-" else 1)
    match = _LATEX_FRAC.match(text)
    if match:
        num = int(match.group(2) or match.group(3))
        den = int(match.group(4) or match.group(5))
        if den != 0:
            return Fraction(num, den) * (-1 if match.group(1) == "-" else 1)
    match = _MIXED.match(text)
    if match and int(match.group(4)) != 0:
        value = int(match.group(2)) + Fraction(int(match.group(3)), int(match.group(4)))
        return -value if match.group(1) == "-" else value
    return None


def fast_equal(gold: str, pred: str) -> bool | None:
    """True/False when decidable from strings and exact numbers alone, None to defer to the symbolic check."""
    gold_text, gold_pct = normalize(gold)
    pred_text, pred_pct = normalize(pred)
    if gold_text and gold_text == pred_text:
        return True
    if _WORD.match(gold_text) and _WORD.match(pred_text):
        return gold_text.lower() == pred_text.lower()  # "A" vs "C", "Evelyn" vs "Carla": names, not math
    gold_value, pred_value = to_number(gold_text), to_number(pred_text)
    if gold_value is None or pred_value is None:
        return None
    candidates = [(gold_value, pred_value)]
    if gold_pct != pred_pct:
        # "28%" matches "28" and "0.28" (math-verify accepts both); a bare 0.28 never matches a bare 28.
        candidates.append((gold_value / 100, pred_value) if gold_pct else (gold_value, pred_value / 100))
    if any(g == p for g, p in candidates):
        return True
    approximate = "." in gold_text or "." in pred_text
    if approximate and any(abs(g - p) <= _CLOSE_MARGIN * max(1, abs(g)) for g, p in candidates):
        return None
    return False
