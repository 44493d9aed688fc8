"""Benchmark: render + tokenize GSM8K-size conversations, prefill-kit vs the `datasets.map` a TRL user writes.

    python benchmarks/render.py [--rows 100000] [--num-proc 2] [--rss-rows 1000000] [--tokenizers Qwen2.5,...]

Same process, same rows, outputs asserted identical (prompt text and prompt ids). Prints rows/s for
the baseline (per-example and batched `datasets.map` with `apply_chat_template(..., tokenize=False,
add_generation_prompt=True) + prefix`, then the tokenizer with `add_special_tokens=False`), for
`prefill_kit.render_dataset` in one process and with `--num-proc`, and the floor: batch-tokenizing
the already rendered texts alone. `--rss-rows` also renders a generated JSON Lines file of that many
rows with `prefill-kit render` in a child process and reports its peak RSS.

Runs on the Qwen2.5 (byte-level BPE) and Mistral-7B-v0.3 (SentencePiece-style Metaspace) tokenizers.
Needs ../shared/reference (GSM8K test set, the tokenizers); exits with a message where it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
PREFIX = "<think>\n"


def timed(label: str, fn, rows: int, results: dict):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    results[label] = rows / seconds
    print(f"{label:<44} {rows / seconds:>10,.0f} rows/s  ({seconds:.2f} s)", flush=True)
    return out


def column(dataset, name: str) -> list:
    return dataset.data.column(name).to_pylist()


def baseline_per_example(dataset, tokenizer):
    def fn(example):
        prompt = tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)
        prompt += PREFIX
        return {"prompt": prompt, "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]}

    return dataset.map(fn, remove_columns=["messages"])


def baseline_batched(dataset, tokenizer):
    def fn(batch):
        prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + PREFIX
                   for m in batch["messages"]]
        return {"prompt": prompts, "prompt_ids": tokenizer(prompts, add_special_tokens=False)["input_ids"]}

    return dataset.map(fn, batched=True, remove_columns=["messages"])


def peak_rss_of_cli(rows: list[dict], n: int, tokenizer_dir: Path, num_proc: int) -> None:
    """Write n rows to a JSON Lines file, render it with the CLI in a child, report the child's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "big.jsonl"
        with open(source, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(rows[i % len(rows)], ensure_ascii=False) + "\n")
        size = source.stat().st_size
        for procs in sorted({1, num_proc}):
            output = Path(tmp) / f"big.{procs}.prefilled.jsonl"
            command = [sys.executable, "-m", "prefill_kit", "render", str(source), "-o", str(output), "--quiet",
                       "--tokenizer", str(tokenizer_dir), "--prefix", r"<think>\n", "--num-proc", str(procs)]
            code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(done.stderr)
            peak_mib = int(done.stdout.split()[-1]) / 1024
            print(f"CLI {n:,} rows ({size / 2**20:,.0f} MiB JSONL), --num-proc {procs}: {n / seconds:,.0f} rows/s, "
                  f"peak RSS of the largest process {peak_mib:,.0f} MiB", flush=True)
            output.unlink()


def cold_memo(tokenizer) -> None:
    """The piece memo on text it has never seen (each GSM8K answer and MATH-500 problem and solution once),
    so that the figures above, on repeated questions, are not read as a cache's best case only."""
    from prefill_kit.prompts.prompt_tokens import PromptTokenizer

    texts = []
    for name in ("gsm8k", "math500"):
        for line in (REFERENCE / "data" / name / "test.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [f"<|im_start|>user\n{v}<|im_end|>\n<|im_start|>assistant\n{PREFIX}" for k, v in row.items()
                      if k in ("answer", "problem", "solution") and isinstance(v, str)]
    start = time.perf_counter()
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    floor = time.perf_counter() - start
    encoder = PromptTokenizer(tokenizer)  # a fresh, empty memo
    start = time.perf_counter()
    got = [ids for i in range(0, len(texts), 1000) for ids in encoder.encode(texts[i:i + 1000])]
    ours = time.perf_counter() - start
    assert got == expected, "piecewise ids differ on distinct texts"
    print(f"distinct texts ({len(texts):,}, memo starts empty): tokenizer {len(texts) / floor:,.0f} texts/s, "
          f"prefill-kit {len(texts) / ours:,.0f} texts/s ({floor / ours:.2f}x), ids identical")


TOKENIZERS = {"Qwen2.5": "qwen2.5-instruct-DERIVED", "Mistral-7B-v0.3": "mistral-7b-instruct-v0.3"}


