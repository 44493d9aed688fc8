"""Benchmark: the ids stage alone, prefill-kit's `PromptTokenizer` vs whole-prompt batch tokenization.

    python benchmarks/ids_families.py [--rows 20000] [--repeats 7] [--families gpt2,qwen,...]

Per tokenizer it prints rows/s of both, their ratio and the route `PromptTokenizer` chose, with why. Tokenizers:
every family of tests/tokenizer_families.py, two of them with 6,400 added tokens (a Gemma-3-like vocabulary
built locally), and, where ../shared/reference is present, Qwen2.5, Mistral-7B-v0.3 and Gemma-3-like (Mistral
plus 6,400 added tokens, as benchmarks/render.py builds it).

Fair by construction: both sides encode the same rendered prompts in the pipeline's slices
(`BatchRenderer.SLICE` rows per call), in interleaved repeats (baseline, prefill-kit, baseline, ...), and the
ratio is the median of the per-repeat ratios, so load that comes and goes on the machine hits both alike. The
baseline is what a TRL user runs: `tokenizer(texts, add_special_tokens=False)["input_ids"]`. Each repeat
starts a new `PromptTokenizer` (an empty piece memo); the route is decided once per tokenizer and template in
a process, before the timed repeats, and its one-off cost is printed apart. Ids are asserted identical. For
information, the ratio to the baseline given all rows in one call (which the pipeline, tokenizing slice by slice
while it renders, never makes) is printed too.
Texts: GSM8K questions (../shared/reference) in each family's chat layout, or generated questions without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
PREFIX = "<think>\n"
CHATML = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n" \
         "<|im_start|>assistant\n" + PREFIX
INST = "<s>[INST] {q}[/INST]" + PREFIX


def gemma_like_tokens() -> list[str]:
    """6,400 added tokens shaped like Gemma-3's: `<unusedN>`, turn markers, HTML tags, whitespace runs."""
    tags = ("table", "tr", "td", "th", "thead", "tbody", "b", "i", "u", "p", "div", "span", "h1", "h2", "h3")
    return ([f"<unused{i}>" for i in range(6242)] + ["<start_of_turn>", "<end_of_turn>", "<start_of_image>",
            "<end_of_image>", "<image_soft_token>", "[@BOS@]", "<mask>"] + [f"<{t}>" for t in tags]
            + [f"</{t}>" for t in tags] + ["\n" * k for k in range(2, 32)] + [" " * k for k in range(2, 32)]
            + ["\t" * k for k in range(1, 32)] + ["▁" * k for k in range(2, 32)])


def with_added(tokenizer, tokens: list[str]):
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    return tokenizer


def questions(rows: int) -> list[str]:
    data = REFERENCE / "data" / "gsm8k" / "test.jsonl"
    if data.is_file():
        found = [json.loads(line)["question"] for line in data.read_text(encoding="utf-8").splitlines() if line]
    else:  # generated: word soup of GSM8K-like length
        import random

        rng = random.Random(0)
        words = "the of and to a in is how many apples did she have left after giving each friend 12 3.5 % $".split()
        found = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 70))) + "?" for _ in range(1319)]
    return [found[i % len(found)] for i in range(rows)]


def tokenizers_to_run(reference: bool):
    """(name, tokenizer, layout) where layout renders a question: a str.format pattern or a callable."""
    sys.path.insert(0, str(ROOT))
    from tests.tokenizer_families import FAMILIES, build

    for family in FAMILIES:
        yield family, (lambda f=family: build(f)), CHATML if family in ("gpt2", "qwen", "llama3") else INST
    yield "qwen+6400-added", lambda: with_added(build("qwen"), gemma_like_tokens()), CHATML
    yield "metaspace-first+6400-added", lambda: with_added(build("metaspace-first"), gemma_like_tokens()), INST
    if reference and (REFERENCE / "tokenizers").is_dir():
        from transformers import AutoTokenizer

        def real(directory: str, extra: bool = False):
            tokenizer = AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizers" / directory))
            if extra:
                with_added(tokenizer, gemma_like_tokens())
                template = REFERENCE / "templates" / "gemma-3-it.jinja"
                tokenizer.chat_template = template.read_text(encoding="utf-8")
            return tokenizer

        yield "Qwen2.5", lambda: real("qwen2.5-instruct-DERIVED"), None
        yield "Mistral-7B-v0.3", lambda: real("mistral-7b-instruct-v0.3"), None
        yield "Gemma-3-like", lambda: real("mistral-7b-instruct-v0.3", extra=True), None


