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
from dataclasses import dataclass
from typing import Any

MEMO_LIMIT = 10_000  # distinct recurring pieces kept; template text needs a handful per template
WORD_MEMO_LIMIT = 500_000  # distinct words kept (tens of MiB at most)
SELF_CHECK_ROWS = 32
# ByteLevel(use_regex=True)'s built-in split, as published with GPT-2.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PLAIN_TEXT = re.compile(r"[\t\n\r -~]*")


def word_splitter(backend: Any) -> Any:
    """The tokenizer's pre-tokenizer regex, compiled with `regex`, where words can be encoded alone; else None."""
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
    return regex.compile(pattern) if pattern is not None else None


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
        split, memo, special = self._split, self._memo, self._special_ids
        parts = [split.split(t) for t in texts]  # text, special, text, special, ..., text
        counts: dict[str, int] = {}
        for pieces in parts:
            for piece in pieces[::2]:
                if piece and piece not in memo:
                    counts[piece] = counts.get(piece, 0) + 1
        fresh = self._encode_pieces(list(counts)) if counts else {}
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
        todo = whole + list({w: None for ws in words_of.values() for w in ws if w not in word_memo})
        encoded = dict(zip(todo, (e.ids for e in self._backend.encode_batch_fast(todo, add_special_tokens=False)),
                           strict=True)) if todo else {}
        ids = {p: encoded[p] for p in whole}
        for piece, words in words_of.items():
            piece_ids: list[int] = []
            for w in words:
                piece_ids += word_memo[w] if w in word_memo else encoded[w]
            ids[piece] = piece_ids
        if len(word_memo) < WORD_MEMO_LIMIT:
            word_memo.update((w, encoded[w]) for w in todo[len(whole):])
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
