"""Token ids of rendered prompts, exact by construction and fast, and the prefix boundary audit.

A fast tokenizer (`tokenizers`) encodes a text in fixed stages:

1. it cuts the text at added tokens (`<|im_start|>`, `</s>`, ...), leftmost-longest;
2. it normalizes each piece between them, alone;
3. its pre-tokenizer splits each piece into words, alone;
4. its model (BPE, Unigram, ...) encodes each word, alone.

Stages 2-4 never look across a piece or a word, so a piece's ids are the same on every row and a
word's ids are the same in every piece. `PromptTokenizer` runs the same stages with the tokenizer's own
components and memoises pieces (template text recurs on every row) and words (so do most words). It
takes this path only where the stages are provably the ones above; otherwise it encodes whole prompts.
What stops it (`piecewise_blocker`):

- an added token with `lstrip`, `rstrip` or `single_word` (it eats or checks the text around it), or a
  `normalized` one (it is matched after normalization, inside the pieces);
- special tokens encoded as text (`split_special_tokens=True`), truncation or padding set on the backend;
- a BPE model with dropout (random by design).

Stage 4 is cut finer where the vocabulary proves it safe. SentencePiece-style BPE (Mistral, Llama-2, Gemma)
writes a space as `▁` and may keep a whole piece as one word. When no vocabulary token holds a `▁` after
another character, no merge can join the text before a `▁` to the `▁`: the word is encoded in segments
that each start at such a `▁`, as the model would (`sentencepiece_segments`).

One stage does look at the position: a Metaspace pre-tokenizer with `prepend_scheme="first"` prepends
its `▁` only to the piece at the very start of the text. Pieces elsewhere are pre-tokenized with a copy
whose scheme is `"never"`, which is what `"first"` does at any other position.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import Any

MEMO_LIMIT = 10_000  # distinct recurring pieces kept; template text needs a handful per template
WORD_MEMO_LIMIT = 500_000  # distinct words kept (tens of MiB at most)


def piecewise_blocker(tokenizer: Any) -> str | None:
    """Why prompts must be encoded whole with this tokenizer, or None when the piecewise path is exact."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return "not a fast (tokenizers) tokenizer"
    if backend.encode_special_tokens:
        return "special tokens are encoded as text (split_special_tokens)"
    if backend.truncation is not None or backend.padding is not None:
        return "the backend truncates or pads"
    for token in backend.get_added_tokens_decoder().values():
        if token.lstrip or token.rstrip or token.single_word:
            return f"added token {token.content!r} strips or checks the text around it"
        if token.normalized:
            return f"added token {token.content!r} is matched after normalization"
    model = json.loads(backend.to_str())["model"]
    if model.get("dropout"):
        return "BPE dropout makes encoding random"
    return None


METASPACE = "\u2581"


def sentencepiece_segments(backend: Any) -> re.Pattern | None:
    """Where a word may be cut for the model (module docstring), or None when the vocabulary does not prove it.

    BPE builds every symbol by merges whose results are vocabulary tokens. If no token holds `▁` after another
    character, no symbol ever spans a boundary before a `▁` that follows another character, so each side is
    merged as it would be alone. The model options that look at the whole word are excluded: a continuing-subword
    prefix or end-of-word suffix, dropout, and `ignore_merges` (a whole segment found in the vocabulary).
    """
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE" or model.get("dropout") or model.get("ignore_merges") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    inner = re.compile(f"[^{METASPACE}]{METASPACE}")
    if METASPACE not in vocab or any(inner.search(token) for token in vocab):
        return None
    return re.compile(f"(?<=[^{METASPACE}])(?={METASPACE})")


def _rest_pre_tokenizer(backend: Any) -> Any:
    """The pre-tokenizer as it acts on a piece that does not start the text (module docstring); None if the same."""
    config = json.loads(backend.to_str())
    changed = False

    def never(step: dict) -> dict:
        nonlocal changed
        if step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first":
            changed = True
            return {**step, "prepend_scheme": "never"}
        if step.get("type") == "Sequence" and "pretokenizers" in step:
            return {**step, "pretokenizers": [never(s) for s in step["pretokenizers"]]}
        return step

    if config.get("pre_tokenizer") is None:
        return None
    config["pre_tokenizer"] = never(config["pre_tokenizer"])
    if not changed:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(config)).pre_tokenizer


