"""`prefix_overlap` tries only the lengths that can match (issue 19: render speed); it must give what trying
every length, longest first, gives."""

from __future__ import annotations

import random

from prefill_kit.prompts.render import _inside_token, prefix_overlap


def _every_length(text: str, prefix: str, atomic: tuple[str, ...]) -> int:
    for k in range(min(len(prefix), len(text)), 0, -1):
        if text.endswith(prefix[:k]) and prefix[:k].strip() and not _inside_token(text, len(text) - k, atomic):
            return k
    return 0


def test_prefix_overlap_is_the_longest_length_that_fits():
    rng = random.Random(19)
    alphabet = "ab<>\n t"
    overlaps = set()
    for _ in range(20_000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 8)))
        prefix = "".join(rng.choices(alphabet, k=rng.randint(0, 6)))
        atomic = tuple("".join(rng.choices(alphabet, k=rng.randint(1, 3))) for _ in range(rng.randint(0, 2)))
        expected = _every_length(text, prefix, atomic)
        assert prefix_overlap(text, prefix, atomic) == expected, (text, prefix, atomic)
        overlaps.add(expected)
    assert {0, 1, 2, 3} <= overlaps  # the cases hold overlaps of several lengths, not only none


def test_prefix_overlap_takes_the_longest_of_several():
    assert prefix_overlap("<|im_start|>assistant\n<think>\n<", "<think>\n<x") == 9  # not the lone "<"
    assert prefix_overlap("assistant\n<think>", "<think>\n") == 7
    assert prefix_overlap("a>>", ">>>b") == 2
    assert prefix_overlap("", "<think>") == 0 and prefix_overlap("x", "") == 0
