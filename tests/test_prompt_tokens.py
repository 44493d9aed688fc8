"""`PromptTokenizer.encode` equals whole-prompt encoding, on every tokenizer family, by construction."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken

from prefill_kit.prompts.tokens import PromptTokenizer, added_token_splitter, piecewise_blocker
from tests.conftest import REFERENCE_ABSENT, SHARED_REFERENCE
from tests.tokenizer_families import CHATML, FAMILIES, SENTENCEPIECE, build, random_texts

TOKENIZERS = SHARED_REFERENCE / "tokenizers"
NEEDS_REFERENCE = pytest.mark.skipif(not TOKENIZERS.is_dir(),
                                     reason=f"needs the real tokenizers in {TOKENIZERS} ({REFERENCE_ABSENT})")


def whole(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_in_batches(encoder: PromptTokenizer, texts: list[str], size: int = 250) -> list[list[int]]:
    """Several batches, so that later ones hit the piece memo that earlier ones filled."""
    return [ids for i in range(0, len(texts), size) for ids in encoder.encode(texts[i:i + size])]


def specials_of(tokenizer) -> tuple[str, ...]:
    return CHATML if "<|im_start|>" in tokenizer.get_vocab() else SENTENCEPIECE


@pytest.mark.parametrize("family", FAMILIES)
def test_piecewise_equals_whole_on_random_text(family):
    tokenizer = build(family)
    encoder = PromptTokenizer(tokenizer, route="piecewise")
    assert encoder.blocker is None  # the piecewise path is the one under test
    # Template-like texts repeat (the piece memo), random ones mix every edge case (new pieces).
    texts = random_texts(3000, seed=FAMILIES.index(family), specials=specials_of(tokenizer))
    texts += [f"{s}user\nsame template text{s}assistant\n<think>\n" for s in specials_of(tokenizer)] * 20
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)
    assert encoder._memo  # recurring pieces were memoised, not bypassed
    # Metaspace "first" families encode pieces after an added token with the "never" copy.
    assert (encoder._rest is not encoder._first) == (family in ("metaspace-first", "metaspace-first-merging",
                                                                 "unigram"))


def test_metaspace_first_prepends_only_at_the_start_of_the_text():
    # The bug this guards: a piece after an added token encoded alone gets "▁" prepended ("▁<" instead of "<").
    tokenizer = build("metaspace-first")
    texts = ["[/INST]<think>\n", "<think>\n", "[INST]x", "x[INST]x", " x"]
    assert PromptTokenizer(tokenizer, route="piecewise").encode(texts) == whole(tokenizer, texts)
    after, alone = whole(tokenizer, texts[:2])
    assert after[1:] != alone  # the same text tokenizes differently after an added token than alone


@pytest.mark.parametrize("kind", ["special", "plain", "normalized", "lstrip", "rstrip", "single_word"])
@pytest.mark.parametrize("family", ["qwen", "metaspace-first"])
def test_added_tokens_of_every_kind(family, kind):
    tokenizer = build(family)
    options = {"special": {}, "plain": {}, "normalized": {"normalized": True}, "lstrip": {"lstrip": True},
               "rstrip": {"rstrip": True}, "single_word": {"single_word": True}}[kind]
    token = AddedToken("<think>", special=kind == "special", normalized=options.pop("normalized", False), **options)
    tokenizer.add_tokens([token], special_tokens=kind == "special")
    exact_piecewise = kind in ("special", "plain")
    encoder = PromptTokenizer(tokenizer, route="piecewise" if exact_piecewise else None)
    assert (encoder.blocker is None) == exact_piecewise, encoder.blocker
    texts = random_texts(1500, seed=7, specials=specials_of(tokenizer)) + ["a <think> b", "<think>x", "x<think>"]
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)


def test_special_tokens_encoded_as_text_are_encoded_whole():
    tokenizer = build("qwen")
    tokenizer.backend_tokenizer.encode_special_tokens = True
    assert piecewise_blocker(tokenizer) is not None
    texts = ["<|im_start|>user\nhi<|im_end|>"]
    assert PromptTokenizer(tokenizer).encode(texts) == whole(tokenizer, texts)


@NEEDS_REFERENCE
@pytest.mark.parametrize("name", ["mistral-7b-instruct-v0.3", "qwen2.5-instruct-DERIVED", "qwen3-DERIVED"])
def test_piecewise_equals_whole_on_real_tokenizers(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    encoder = PromptTokenizer(tokenizer, route="piecewise")
    assert encoder.blocker is None
    specials = ("<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
    texts = random_texts(2000, seed=11, specials=specials)
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)


@NEEDS_REFERENCE
def test_normalized_added_token_on_qwen():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2.5-instruct-DERIVED")
    tokenizer.add_tokens(["<think>"])  # transformers adds non-special tokens as normalized
    texts = ["<|im_start|>assistant\n<think>\nok", "a<think>b"] + random_texts(300, seed=3, specials=("<think>",))
    assert PromptTokenizer(tokenizer).encode(texts) == whole(tokenizer, texts)


PREFIXES = ["", "<think>\n", "> quoted", "\nStep 1", " ", "]] ok", "</s>", "<|im_end|>"]


def render_rows(template: str, tokenizer, n: int, seed: int):
    """Rendered rows with random content (special-token text included) and random per-row prefixes."""
    import random

    from datasets import Dataset

    from prefill_kit.prompts.dataset import render_dataset

    rng = random.Random(seed)
    contents = random_texts(n, seed=seed, specials=specials_of(tokenizer) + ("</s>", "<|im_end|>"))
    rows = [{"messages": [{"role": "user", "content": c or "x"}], "prefix": rng.choice(PREFIXES)} for c in contents]
    return render_dataset(Dataset.from_list(rows), template=template, tokenizer=tokenizer)


@pytest.mark.parametrize(("family", "template"), [("metaspace-first", "mistral"), ("qwen", "chatml"),
                                                  ("unigram", "llama3"), ("gpt2", "phi4")])
def test_rendered_rows_have_whole_prompt_ids(family, template):
    tokenizer = build(family)
    out = render_rows(template, tokenizer, 600, seed=5)
    assert list(out["prompt_ids"]) == whole(tokenizer, list(out["prompt"]))


@NEEDS_REFERENCE
def test_rendered_rows_have_whole_prompt_ids_on_mistral():
    # As reported: 40 plain rows, then a row with a per-row prefix, then content holding "</s>".
    from datasets import Dataset
    from transformers import AutoTokenizer

    from prefill_kit.prompts.dataset import render_dataset

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "mistral-7b-instruct-v0.3")
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(40)]
    rows += [{"messages": [{"role": "user", "content": "q"}], "prefix": "<think>\n"},
             {"messages": [{"role": "user", "content": "a </s> b"}]}]
    out = render_dataset(Dataset.from_list(rows), tokenizer=tokenizer)
    assert list(out["prompt_ids"]) == whole(tokenizer, list(out["prompt"]))
    out = render_rows(None, tokenizer, 400, seed=9)
    assert list(out["prompt_ids"]) == whole(tokenizer, list(out["prompt"]))


# Many added tokens (Gemma-3 has 6,415): the cutter is a trie-shaped pattern, exact leftmost-longest.

def flat_splitter(tokens):
    """The plain reference: one alternation, longest first (what stage 1 picks at one position)."""
    import re

    return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")")


MANY = ([f"<unused{i}>" for i in range(3000)] + [f"<unused{i}" for i in range(0, 3000, 7)]  # prefixes of others
        + ["ab", "abc", "abcd", "bcd", "cd", "b", "<", "<t", "<th", "<think", "<think>", "\n\n", "\n\n\n", "  ",
           "XY", "YZ", "XYZ 0", "é", "e\u0301", "\u4f60\u597d", "\U0001f600x", "ll", "'ll", "[/", "]]"])


def many_added(family: str, tokens=MANY):
    tokenizer = build(family)
    tokenizer.add_tokens([AddedToken(t, special=i % 2 == 0, normalized=False) for i, t in enumerate(tokens)],
                         special_tokens=False)
    return tokenizer


@pytest.mark.parametrize(("tokens", "text", "pieces"), [
    ({"ab", "abc", "bcd"}, "abcd", ["", "abc", "d"]),  # the longest at the leftmost position, not "a"+"bcd"
    ({"ab", "abcd"}, "abcx", ["", "ab", "cx"]),  # a longer candidate fails: back to the shorter one
    ({"bc", "abcd"}, "abce", ["a", "bc", "e"]),  # none at 0: the next position
    ({"b", "abc"}, "abcb", ["", "abc", "", "b", ""]),
    ({"aa"}, "aaa", ["", "aa", "a"]),  # non-overlapping, left to right
    ({"<a>", "<a", "a>"}, "<<a>>", ["<", "<a>", ">"]),
])
def test_splitter_is_leftmost_longest(tokens, text, pieces):
    assert added_token_splitter(frozenset(tokens)).split(text) == pieces
    assert flat_splitter(tokens).split(text) == pieces


def test_splitter_equals_the_flat_alternation_on_random_text():
    texts = random_texts(3000, seed=19, specials=tuple(MANY[-40:]) + ("<unused12>", "<unused123", "<unused2999>"))
    fast, slow = added_token_splitter(frozenset(MANY)), flat_splitter(MANY)
    assert [fast.split(t) for t in texts] == [slow.split(t) for t in texts]


def test_splitter_is_cached_per_set_of_tokens():
    # Built once per set in a process (forked workers inherit it); another set, even of equal size, is another.
    first = added_token_splitter(frozenset({"<a>", "<b>"}))
    assert added_token_splitter(frozenset({"<b>", "<a>"})) is first
    other = added_token_splitter(frozenset({"<a>", "<c>"}))
    assert other.split("x<c>y") == ["x", "<c>", "y"] and first.split("x<c>y") == ["x<c>y"]


@pytest.mark.parametrize("route", ["piecewise", "whole"])
@pytest.mark.parametrize("family", ["qwen", "metaspace-first", "unigram"])
def test_many_added_tokens_encode_as_whole(family, route):
    tokenizer = many_added(family)
    specials = tuple(MANY[-30:]) + ("<unused5>", "<unused1234>", "<unused29", "<|im_end|>", "</s>")
    texts = random_texts(2000, seed=23, specials=specials)
    texts += [f"<unused7>user\nsame template text<unused8>assistant\n<think>\n{t}" for t in texts[:300]]
    encoder = PromptTokenizer(tokenizer, route=route)
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)


def test_tokenizers_with_equally_many_added_tokens_do_not_share_a_cutter():
    one = many_added("qwen", [f"<u{i}>" for i in range(500)])
    two = many_added("qwen", [f"<v{i}>" for i in range(500)])
    texts = ["<u1>x<v1>y", "<v2><u2>"] * 40
    for tokenizer in (one, two, one):
        assert PromptTokenizer(tokenizer, route="piecewise").encode(texts) == whole(tokenizer, texts)


@pytest.mark.parametrize("family", ["qwen", "metaspace-first"])
def test_the_route_is_measured_once_and_both_are_exact(family):
    tokenizer = build(family)
    encoder = PromptTokenizer(tokenizer)
    texts = random_texts(600, seed=29, specials=specials_of(tokenizer))
    # Template text that recurs on every row, as a chat template writes it: the route is measured on such rows.
    opening = "<|im_start|>" if family == "qwen" else "[INST]"
    texts = [f"{opening}system\nYou are a careful assistant; think step by step.{opening}user\n{t}" for t in texts]
    few = PromptTokenizer.CALIBRATE_ROWS - 1
    assert encoder.encode(texts[:few]) == whole(tokenizer, texts[:few])
    assert encoder.route is None  # too few rows to measure
    assert encoder.encode(texts[:200]) == whole(tokenizer, texts[:200])
    assert encoder.route in PromptTokenizer.ROUTES and set(encoder.timings) == set(PromptTokenizer.ROUTES)
    assert encoder.route_reason.startswith("measured")
    decided = encoder.route
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)
    assert encoder.route == decided
    for route in PromptTokenizer.ROUTES:  # either choice gives the same ids
        assert encode_in_batches(PromptTokenizer(tokenizer, route=route), texts) == whole(tokenizer, texts)


def test_a_route_cannot_be_forced_past_a_blocker():
    tokenizer = build("qwen")
    tokenizer.add_tokens([AddedToken("<think>", lstrip=True, normalized=False)])
    with pytest.raises(ValueError, match="blocker"):
        PromptTokenizer(tokenizer, route="piecewise")
    assert PromptTokenizer(tokenizer).route.startswith("whole: ")


def test_split_special_tokens_set_on_the_tokenizer_blocks_the_cut():
    # transformers copies `split_special_tokens` onto the backend at each call, not before the first.
    tokenizer = build("qwen")
    tokenizer.split_special_tokens = True
    assert not tokenizer.backend_tokenizer.encode_special_tokens
    encoder = PromptTokenizer(tokenizer)
    assert encoder.blocker is not None
    texts = ["<|im_start|>user\nhi<|im_end|>"] * 70
    assert encoder.encode(texts) == whole(tokenizer, texts)
    assert whole(tokenizer, texts[:1])[0] != whole(build("qwen"), texts[:1])[0]


@pytest.mark.parametrize("route", ["piecewise", "whole"])
def test_a_bos_adding_post_processor_adds_nothing_on_either_route(route):
    from tokenizers import processors

    tokenizer = many_added("metaspace-first")
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    texts = random_texts(300, seed=31, specials=("<s>", "[INST]", "<unused9>", "abc"))
    assert tokenizer(texts[:5])["input_ids"][0][0] == bos  # the plain call would add it
    assert encode_in_batches(PromptTokenizer(tokenizer, route=route), texts) == whole(tokenizer, texts)
# --- exactness edges of the tokenizer library itself (issue 20) ------------------------------------------------

@pytest.mark.parametrize("family", ["qwen", "metaspace-first"])
@pytest.mark.parametrize("route", PromptTokenizer.ROUTES)
def test_an_added_token_that_is_a_prefix_of_another_loses_to_the_longer(family, route):
    # Stage 1 matches leftmost-longest: "<tool>call" is one token, not "<tool>" then "call". Dictionary order
    # would try the shorter one first.
    tokenizer = build(family)
    tokenizer.add_tokens([AddedToken("<tool>", special=True, normalized=False),
                          AddedToken("<tool>call", special=True, normalized=False)], special_tokens=True)
    encoder = PromptTokenizer(tokenizer, route=route)
    assert encoder.blocker is None
    texts = ["<tool>call", "x<tool>callx", "<tool>cal", "<tool><tool>call<tool>"]
    texts += random_texts(600, seed=21, specials=("<tool>", "<tool>call", "call", *specials_of(tokenizer)))
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)
    [ids] = whole(tokenizer, ["<tool>call"])
    assert ids == [tokenizer.convert_tokens_to_ids("<tool>call")]  # the case the test is about


@pytest.mark.parametrize("family", ["qwen", "metaspace-first"])
@pytest.mark.parametrize("route", PromptTokenizer.ROUTES)
def test_overlapping_added_tokens_match_leftmost_first(family, route):
    # "<x" and "x>" overlap in "<x>": the leftmost match wins, whichever is longer or added first.
    tokenizer = build(family)
    tokenizer.add_tokens([AddedToken("x>", special=True, normalized=False),
                          AddedToken("<x", special=True, normalized=False),
                          AddedToken("<x>yz", special=True, normalized=False)], special_tokens=True)
    encoder = PromptTokenizer(tokenizer, route=route)
    assert encoder.blocker is None
    texts = ["<x>", "a<x>b", "<x>y", "<x>yz", "<<x>>", "x><x"]
    texts += random_texts(600, seed=22, specials=("<x", "x>", "<x>yz", "y", "z", *specials_of(tokenizer)))
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)


@pytest.mark.parametrize("steps", ["metaspace", "digits+metaspace", "nested"])
@pytest.mark.parametrize("route", PromptTokenizer.ROUTES)
def test_metaspace_first_inside_a_sequence(steps, route):
    # The copy that encodes pieces after an added token must make every Metaspace "first" inside a Sequence
    # "never", or it prepends "▁" where the whole-text encoding does not.
    from tokenizers import pre_tokenizers

    metaspace = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tokenizer = build("metaspace-first")
    tokenizer.backend_tokenizer.pre_tokenizer = {
        "metaspace": pre_tokenizers.Sequence([metaspace]),
        "digits+metaspace": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), metaspace]),
        "nested": pre_tokenizers.Sequence([pre_tokenizers.Sequence([metaspace])]),
    }[steps]
    encoder = PromptTokenizer(tokenizer, route=route)
    assert encoder.blocker is None and encoder._rest is not encoder._first
    texts = ["[INST]<think>\n", "<think>\n", "x[INST]x", "[/INST] answer 12"]
    texts += random_texts(800, seed=23, specials=SENTENCEPIECE)
    assert encode_in_batches(encoder, texts) == whole(tokenizer, texts)


def test_padding_on_the_backend_is_encoded_whole():
    tokenizer = build("qwen")
    tokenizer.backend_tokenizer.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    encoder = PromptTokenizer(tokenizer)
    assert encoder.blocker == "the backend truncates or pads"
    texts = ["<|im_start|>user\nhi<|im_end|>", "a much longer text than the first one", "b"]
    got = encoder.encode(texts)  # before `whole`, which turns the backend's padding off
    assert got == whole(tokenizer, texts)
    assert tokenizer.pad_token_id not in got[2]


def test_bpe_dropout_is_encoded_whole_and_stays_random():
    tokenizer = build("gpt2")
    tokenizer.backend_tokenizer.model.dropout = 0.5
    encoder = PromptTokenizer(tokenizer)
    assert encoder.blocker == "BPE dropout makes encoding random"
    # A recurring text: the piecewise path would memoise one sampling for every row; dropout samples each row.
    ids = encoder.encode(["the same template text, repeated on every row of the batch"] * 40)
    assert len({tuple(i) for i in ids}) > 1
