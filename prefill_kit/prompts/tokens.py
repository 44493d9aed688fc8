"""Token ids of rendered prompts, exact by construction and fast, and the prefix boundary audit.

A fast tokenizer (`tokenizers`) encodes a text in fixed stages:

1. it cuts the text at added tokens (`<|im_start|>`, `</s>`, ...), leftmost-longest;
2. it normalizes, pre-tokenizes and model-encodes each piece between them, alone.

So the ids of a text are its pieces' ids, in order, with each added token's id between them. Chat prompts
repeat the same template pieces on every row (the system prompt, `assistant\\n<think>\\n`, the newlines
between turns): `PromptTokenizer` cuts the text as stage 1 does, memoises the pieces that recur, and sends
only the new ones, in one batch, through the tokenizer's own backend (in Rust, without the GIL). It takes
this path only where the stages are provably the ones above; otherwise it encodes whole prompts. What stops
it (`piecewise_blocker`):

- an added token with `lstrip`, `rstrip` or `single_word` (it eats or checks the text around it), or a
  `normalized` one (it is matched after normalization, inside the pieces);
- special tokens encoded as text (`split_special_tokens=True`), truncation or padding set on the backend;
- a BPE model with dropout (random by design).

One step of stage 2 looks at the position: a Metaspace pre-tokenizer with `prepend_scheme="first"` prepends
its `▁` only to the piece at the very start of the text. A piece elsewhere is encoded by a copy of the
backend whose scheme is `"never"`, which is what `"first"` does at any other position.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import Any

from prefill_kit.errors import ConfigError

MEMO_LIMIT = 10_000  # distinct recurring pieces kept; template text needs a handful per template


def piecewise_blocker(tokenizer: Any) -> str | None:
    """Why prompts must be encoded whole with this tokenizer, or None when the piecewise path is exact."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return "not a fast (tokenizers) tokenizer"
    if backend.encode_special_tokens or getattr(tokenizer, "split_special_tokens", False):
        return "special tokens are encoded as text (split_special_tokens)"
    if backend.truncation is not None or backend.padding is not None:
        return "the backend truncates or pads"
    for token in backend.get_added_tokens_decoder().values():
        if token.lstrip or token.rstrip or token.single_word:
            return f"added token {token.content!r} strips or checks the text around it"
        if token.normalized:
            return f"added token {token.content!r} is matched after normalization"
    if getattr(backend.model, "dropout", None):
        return "BPE dropout makes encoding random"
    return None


def _never_first(step: dict) -> tuple[dict, bool]:
    """A pre-tokenizer config with each Metaspace `prepend_scheme: first` made `never`, and whether any was."""
    if step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first":
        return {**step, "prepend_scheme": "never"}, True
    if step.get("type") == "Sequence" and "pretokenizers" in step:
        steps = [_never_first(s) for s in step["pretokenizers"]]
        return {**step, "pretokenizers": [s for s, _ in steps]}, any(changed for _, changed in steps)
    return step, False


def rest_backend(backend: Any) -> Any:
    """The backend as it encodes a piece that does not start the text (module docstring): `backend` itself,
    or one whose Metaspace pre-tokenizers never prepend.

    That one shares the backend's model and normalizer (no copy of the vocabulary: copying Mistral's through
    JSON costs most of a second) and has no added tokens: the pieces it encodes hold none, as stage 1 cut
    them all out.
    """
    if backend.pre_tokenizer is None:
        return backend
    config, changed = _never_first(json.loads(backend.pre_tokenizer.__getstate__()))
    if not changed:
        return backend
    from tokenizers import Tokenizer, pre_tokenizers

    rest = Tokenizer(backend.model)
    if backend.normalizer is not None:
        rest.normalizer = backend.normalizer
    pre_tokenizer = pre_tokenizers.Whitespace()  # any pre-tokenizer object: its state is replaced by the config
    pre_tokenizer.__setstate__(json.dumps(config).encode())
    rest.pre_tokenizer = pre_tokenizer
    return rest


def _trie_pattern(tokens: frozenset[str]) -> str:
    """A regex matching, at a position, the longest of `tokens` that starts there: a trie of alternations in
    which a longer continuation is tried before a token ends. Searched left to right this is stage 1's
    leftmost-longest match, in time that grows with the tokens' length, not their number (the engine tries
    one branch per character, as each branch starts with another character)."""
    trie: dict = {}
    for token in tokens:
        node = trie
        for char in token:
            node = node.setdefault(char, {})
        node[None] = None  # a token ends here

    def after(node: dict) -> str:
        chain = ""
        while len(node) == 1 and None not in node:  # a run of single characters: one literal
            char, node = next(iter(node.items()))
            chain += re.escape(char)
        branches = [re.escape(char) + after(child) for char, child in node.items() if char is not None]
        if not branches:
            return chain
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return chain + ("(?:" + body + ")?" if None in node else body)  # greedy: the longer token first

    return after(trie)


