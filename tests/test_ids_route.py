"""How `PromptTokenizer` picks its ids route: a stable rule, decided once, inherited by copies and forked workers.

Either route gives the same ids (tests/test_prompt_tokens.py); these tests are about when the route is measured,
what wins, and that a worker never measures what its parent decided.
"""

from __future__ import annotations

import pickle

import pytest

from prefill_kit.prompts.stream import ordered_map
from prefill_kit.prompts.tokens import PromptTokenizer, faster_route
from tests.tokenizer_families import build, random_texts

SYSTEM = "You are a careful assistant. Think step by step, then give the final answer on its own line."


def chat(texts: list[str], system: str = SYSTEM) -> list[str]:
    """ChatML prompts whose template text (system prompt, role names, the assistant opening) recurs."""
    return [f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n"
            "<think>\n" for t in texts]


def refuse_to_measure(self, sample):
    raise AssertionError("the route was measured")


@pytest.fixture
def measured(monkeypatch) -> list[int]:
    """Counts `PromptTokenizer._measure` calls (each still measures)."""
    calls: list[int] = []
    measure = PromptTokenizer._measure

    def counted(self, sample):
        calls.append(len(sample))
        return measure(self, sample)

    monkeypatch.setattr(PromptTokenizer, "_measure", counted)
    return calls


def test_piecewise_is_kept_only_when_its_best_round_wins_by_the_margin():
    assert faster_route([1.0], [0.9], margin=0.05) == "piecewise"
    assert faster_route([1.0], [0.97], margin=0.05) == "whole"  # a near tie goes to whole (no overhead)
    assert faster_route([1.0], [1.0], margin=0.0) == "whole"
    assert faster_route([1.0], [1.2], margin=0.05) == "whole"
    # Each route's best round counts: noise (a slow round) only adds time, on either side.
    assert faster_route([3.0, 1.0, 2.5], [0.9, 4.0, 0.95], margin=0.05) == "piecewise"
    assert faster_route([1.0, 5.0], [0.99, 0.98], margin=0.05) == "whole"


def test_little_recurring_text_is_encoded_whole_without_measuring(monkeypatch):
    # Mistral-like: all of a row is one new piece between added tokens; only "<think>\n" recurs, a few percent
    # of the characters, less than piecewise would have to save. No timing, so no run-to-run flip.
    monkeypatch.setattr(PromptTokenizer, "_measure", refuse_to_measure)
    tokenizer = build("metaspace-always")
    rows = random_texts(400, seed=41, specials=())
    texts = [f"<s>[INST] {' '.join(rows[i:i + 6])}[/INST]<think>\n" for i in range(300)]
    encoder = PromptTokenizer(tokenizer)
    assert encoder.encode(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert encoder.route == "whole" and encoder.timings == {}
    assert "recurring text" in encoder.route_reason


def test_the_route_is_decided_once_per_tokenizer_and_template(measured):
    tokenizer = build("qwen")
    texts = chat(random_texts(300, seed=43, specials=()))
    first = PromptTokenizer(tokenizer)
    first.encode(texts)
    assert measured == [PromptTokenizer.CALIBRATE_ROWS] and first.route in PromptTokenizer.ROUTES
    again = PromptTokenizer(tokenizer)  # another encoder, same tokenizer and template: no second measurement
    assert again.encode(texts[:200]) == tokenizer(texts[:200], add_special_tokens=False)["input_ids"]
    assert again.route == first.route and again.timings == {} and again.route_reason.startswith("decided earlier")
    assert len(measured) == 1
    # Another template (its recurring text differs) or another tokenizer is decided on its own.
    PromptTokenizer(tokenizer).encode(chat(random_texts(300, seed=44, specials=()), system="Answer briefly."))
    PromptTokenizer(build("qwen")).encode(texts)
    assert len(measured) == 3


def test_a_pickled_encoder_keeps_its_decided_route(monkeypatch):
    tokenizer = build("qwen")
    texts = chat(random_texts(300, seed=45, specials=()))
    encoder = PromptTokenizer(tokenizer)
    encoder.encode(texts)
    monkeypatch.setattr(PromptTokenizer, "_measure", refuse_to_measure)
    copy = pickle.loads(pickle.dumps(encoder))  # a datasets.map or spawned worker gets a copy like this one
    assert (copy.route, copy.route_reason) == (encoder.route, encoder.route_reason)
    assert copy.encode(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    fixed = pickle.loads(pickle.dumps(PromptTokenizer(tokenizer, route="whole")))
    assert fixed.route == "whole" and fixed._fixed == "whole"


class _WorkerEncodes:
    """Forked worker: encodes with the encoder it inherited and with a new one, where measuring raises."""

    def __init__(self, encoder: PromptTokenizer, texts: list[str]) -> None:
        self.encoder, self.texts = encoder, texts

    def __call__(self, index: int):
        PromptTokenizer._measure = refuse_to_measure  # this process only: it is a forked worker
        fresh = PromptTokenizer(self.encoder.tokenizer)
        ids = [encoder.encode(self.texts) for encoder in (self.encoder, fresh)]
        return index, self.encoder.route, fresh.route, fresh.route_reason, ids


def test_forked_workers_take_the_parents_route_without_measuring():
    tokenizer = build("llama3")
    texts = chat(random_texts(300, seed=47, specials=()))
    encoder = PromptTokenizer(tokenizer)
    encoder.decide(texts)  # in the parent, before the workers fork
    assert encoder.route in PromptTokenizer.ROUTES
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    results = list(ordered_map(_WorkerEncodes(encoder, texts), range(2), num_proc=2))
    assert [r[0] for r in results] == [0, 1]
    for _, inherited, fresh, reason, ids in results:
        assert inherited == fresh == encoder.route and reason.startswith("decided earlier")
        assert ids == [expected, expected]


@pytest.mark.parametrize("front", ["render_file", "render_dataset"])
def test_render_measures_the_route_once_in_the_parent_and_its_workers_fork_with_it(front, monkeypatch, tmp_path,
                                                                                     chatml):
    """The parent renders the input's first rows before the pool forks (`stream.decide_ids_route`), so the route
    is measured once, there; a worker that measured would raise here, and the output is the one-process one."""
    import json
    import os

    import datasets

    from prefill_kit.prompts.dataset import render_dataset
    from prefill_kit.prompts.options import RenderOptions
    from prefill_kit.prompts.render_file import render_file
    from prefill_kit.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(chat_template=chatml.source)  # a fresh one: no decision kept from other tests
    parent, calls = os.getpid(), []
    measure = PromptTokenizer._measure

    def only_in_the_parent(self, sample):
        if os.getpid() != parent:
            raise AssertionError("a forked worker measured the ids route")
        calls.append(len(sample))
        return measure(self, sample)

    monkeypatch.setattr(PromptTokenizer, "_measure", only_in_the_parent)
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {i} + 7?"}]}
            for i in range(600)]
    if front == "render_file":
        source = tmp_path / "in.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        render_file(source, str(tmp_path / "out.jsonl"), RenderOptions(chatml, "<think>\n", tokenizer=tokenizer),
                    num_proc=2, batch_size=300)
        ids = [json.loads(line)["prompt_ids"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    else:
        out = render_dataset(datasets.Dataset.from_list(rows), chatml, tokenizer, "<think>\n", num_proc=2,
                             batch_size=100)
        ids = out["prompt_ids"]
    assert calls == [PromptTokenizer.CALIBRATE_ROWS]
    prompts = [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is {i} + 7?<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n" for i in range(600)]
    assert ids == tokenizer(prompts, add_special_tokens=False)["input_ids"]
