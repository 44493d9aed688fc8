"""Token ids of rendered prompts, fast and exact, and the prefix boundary audit.

Why piecewise: a fast tokenizer first cuts its input at added tokens (`<|im_start|>`, ...) and
encodes the text between them independently; BPE never merges across a special token. Chat
prompts repeat the same template text between special tokens on every row (the default system
prompt, `assistant\\n<think>\\n`, the newlines between turns), so those pieces are encoded once and
memoised; only the variable pieces go to the tokenizer.

The same holds one level down: a byte-level BPE tokenizer splits text into words with one regex
(its pre-tokenizer) and BPE-encodes each word alone, so words recur across rows and their ids
can be memoised too. That path is taken only where it is provably the same: a BPE model, an NFC or
no normalizer, the pre-tokenizer's own regex, and text of printable ASCII (plus tab and newlines),
on which Python's `regex` and the tokenizer's Oniguruma agree. Anything else is encoded whole.
Results are checked against whole-prompt encoding on the first batch.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import Any

MEMO_LIMIT = 10_000  # distinct recurring pieces kept; template text needs a handful per template
WORD_MEMO_LIMIT = 500_000  # distinct words kept (tens of MiB at most)
SELF_CHECK_ROWS = 32
# ByteLevel(use_regex=True)'s built-in split, as published with GPT-2.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PLAIN_TEXT = re.compile(r"[\t\n\r -~]*")


def word_splitter(backend: Any) -> Any:
    """The tokenizer's pre-tokenizer regex (see `ascii_pattern`), where words can be encoded alone; else None."""
    import json

    try:
        import regex
    except ImportError:
        return None
    if type(backend.model).__name__ != "BPE":
        return None
    if backend.normalizer is not None and json.loads(backend.normalizer.__getstate__()).get("type") != "NFC":
        return None
    if backend.pre_tokenizer is None:
        return None
    config = json.loads(backend.pre_tokenizer.__getstate__())
    steps = config.get("pretokenizers", [config]) if config.get("type") == "Sequence" else [config]
    pattern = None
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space"):
        pattern = _GPT2_SPLIT
    elif len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split, level = steps
        if split.get("behavior") == "Isolated" and not split.get("invert") and "Regex" in split.get("pattern", {}) \
                and not level.get("use_regex") and not level.get("add_prefix_space"):
            pattern = split["pattern"]["Regex"]
    if pattern is None:
        return None
    plain = ascii_pattern(pattern)
    return re.compile(plain, re.ASCII) if plain is not None else regex.compile(pattern)


_ASCII_CLASSES = {r"\p{L}": "A-Za-z", r"\p{N}": "0-9"}


def ascii_pattern(pattern: str) -> str | None:
    """`pattern` for the stdlib `re`, exact on the plain-text pieces the word memo splits; None if unsure.

    On printable ASCII, `\\p{L}` is [A-Za-z] and `\\p{N}` is [0-9], and `re.ASCII` classes agree with
    Unicode ones; `re` runs the split about 1.5x faster than `regex`. Any other Unicode property, or a
    nested class, keeps the `regex` original.
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            name = pattern[i:i + 5]
            if name in _ASCII_CLASSES:
                out.append(_ASCII_CLASSES[name] if in_class else f"[{_ASCII_CLASSES[name]}]")
                i += 5
                continue
            if pattern[i + 1:i + 2] in ("p", "P", ""):
                return None
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            if in_class:
                return None
            in_class = True
            if pattern[i + 1:i + 2] == "]" or pattern[i + 1:i + 3] == "^]":
                return None
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    try:
        re.compile("".join(out), re.ASCII)
    except re.error:
        return None
    return "".join(out)


class PromptTokenizer:
    """`encode(texts)` == `tokenizer(texts, add_special_tokens=False)["input_ids"]`, computed piecewise."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._split: re.Pattern | None = None
        self._special_ids: dict[str, int] = {}
        self._memo: dict[str, list[int]] = {}
        self._words = None
        self._word_memo: dict[str, list[int]] = {}
        self._checked = False
        if self._backend is not None and hasattr(self._backend, "encode_batch_fast"):
            added = self._backend.get_added_tokens_decoder()
            # Tokens with strip/word options change the text around them: encode those prompts whole.
            if not any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
                self._special_ids = {t.content: i for i, t in added.items() if not t.normalized}
        self._special_lists = {t: [i] for t, i in self._special_ids.items()}
        if self._special_ids:
            self._words = word_splitter(self._backend)
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
        # Per-row work stays in C (split, chain, map over one lookup table): Python loops run per distinct piece.
        split, memo = self._split, self._memo
        parts = [split.split(t) for t in texts]  # text, special, text, special, ..., text
        counts = Counter(chain.from_iterable(pieces[::2] for pieces in parts))
        counts.pop("", None)
        new = [p for p in counts if p not in memo]
        fresh = self._encode_pieces(new) if new else {}
        if len(memo) < MEMO_LIMIT:  # keep what recurs within a batch: template text, not questions
            memo.update((p, fresh[p]) for p in new if counts[p] > 1)
        table = {p: fresh[p] if p in fresh else memo[p] for p in counts}
        table.update(self._special_lists)
        table[""] = []
        get = table.__getitem__
        return [list(chain.from_iterable(map(get, pieces))) for pieces in parts]

    def _encode_pieces(self, pieces: list[str]) -> dict[str, list[int]]:
        """Ids of distinct text pieces: plain-text pieces word by word through the word memo, others whole."""
        words_of: dict[str, list[str]] = {}
        whole: list[str] = []
        for piece in pieces:
            words = self._words.findall(piece) if self._words is not None and _PLAIN_TEXT.fullmatch(piece) else None
            if words is not None and sum(map(len, words)) == len(piece):
                words_of[piece] = words
            else:
                whole.append(piece)
        word_memo = self._word_memo
        if len(word_memo) > WORD_MEMO_LIMIT:  # bounded: start over rather than track recency
            word_memo.clear()
        new_words = [w for w in set(chain.from_iterable(words_of.values())) if w not in word_memo]
        todo = whole + new_words
        encoded = [e.ids for e in self._backend.encode_batch_fast(todo, add_special_tokens=False)] if todo else []
        ids = dict(zip(whole, encoded, strict=False))
        word_memo.update(zip(new_words, encoded[len(whole):], strict=True))
        get = word_memo.__getitem__
        ids.update((piece, list(chain.from_iterable(map(get, words)))) for piece, words in words_of.items())
        return ids


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