_SPLITTERS: dict[Any, re.Pattern] = {}


def added_token_splitter(tokens: frozenset[str]) -> re.Pattern:
    """`splitter.split(text)` == [text, added token, text, ..., text] as stage 1 cuts `text` at `tokens`.

    Built once per set of added tokens in a process (compiling Gemma-3's 6,415 takes a tenth of a second)
    and inherited by forked workers.
    """
    key = tokens
    if key not in _SPLITTERS:
        if len(_SPLITTERS) >= 16:
            _SPLITTERS.clear()
        _SPLITTERS[key] = re.compile("(" + _trie_pattern(tokens) + ")")
    return _SPLITTERS[key]


def faster_route(whole: list[float], piecewise: list[float], margin: float) -> str:
    """The route to keep from interleaved rounds of CPU seconds of each on one sample: piecewise only where its
    best round beats whole's best by more than `margin` of it. Noise only adds time, so a route's best round is
    its least disturbed one (on a loaded machine, a per-round comparison flips more often); the margin gives a
    near tie to whole, which has no overhead over plain encoding, so the choice is never worse than that."""
    return "piecewise" if min(piecewise) < (1 - margin) * min(whole) else "whole"


def _chars(piece: str | tuple[str]) -> int:
    return len(piece[0]) if isinstance(piece, tuple) else len(piece)


# Decided routes: (id(tokenizer), recurring pieces) -> (weak reference to the tokenizer, route, reason).
_ROUTES: dict[tuple[int, frozenset], tuple[weakref.ref, str, str]] = {}


