"""Token ids of rendered prompts, fast and exact, and the prefix boundary audit.

Why piecewise: a fast tokenizer first cuts its input at added tokens (`<|im_start|>`, ...) and
encodes the text between them independently; BPE never merges across a special token. Chat
prompts repeat the same template text between special tokens on every row (the default system
prompt, `assistant\\n<think>\\n`, the newlines between turns), so those pieces are encoded once and
memoised; only the variable pieces go to the tokenizer. The result is checked against whole-prompt
encoding on the first batch, and the plain path is used for any tokenizer where it would differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MEMO_LIMIT = 10_000  # distinct recurring pieces kept; template text needs a handful per template
SELF_CHECK_ROWS = 32


class PromptTokenizer:
    """`encode(texts)` == `tokenizer(texts, add_special_tokens=False)["input_ids"]`, computed piecewise."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._split: re.Pattern | None = None
        self._special_ids: dict[str, int] = {}
        self._memo: dict[str, list[int]] = {}
        self._checked = False
        if self._backend is not None and hasattr(self._backend, "encode_batch_fast"):
            added = self._backend.get_added_tokens_decoder()
            # Tokens with strip/word options change the text around them: encode those prompts whole.
            if not any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
                self._special_ids = {t.content: i for i, t in added.items() if not t.normalized}
        if self._special_ids:
            alternatives = sorted(self._special_ids, key=len, reverse=True)  # leftmost-longest, as the tokenizer
            self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def __getstate__(self) -> dict:
        # The memo is a cache: workers and dataset fingerprints need only the tokenizer.
        return {"tokenizer": self.tokenizer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without added BOS/EOS (the template wrote whatever it wanted)."""
        if not texts:
            return []
        if self._split is None:
            return self._whole(texts)
        ids = self._piecewise(texts)
        if not self._checked:
            self._checked = True
            sample = texts[:SELF_CHECK_ROWS]
            if ids[:len(sample)] != self._whole(sample):
                self._split = None
                return self._whole(texts)
        return ids

    def _whole(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None and hasattr(self._backend, "encode_batch_fast"):
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _piecewise(self, texts: list[str]) -> list[list[int]]:
        split, memo, special = self._split, self._memo, self._special_ids
        parts = [split.split(t) for t in texts]  # text, special, text, special, ..., text
        counts: dict[str, int] = {}
        for pieces in parts:
            for piece in pieces[::2]:
                if piece and piece not in memo:
                    counts[piece] = counts.get(piece, 0) + 1
        fresh: dict[str, list[int]] = {}
        if counts:
            encoded = self._backend.encode_batch_fast(list(counts), add_special_tokens=False)
            fresh = {piece: e.ids for piece, e in zip(counts, encoded, strict=True)}
            if len(memo) < MEMO_LIMIT:  # keep what recurs within a batch: template text, not questions
                memo.update((p, fresh[p]) for p, n in counts.items() if n > 1)
        out = []
        for pieces in parts:
            ids: list[int] = []
            for i, piece in enumerate(pieces):
                if i % 2:
                    ids.append(special[piece])
                elif piece:
                    ids += fresh[piece] if piece in fresh else memo[piece]
            out.append(ids)
        return out


@dataclass(frozen=True)
class BoundaryMerge:
    """A row whose prompt tokenizes differently whole than as (prompt without prefix) + (prefix)."""

    where: str
    whole: list[str]
    split: list[str]


def boundary_merges(encoder: PromptTokenizer, prompts: list[str], prefixes: list[str],
                    whole_ids: list[list[int]]) -> list[tuple[int, list[int], list[int]]]:
    """Indices of rows whose prefix merges with the text before it, each with the whole and split ids.

    Such a prefix is not token-stable: the model sees other tokens at the boundary than a rollout
    that generates the same text, so its last token can also merge with the model's first one.
    """
    heads = [p[: len(p) - len(x)] for p, x in zip(prompts, prefixes, strict=True)]
    head_ids = encoder.encode(heads)
    prefix_ids = dict(zip(set(prefixes), encoder.encode(list(set(prefixes))), strict=True))
    merged = []
    for i, (whole, head, prefix) in enumerate(zip(whole_ids, head_ids, prefixes, strict=True)):
        if prefix and head + prefix_ids[prefix] != whole:
            merged.append((i, whole, head + prefix_ids[prefix]))
    return merged


def describe_merge(tokenizer: Any, where: str, whole: list[int], split: list[int]) -> BoundaryMerge:
    """The tokens around the first difference, as text, for one example to show the user."""
    first = next((i for i, (a, b) in enumerate(zip(whole, split, strict=False)) if a != b), min(len(whole), len(split)))
    lo = max(0, first - 2)
    return BoundaryMerge(where, tokenizer.convert_ids_to_tokens(whole[lo:first + 3]),
                         tokenizer.convert_ids_to_tokens(split[lo:first + 4]))
