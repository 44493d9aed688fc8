"""Small helpers for messages people read."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 step`, `2 steps`, `0 steps`: a number with its noun in the right form (`plural` when not noun + s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