class PromptTokenizer:
    """`encode(texts)` == `tokenizer(texts, add_special_tokens=False)["input_ids"]`, by the faster of two exact
    routes: piecewise (module docstring) or whole texts through the backend. `route` says which, `route_reason`
    why.

    Both give the same ids; only their speed differs with the tokenizer and the template. Pieces that recur
    (Qwen's system prompt) make piecewise faster; a template that folds everything into one new piece per row
    (Mistral) makes it pay for cutting and bookkeeping with nothing saved. The route is decided once, on the
    first batch of at least `CALIBRATE_ROWS` texts (`decide`), and kept for good: by this encoder, by its
    pickled copies, and by any encoder of the same tokenizer object and template in this process or a process
    forked from it (`_ROUTES`).

    Two threads may encode at once (the render pipeline tokenizes on two): the backend encodes under a shared
    borrow, the memo only ever gains complete entries, and the route is decided before any second thread runs.
    """

    CALIBRATE_ROWS = 128
    CALIBRATE_ROUNDS = 3
    MARGIN = 0.05  # the share of whole's CPU time piecewise must save to be kept
    ROUTES = ("piecewise", "whole")

    def __init__(self, tokenizer: Any, route: str | None = None) -> None:
        """`route` fixes the route (tests, benchmarks) instead of deciding it."""
        self.tokenizer = tokenizer
        self.blocker = piecewise_blocker(tokenizer)
        self._memo: dict[Any, list[int]] = {}
        self.timings: dict[str, float] = {}  # best CPU seconds of each route on the sample, when measured
        self._fixed = route
        self._plain_lock = threading.Lock()  # transformers' call may set the backend's truncation: one at a time
        if route is not None and (route not in self.ROUTES or self.blocker is not None):
            raise ValueError(f"route {route!r}: expected one of {self.ROUTES}, on a tokenizer without a blocker "
                             f"(this one: {self.blocker})")
        self.route = f"whole: {self.blocker}" if self.blocker is not None else route  # None: not yet decided
        self.route_reason = self.blocker or ("fixed by the caller" if route is not None else None)
        if self.blocker is not None:
            return
        backend = tokenizer.backend_tokenizer
        self._first = backend
        self._rest = rest_backend(backend)
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.content}
        self._added_lists = {t: [i] for t, i in added.items()}
        self._split = added_token_splitter(frozenset(added)) if added else None

    def __getstate__(self) -> dict:
        # The memo is a cache; a decided route is kept, so that a pickled copy (a worker) does not decide again.
        decided = None if self.blocker is not None else self.route
        return {"tokenizer": self.tokenizer, "route": self._fixed, "decided": (decided, self.route_reason)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"], state.get("route"))
        decided, reason = state.get("decided", (None, None))
        if self.blocker is None and decided is not None:
            self.route, self.route_reason = decided, reason

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without added BOS/EOS (the template wrote whatever it wanted)."""
        if not texts:
            return []
        if self.blocker is not None:
            with self._plain_lock:
                return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if self.route is None and len(texts) >= self.CALIBRATE_ROWS:
            self.decide(texts)
        if self.route == "whole":
            return self._whole(texts)
        return self._piecewise(texts)

    def decide(self, texts: list[str]) -> str:
        """Decide the route for good on the first `CALIBRATE_ROWS` of `texts` (prompts like those to come).

        Piecewise saves at most the encoding of the text that recurs (template pieces), so where that is less
        than `MARGIN` of the characters, whole is kept unmeasured. Otherwise both routes are timed in
        interleaved rounds of CPU time (which other processes move less than wall time), and piecewise is kept
        only where its best round saves more than `MARGIN` of whole's best (`faster_route`): a near tie goes to
        whole, which costs what plain encoding costs.

        The decision is stored per tokenizer object and set of recurring pieces (the template), so another
        encoder of both in this process takes it without measuring, and so does a worker forked after it: call
        this in the parent before forking workers.
        """
        if self.route is not None:
            return self.route
        sample = list(texts[: self.CALIBRATE_ROWS])
        counts = self._piece_counts(self._cut(sample))
        recurring = frozenset(p for p, n in counts.items() if n > 1)
        key = (id(self.tokenizer), recurring)
        known = _ROUTES.get(key)
        if known is not None and known[0]() is self.tokenizer:
            self.route, self.route_reason = known[1], f"decided earlier in this process ({known[2]})"
            return self.route
        total = sum(_chars(p) * n for p, n in counts.items())
        share = sum(_chars(p) * counts[p] for p in recurring) / total if total else 0.0
        if share < self.MARGIN:
            route, reason = "whole", f"recurring text is {share:.0%} of the characters: piecewise cannot save enough"
        else:
            route, reason = self._measure(sample)
        if len(_ROUTES) >= 64:
            _ROUTES.clear()
        _ROUTES[key] = (weakref.ref(self.tokenizer), route, reason)
        self.route, self.route_reason = route, reason
        return route

    def _measure(self, sample: list[str]) -> tuple[str, str]:
        """Both routes timed on `sample` in interleaved rounds; the route to keep (`faster_route`) and why."""
        self._piecewise(sample)  # fills the memo, as later batches find it
        rounds: dict[str, list[float]] = {"whole": [], "piecewise": []}
        for _ in range(self.CALIBRATE_ROUNDS):
            for name, encode in (("whole", self._whole), ("piecewise", self._piecewise)):
                start = time.process_time()
                encode(sample)
                rounds[name].append(time.process_time() - start)
        self.timings = {name: min(seconds) for name, seconds in rounds.items()}
        return (faster_route(rounds["whole"], rounds["piecewise"], self.MARGIN),
                f"measured: piecewise {self.timings['piecewise'] * 1e3:.1f} ms, whole {self.timings['whole'] * 1e3:.1f}"
                f" ms CPU, the best of {self.CALIBRATE_ROUNDS} interleaved rounds on {len(sample)} rows")

    def _whole(self, texts: list[str]) -> list[list[int]]:
        # What `tokenizer(texts)` runs, without transformers' per-row conversion into a BatchEncoding.
        return [e.ids for e in self._first.encode_batch_fast(list(texts), add_special_tokens=False)]

    def _cut(self, texts: list[str]) -> list[list]:
        """Each text as [text, added token, text, ..., text]; a 1-tuple marks a piece that starts the text where
        that is encoded differently (Metaspace "first")."""
        split = self._split
        parts = [split.split(t) if split is not None else [t] for t in texts]
        if self._rest is not self._first:
            for pieces in parts:
                if pieces[0]:
                    pieces[0] = (pieces[0],)
        return parts

    @staticmethod
    def _piece_counts(parts: list[list]) -> Counter:
        counts = Counter(chain.from_iterable(pieces[::2] for pieces in parts))
        counts.pop("", None)
        return counts

    def _piecewise(self, texts: list[str]) -> list[list[int]]:
        # Per-row work stays in C (split, chain, map over one lookup table): Python loops run per distinct piece.
        memo = self._memo
        parts = self._cut(texts)
        counts = self._piece_counts(parts)
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
        """Ids of distinct text pieces, each encoded alone by the backend (the copy for pieces not at the start)."""
        first = [p for p in pieces if isinstance(p, tuple)]
        rest = [p for p in pieces if not isinstance(p, tuple)]
        ids = {}
        for backend, group, texts in ((self._first, first, [p[0] for p in first]), (self._rest, rest, rest)):
            if group:
                encoded = backend.encode_batch_fast(texts, add_special_tokens=False)
                ids.update(zip(group, (e.ids for e in encoded), strict=True))
        return ids


def exact_ids_tokenizer(tokenizer):
    """A copy of `tokenizer` whose plain call adds no special tokens: `tok(text)` == the rendered ids.

    Rendered prompts already hold what the template writes, BOS included. TRL (and any plain `GRPOTrainer`)
    calls `processing_class(text=prompts)` with the default `add_special_tokens=True`, which would add a second
    BOS. Emptying the fast tokenizer's post-processor (the step that inserts BOS/EOS) makes that call exact,
    without patching TRL. Save the original tokenizer with the model, not this copy.
    """
    import copy

    from tokenizers import processors

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