class PromptTokenizer:
    """`encode(texts)` == `tokenizer(texts, add_special_tokens=False)["input_ids"]`, computed piecewise
    where that is provably the same (module docstring), else whole."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.blocker = piecewise_blocker(tokenizer)
        self._memo: dict[str, list[int]] = {}
        self._word_memo: dict[str, list[int]] = {}
        if self.blocker is not None:
            return
        from tokenizers import Tokenizer

        backend = tokenizer.backend_tokenizer
        self._backend = backend
        self._normalizer = backend.normalizer
        self._first_pre = backend.pre_tokenizer
        self._rest_pre = _rest_pre_tokenizer(backend) or self._first_pre
        self._model = Tokenizer(backend.model)  # the model alone: no added tokens, normalizer or pre-tokenizer
        self._segments = sentencepiece_segments(backend)
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.content}
        self._added_lists = {t: [i] for t, i in added.items()}
        alternatives = sorted(added, key=len, reverse=True)  # at one position the longest wins, as in stage 1
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if added else None

    def __getstate__(self) -> dict:
        # The memos are caches: workers and dataset fingerprints need only the tokenizer.
        return {"tokenizer": self.tokenizer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without added BOS/EOS (the template wrote whatever it wanted)."""
        if not texts:
            return []
        if self.blocker is not None:
            return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return self._piecewise(texts)

    def _piecewise(self, texts: list[str]) -> list[list[int]]:
        # Per-row work stays in C (split, chain, map over one lookup table): Python loops run per distinct piece.
        split, memo = self._split, self._memo
        parts = [split.split(t) if split is not None else [t] for t in texts]  # text, added, text, ..., text
        if self._rest_pre is not self._first_pre:
            for pieces in parts:  # a 1-tuple marks the piece that starts the text: it is pre-tokenized as such
                if pieces[0]:
                    pieces[0] = (pieces[0],)
        counts = Counter(chain.from_iterable(pieces[::2] for pieces in parts))
        counts.pop("", None)
        new = [p for p in counts if p not in memo]
        fresh = self._encode_pieces(new) if new else {}
        if len(memo) < MEMO_LIMIT:  # keep what recurs within a batch: template text, not questions
            memo.update((p, fresh[p]) for p in new if counts[p] > 1)
        table = {p: fresh[p] if p in fresh else memo[p] for p in counts}
        table.update(self._added_lists)
        table[""] = []
        get = table.__getitem__
        return [list(chain.from_iterable(map(get, pieces))) for pieces in parts]

    def _encode_pieces(self, pieces: list) -> dict:
        """Ids of distinct text pieces: normalized and pre-tokenized by the tokenizer's own components, then
        each word through the model alone, memoised."""
        normalizer, first_pre, rest_pre, segments = self._normalizer, self._first_pre, self._rest_pre, self._segments
        words_of = {}
        for piece in pieces:
            text, pre = (piece[0], first_pre) if isinstance(piece, tuple) else (piece, rest_pre)
            if normalizer is not None:
                text = normalizer.normalize_str(text)
            words = [w for w, _ in pre.pre_tokenize_str(text)] if pre is not None else [text]
            if segments is not None:
                words = [s for w in words for s in segments.split(w)]
            words_of[piece] = words
        word_memo = self._word_memo
        if len(word_memo) > WORD_MEMO_LIMIT:  # bounded: start over rather than track recency
            word_memo.clear()
        new_words = [w for w in set(chain.from_iterable(words_of.values())) if w not in word_memo]
        if new_words:
            encoded = self._model.encode_batch_fast(new_words, add_special_tokens=False)
            word_memo.update(zip(new_words, (e.ids for e in encoded), strict=True))
        get = word_memo.__getitem__
        return {piece: list(chain.from_iterable(map(get, words))) for piece, words in words_of.items()}


def exact_ids_tokenizer(tokenizer):
    """A copy of `tokenizer` whose plain call adds no special tokens: `tok(text)` == the rendered ids.

    Rendered prompts already hold what the template writes, BOS included. TRL (and any plain `GRPOTrainer`)
    calls `processing_class(text=prompts)` with the default `add_special_tokens=True`, which would add a second
    BOS. Emptying the fast tokenizer's post-processor (the step that inserts BOS/EOS) makes that call exact,
    without patching TRL. Save the original tokenizer with the model, not this copy.
    """
    import copy

    from tokenizers import processors

    from prefill_kit.errors import ConfigError

    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model.tokenizer: the TRL backend needs a fast tokenizer (tokenizer.json) so that "
                          "prompts are not given a second BOS")
    exact = copy.deepcopy(tokenizer)
    exact.backend_tokenizer.post_processor = processors.Sequence([])
    return exact


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