def compare(name: str, tokenizer, dataset, args) -> dict[str, float]:
    """Baselines, floor and prefill-kit on one tokenizer (its own chat template); outputs asserted identical."""
    from prefill_kit.prompts.pipeline import render_dataset

    print(f"\n== {name}: {args.rows:,} rows, GSM8K questions, prefix {PREFIX!r}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine skews the process figures)")
    results: dict[str, float] = {}
    base = timed("baseline: datasets.map per example", lambda: baseline_per_example(dataset, tokenizer),
                 args.rows, results)
    if not args.skip_batched_baseline:
        batched = timed("baseline: datasets.map batched", lambda: baseline_batched(dataset, tokenizer),
                        args.rows, results)
        assert column(batched, "prompt_ids") == column(base, "prompt_ids")
    texts = column(base, "prompt")
    timed("floor: tokenizer(rendered texts) alone", lambda: tokenizer(texts, add_special_tokens=False),
          args.rows, results)
    ours = timed("prefill-kit render_dataset, 1 process",
                 lambda: render_dataset(dataset, tokenizer=tokenizer, prefix=PREFIX), args.rows, results)
    base_ids = column(base, "prompt_ids")
    assert column(ours, "prompt") == texts, "prompt text differs from the baseline"
    assert column(ours, "prompt_ids") == base_ids, "prompt ids differ from the baseline"
    label = f"prefill-kit render_dataset, num_proc={args.num_proc}"
    ours_n = timed(label, lambda: render_dataset(dataset, tokenizer=tokenizer, prefix=PREFIX,
                                                 num_proc=args.num_proc), args.rows, results)
    assert column(ours_n, "prompt_ids") == base_ids, "prompt ids differ from the baseline (num_proc)"
    print("outputs identical: prompt text and prompt ids")
    one = results["prefill-kit render_dataset, 1 process"]
    baseline = results["baseline: datasets.map per example"]
    print(f"{name} ratio vs per-example baseline: 1 process {one / baseline:.2f}x, "
          f"num_proc={args.num_proc} {results[label] / baseline:.2f}x")
    if "baseline: datasets.map batched" in results:
        b = results["baseline: datasets.map batched"]
        print(f"{name} ratio vs batched baseline:     1 process {one / b:.2f}x, num_proc={args.num_proc} "
              f"{results[label] / b:.2f}x")
    print(f"{name} vs the floor (tokenizing rendered texts alone): 1 process {one / results[floor_key()]:.2f}x")
    tokenization_stage(name, tokenizer, texts, base_ids)
    return results


def tokenization_stage(name: str, tokenizer, texts: list[str], expected: list[list[int]]) -> None:
    """The exact ids path alone, in the pipeline's slices, against whole-prompt encoding of the same texts."""
    from prefill_kit.prompts.pipeline import BatchRenderer
    from prefill_kit.prompts.prompt_tokens import PromptTokenizer

    start = time.perf_counter()
    tokenizer(texts, add_special_tokens=False)
    whole = time.perf_counter() - start
    encoder = PromptTokenizer(tokenizer)
    start = time.perf_counter()
    size = BatchRenderer.SLICE
    got = [ids for i in range(0, len(texts), size) for ids in encoder.encode(texts[i:i + size])]
    ours = time.perf_counter() - start
    assert got == expected, "piecewise ids differ"
    print(f"{name} tokenization stage alone: prefill-kit {len(texts) / ours:,.0f} rows/s vs whole-prompt "
          f"{len(texts) / whole:,.0f} rows/s ({whole / ours:.2f}x), ids identical ({encoder.blocker or 'piecewise'})")


def floor_key() -> str:
    return "floor: tokenizer(rendered texts) alone"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--rss-rows", type=int, default=0, help="also measure the CLI's peak RSS on this many rows")
    parser.add_argument("--skip-batched-baseline", action="store_true")
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS), help="which of " + ", ".join(TOKENIZERS))
    args = parser.parse_args()
    data_file = REFERENCE / "data" / "gsm8k" / "test.jsonl"
    if not data_file.is_file() or not (REFERENCE / "tokenizers").is_dir():
        raise SystemExit(f"needs {data_file} and {REFERENCE / 'tokenizers'} (../shared/reference); not found")

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    gsm8k = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"messages": [{"role": "user", "content": r["question"]}], "solution": r["answer"]} for r in gsm8k]
    dataset = datasets.Dataset.from_list([rows[i % len(rows)] for i in range(args.rows)])
    targets = {"Qwen2.5": 2.5}
    for name in args.tokenizers.split(","):
        tokenizer = AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizers" / TOKENIZERS[name]))
        results = compare(name, tokenizer, dataset, args)
        one = results["prefill-kit render_dataset, 1 process"]
        if name in targets:
            ratio = one / results["baseline: datasets.map per example"]
            print(f"{name} target: 1 process >= {targets[name]}x the per-example baseline: {ratio:.2f}x")
        else:
            print(f"{name} target: not below the floor: {one / results[floor_key()]:.2f}x")
        if name == "Qwen2.5":
            cold_memo(tokenizer)
    print(f"\nload average after the timed runs: {os.getloadavg()[0]:.1f}")
    print(f"peak RSS of this process so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if args.rss_rows:
        peak_rss_of_cli(rows, args.rss_rows, REFERENCE / "tokenizers" / TOKENIZERS["Qwen2.5"], args.num_proc)


if __name__ == "__main__":
    main()
