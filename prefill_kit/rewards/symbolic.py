"""Symbolic equivalence through math-verify, with guards against its known false positives.

Runs inside a verify-pool worker process (it can hang; the pool bounds it), so timeouts are disabled here.

Why math-verify accepts some wrong answers, and the guard for each:
- `1/2004!` vs `1/2006!` (and `1/2^99` vs `1/2^98`): its last resort compares `(a - b).evalf(chop=True) == 0`;
  `chop` flushes any difference below ~1e-15 to zero, so two tiny numbers are "equal". Guard: when both sides
  are numbers, re-check the *relative* difference at 50 significant digits.
- `4` vs `4\\sqrt(2)`: its malformed-sqrt fix writes `\\\\sqrt{2}`, a LaTeX line break, and the LaTeX parser stops
  there, so the prediction parses as `4`. Fix at the source (`\\sqrt(x)` -> `\\sqrt{x}`) and reject any parse whose
  text still holds a line break outside an environment.
- `1-1/e` vs `1+1/e`: parsed as plain text, its expression extractor takes the first number, `1`, from both; and
  `\\mathrm{e}` truncates its LaTeX match to `1 - \\frac{1}{`. We hand it only our extracted answer, as LaTeX
  (`$...$`, no expression extractor), rewrite single-letter `\\mathrm{e}` to `e`, reject parses with unbalanced
  braces, and compare only parsed expressions, never math-verify's fallback strings.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

_SQRT_PAREN = re.compile(r"\\sqrt\s*\(([^()]*)\)")
_MATHRM_LETTER = re.compile(r"\\(?:mathrm|mathit|operatorname)\{([A-Za-z])\}")
_REL_TOL_EXACT = 1e-30  # exact expressions: equal up to evaluation noise at 50 digits
_REL_TOL_FLOAT = 1e-6  # a decimal approximation: about math-verify's 6-digit rounding, but relative
_DIGITS = 50


def prepare(answer: str) -> str:
    """Our extracted answer as LaTeX math for math-verify, with known parser traps rewritten."""
    text = answer.replace("\\$", "").replace("$", "")
    text = _SQRT_PAREN.sub(r"\\sqrt{\1}", text)
    text = _MATHRM_LETTER.sub(r"\1", text)
    return f"${text}$"


def _parse(answer: str) -> list:
    """math-verify's parse of one answer: only the sympy results whose source text was taken whole."""
    from math_verify import LatexExtractionConfig, parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the pool bounds time instead
    parsed = parse(prepare(answer), extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                   parsing_timeout=None)
    texts = [p for p in parsed if isinstance(p, str)]
    if any(_truncated(t) for t in texts):
        return []
    return [p for p in parsed if not isinstance(p, str)]


def _truncated(latex: str) -> bool:
    """The match lost part of the answer: unbalanced braces, or a line break the parser silently stops at."""
    if latex.count("{") != latex.count("}"):
        return True
    return "\\\\" in latex and "\\begin" not in latex


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """Each distinct gold answer is parsed once per worker process."""
    return tuple(_parse(gold))


def _has_float(expr) -> bool:
    import sympy

    return any(isinstance(atom, sympy.Float) for atom in expr.atoms(sympy.Number))


def numbers_really_equal(a, b) -> bool:
    """Relative comparison at high precision for two numeric sympy expressions (see module docstring)."""
    import sympy

    if a == b:
        return True
    x, y = sympy.N(a.doit(), _DIGITS), sympy.N(b.doit(), _DIGITS)
    if x.is_finite is False or y.is_finite is False:
        return x == y
    if not (x.is_real and y.is_real):
        # Complex or unevaluable: fall back to an exact check of the difference.
        return sympy.simplify(a - b) == 0
    scale = max(abs(x), abs(y))
    if scale == 0:
        return True
    tol = _REL_TOL_FLOAT if _has_float(a) or _has_float(b) else _REL_TOL_EXACT
    return bool(abs(x - y) <= tol * scale)


def _is_plain_number(expr) -> bool:
    import sympy

    # Percentages (`28*UnevaluatedExpr(1/100)`) are left to math-verify: it deliberately matches 28% with 28.
    return isinstance(expr, sympy.Expr) and not isinstance(expr, sympy.MatrixBase) and expr.is_number is True \
        and not expr.free_symbols and not expr.has(sympy.UnevaluatedExpr)


def warm_up() -> None:
    """Load sympy, math-verify, its LaTeX grammar and sympy's simplify caches (the first parse and the first
    symbolic comparison cost ~0.4 s and ~0.15 s) before any timed task."""
    symbolic_equal("1", "1")
    symbolic_equal(r"\frac{4}{30p}", r"\sqrt{2}x + 1")


def symbolic_equal(gold: str, pred: str) -> bool:
    """math-verify's verdict on (gold, pred), with the false-positive guards applied."""
    from math_verify import verify

    gold_parsed = list(parse_gold(gold))
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    for g in gold_parsed:
        for p in pred_parsed:
            if not verify([g], [p], timeout_seconds=None):
                continue
            if _is_plain_number(g) and _is_plain_number(p) and not numbers_really_equal(g, p):
                continue
            return True
    return False