def render(tokenizer, layout, qs: list[str]) -> list[str]:
    if layout is not None:
        return [layout.format(q=q) for q in qs]
    distinct = dict.fromkeys(qs)  # the chat template renders each distinct question once
    for q in distinct:
        distinct[q] = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True) + PREFIX
    return [distinct[q] for q in qs]


def ids_stage(name: str, tokenizer, texts: list[str], repeats: int) -> tuple[float, str]:
    """Print and return the ratio prefill-kit / baseline (rows/s) and the route."""
    from prefill_kit.prompts.batch import BatchRenderer
    from prefill_kit.prompts.tokens import PromptTokenizer

    size = BatchRenderer.SLICE
    slices = [texts[i:i + size] for i in range(0, len(texts), size)]

    def baseline() -> list[list[int]]:
        return [ids for s in slices for ids in tokenizer(s, add_special_tokens=False)["input_ids"]]

    def one_call() -> list[list[int]]:  # for information: all rows in one call, which the pipeline never makes
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def ours() -> list[list[int]]:
        encoder = PromptTokenizer(tokenizer)  # a new, empty memo; the route decided below is taken
        return [ids for s in slices for ids in encoder.encode(s)]

    start = time.perf_counter()
    decider = PromptTokenizer(tokenizer)
    decider.decide(texts)
    setup = time.perf_counter() - start
    expected = baseline()
    assert ours() == expected, f"{name}: ids differ"
    base_s, ours_s, one_s = [], [], []
    for _ in range(repeats):
        for fn, times in ((baseline, base_s), (ours, ours_s), (one_call, one_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratio = statistics.median(b / o for b, o in zip(base_s, ours_s, strict=True))
    versus_one = statistics.median(b / o for b, o in zip(one_s, ours_s, strict=True))
    print(f"{name:<32} {len(texts) / statistics.median(base_s):>9,.0f} {len(texts) / statistics.median(ours_s):>9,.0f}"
          f" {ratio:>6.2f}x {versus_one:>6.2f}x  {decider.route:<9} {decider.route_reason} (decided in "
          f"{setup * 1e3:.0f} ms)", flush=True)
    return ratio, decider.route


def run(rows: int, repeats: int, only: set[str] | None = None, reference: bool = True) -> float | None:
    """The ids stage on every tokenizer (those in `only`); the lowest ratio."""
    qs = questions(rows)
    print(f"\n== ids stage vs whole-prompt batch tokenization, {rows:,} rows in slices of the pipeline's size, "
          f"{repeats} interleaved repeats, ids identical")
    print(f"{'tokenizer':<32} {'baseline':>9} {'ours':>9} {'ratio':>7} {'1-call':>7}  route     why (rows/s; "
          "ratio: median of per-repeat ratios; 1-call: vs the baseline given all rows in one call, for information)")
    worst = None
    for name, make, layout in tokenizers_to_run(reference):
        if only and name not in only:
            continue
        tokenizer = make()
        ratio, _ = ids_stage(name, tokenizer, render(tokenizer, layout, qs), repeats)
        worst = ratio if worst is None else min(worst, ratio)
    if worst is not None:
        print(f"ids stage target: >= 1.0x on every tokenizer; lowest {worst:.2f}x", flush=True)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the median ratio is reported")
    parser.add_argument("--families", default="", help="comma-separated names to run (default: all)")
    args = parser.parse_args()
    run(args.rows, args.repeats, set(filter(None, args.families.split(","))))


if __name__ == "__main__":
    main()
