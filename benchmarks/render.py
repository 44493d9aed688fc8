"""Benchmark: render + tokenize GSM8K-size conversations, prefill-kit vs the `datasets.map` a TRL user writes.

    python benchmarks/render.py [--rows 20000] [--repeats 3] [--num-proc 2] [--rss-rows 1000000]
                                [--tokenizers Qwen2.5,Mistral-7B-v0.3,Gemma-3-like]

Same process, same rows, outputs asserted identical (prompt text and prompt ids). The timed runs are
interleaved: each round runs every side once, `--repeats` rounds. Per tokenizer it prints rows/s (median of
the rounds) for:

- the baselines: per-example and batched `datasets.map` with `apply_chat_template(..., tokenize=False,
  add_generation_prompt=True) + prefix`, then the tokenizer with `add_special_tokens=False`;
- the tokenize-only floor: batch-tokenizing the already rendered texts alone;
- the 2-core ceiling: 2 / (render CPU + tokenize CPU per row), each measured single-threaded, in every round
  (the host's load moves CPU times too: a ceiling measured once, minutes before or after a run, is not that
  run's);
- `prefill_kit.render_dataset` with 1 and `--num-proc` processes, as ratios to the batched baseline and as
  fractions of the ceiling (each the median of the rounds' own ratios);
- how much of two cores the host gives, in every round: two processes spinning at once, against one alone;
- the ids stage alone (`PromptTokenizer`, the route it chose and why) against whole-prompt batch tokenization,
  here and on every family of tests/tokenizer_families.py (plus two with 6,400 added tokens), as
  benchmarks/ids_families.py measures it (also runnable alone).

Tokenizers: Qwen2.5 (byte-level BPE), Mistral-7B-v0.3 (Metaspace) and Gemma-3-like: Mistral's vocabulary
with 6,400 more added tokens (Gemma-3 has 6,415: `<unusedN>`, turn markers, HTML tags, whitespace runs)
and Gemma-3's chat template. `--rss-rows` also renders a generated JSON Lines file of that many rows with
`prefill-kit render` in a child process and reports its peak RSS.
Needs ../shared/reference (GSM8K test set, the tokenizers); exits with a message where it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
PREFIX = "<think>\n"


REPEATS = 3


def interleaved(runs: dict[str, object]) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Each of `runs` (label -> function) once per round, REPEATS rounds: the seconds of every run, and each
    function's last output. Interleaving lets load that comes and goes on the machine hit every side alike."""
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    outputs: dict[str, object] = {}
    for _ in range(REPEATS):
        for label, fn in runs.items():
            start = time.perf_counter()
            outputs[label] = fn()
            seconds[label].append(time.perf_counter() - start)
    return seconds, outputs


def cpu_seconds(fn, into: list[float], single_thread: bool = False):
    """`fn` as a run for `interleaved` that appends its CPU seconds (all threads of this process) to `into`,
    optionally with tokenizers' pool off."""
    def run() -> None:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        if single_thread:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            start = time.process_time()
            fn()
            into.append(time.process_time() - start)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    return run


SPIN = "import time\ns = time.perf_counter()\nx = 0\nfor i in range(5_000_000): x += i\nprint(time.perf_counter() - s)"


def host_cores() -> float:
    """How many cores the host gives this machine now: one process spinning alone, then two at once; 2.0 when
    both run as fast as one alone (the 2-core ceiling assumes that), less when they share."""
    def spin(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    alone, together = [], []
    for _ in range(3):  # interleaved; the least disturbed of each
        alone.append(spin(1))
        together.append(spin(2))
    return 2 * min(alone) / min(together)


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
    from prefill_kit.prompts.tokens import PromptTokenizer

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
    encoder.decide(texts[:1000])  # what the first batch does: once per tokenizer and template in a process
    decided = time.perf_counter() - start
    start = time.perf_counter()
    got = [ids for i in range(0, len(texts), 1000) for ids in encoder.encode(texts[i:i + 1000])]
    ours = time.perf_counter() - start
    assert got == expected, "piecewise ids differ on distinct texts"
    print(f"distinct texts ({len(texts):,}, memo starts empty): tokenizer {len(texts) / floor:,.0f} texts/s, "
          f"prefill-kit {len(texts) / ours:,.0f} texts/s ({floor / ours:.2f}x) on the {encoder.route} route, decided "
          f"first in {decided * 1e3:.0f} ms ({floor / (ours + decided):.2f}x with the decision), ids identical")


TOKENIZERS = {"Qwen2.5": "qwen2.5-instruct-DERIVED", "Mistral-7B-v0.3": "mistral-7b-instruct-v0.3",
              "Gemma-3-like": "mistral-7b-instruct-v0.3"}
LABELS = {"per": "baseline: datasets.map per example", "batched": "baseline: datasets.map batched",
          "floor": "floor: tokenizer(rendered texts) alone", "one": "prefill-kit render_dataset, 1 process"}


def load_tokenizer(name: str):
    """The named tokenizer; Gemma-3-like adds 6,400 added tokens to Mistral's and uses Gemma-3's template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(REFERENCE / "tokenizers" / TOKENIZERS[name]))
    if name == "Gemma-3-like":
        tags = ("table", "tr", "td", "th", "thead", "tbody", "b", "i", "u", "p", "div", "span", "h1", "h2", "h3")
        extra = ([f"<unused{i}>" for i in range(6242)] + ["<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                 "<end_of_image>", "<image_soft_token>", "[@BOS@]", "<mask>"] + [f"<{t}>" for t in tags]
                 + [f"</{t}>" for t in tags] + ["\n" * k for k in range(2, 32)] + [" " * k for k in range(2, 32)]
                 + ["\t" * k for k in range(1, 32)] + ["▁" * k for k in range(2, 32)])
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
        tokenizer.chat_template = (REFERENCE / "templates" / "gemma-3-it.jinja").read_text(encoding="utf-8")
    return tokenizer


def compare(name: str, tokenizer, dataset, args) -> dict[str, float]:
    """Baselines, floor, ceiling and prefill-kit on one tokenizer (its own chat template); outputs identical."""
    from prefill_kit.prompts.dataset import render_dataset
    from prefill_kit.prompts.options import resolve_template

    added = len(tokenizer.backend_tokenizer.get_added_tokens_decoder())
    print(f"\n== {name} ({added:,} added tokens): {args.rows:,} rows, GSM8K questions, prefix {PREFIX!r}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on the machine skews wall "
          "times)", flush=True)
    template = resolve_template(None, tokenizer)
    texts = column(baseline_batched(dataset, tokenizer), "prompt")  # rendered once, for the floor and the ceiling
    label = f"prefill-kit render_dataset, num_proc={args.num_proc}"
    per_round: dict[str, list[float]] = {"render": [], "tokenize": [], "host": []}  # CPU seconds; host cores
    seconds, outputs = interleaved({
        LABELS["per"]: lambda: baseline_per_example(dataset, tokenizer),
        LABELS["batched"]: lambda: baseline_batched(dataset, tokenizer),
        LABELS["floor"]: lambda: tokenizer(texts, add_special_tokens=False),
        LABELS["one"]: lambda: render_dataset(dataset, tokenizer=tokenizer, prefix=PREFIX),
        label: lambda: render_dataset(dataset, tokenizer=tokenizer, prefix=PREFIX, num_proc=args.num_proc),
        "render CPU": cpu_seconds(lambda: render_dataset(dataset, template=template, prefix=PREFIX),
                                  per_round["render"]),
        "tokenize CPU": cpu_seconds(lambda: tokenizer(texts, add_special_tokens=False), per_round["tokenize"],
                                    single_thread=True),
        "host cores": lambda: per_round["host"].append(host_cores())})
    for run in ("render CPU", "tokenize CPU", "host cores"):
        seconds.pop(run)
    render_cpu, tokenize_cpu = ([c / args.rows for c in per_round[k]] for k in ("render", "tokenize"))
    ceilings = [2 / (r + t) for r, t in zip(render_cpu, tokenize_cpu, strict=True)]  # rows/s, one per round
    results: dict[str, float] = {"ceiling": statistics.median(ceilings)}
    for run, times in seconds.items():
        results[run] = args.rows / statistics.median(times)
        rounds = ", ".join(f"{args.rows / t:,.0f}" for t in times)
        print(f"{run:<48} {results[run]:>10,.0f} rows/s  (median of {REPEATS} rounds: {rounds})")
    print(f"{'2-core ceiling: 2 / (render + tokenize CPU)':<48} {results['ceiling']:>10,.0f} rows/s  (median of "
          f"rounds: {', '.join(f'{c:,.0f}' for c in ceilings)}; render {statistics.median(render_cpu) * 1e6:.0f} us + "
          f"tokenize {statistics.median(tokenize_cpu) * 1e6:.0f} us CPU per row, single-threaded)")
    host = per_round["host"]
    print(f"{'host: cores two spinning processes get':<48} {statistics.median(host):>10.2f}       (median of rounds: "
          f"{', '.join(f'{c:.2f}' for c in host)}; 2.00 is two whole cores, which the ceiling assumes)")
    base_ids = column(outputs[LABELS["per"]], "prompt_ids")
    assert column(outputs[LABELS["batched"]], "prompt_ids") == base_ids
    for key in (LABELS["one"], label):
        assert column(outputs[key], "prompt") == column(outputs[LABELS["per"]], "prompt"), f"{key}: prompt text differs"
        assert column(outputs[key], "prompt_ids") == base_ids, f"{key}: prompt ids differ from the baseline"
    print("outputs identical: prompt text and prompt ids")
    for procs, key in ((1, LABELS["one"]), (args.num_proc, label)):
        # ratios: the median over rounds of each round's ratio, both sides timed minutes apart at most
        vs_batched = statistics.median(b / o for b, o in zip(seconds[LABELS["batched"]], seconds[key], strict=True))
        vs_per = statistics.median(p / o for p, o in zip(seconds[LABELS["per"]], seconds[key], strict=True))
        share = statistics.median(args.rows / o / c for o, c in zip(seconds[key], ceilings, strict=True))
        results[f"{key} vs batched"], results[f"{key} of ceiling"] = vs_batched, share
        print(f"{name} prefill-kit, {procs} process{'es' if procs > 1 else ''}: {vs_batched:.2f}x the batched "
              f"baseline ({vs_per:.2f}x per-example), {share:.2f} of the 2-core ceiling")
    results["ids"] = tokenization_stage(name, tokenizer, texts, base_ids)
    return results


def tokenization_stage(name: str, tokenizer, texts: list[str], expected: list[list[int]]) -> float:
    """The exact ids path alone against whole-prompt batch encoding of the same texts, measured fairly (same
    slices, interleaved repeats, median ratio) by benchmarks/ids_families.py, which also prints the route."""
    from ids_families import ids_stage  # benchmarks/ is on sys.path: this script's directory

    return ids_stage(name, tokenizer, texts, REPEATS)[0]


def families_ids_stage(questions: list[str], rows: int) -> None:
    """The ids stage on every family of tests/tokenizer_families.py and two with 6,400 added tokens."""
    import ids_families

    ids_families.run(rows, REPEATS, reference=False)


def main() -> None:
    global REPEATS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--rss-rows", type=int, default=0, help="also measure the CLI's peak RSS on this many rows")
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS), help="which of " + ", ".join(TOKENIZERS))
    parser.add_argument("--skip-families", action="store_true", help="skip the ids stage on the test families")
    args = parser.parse_args()
    REPEATS = args.repeats
    data_file = REFERENCE / "data" / "gsm8k" / "test.jsonl"
    if not data_file.is_file() or not (REFERENCE / "tokenizers").is_dir():
        raise SystemExit(f"needs {data_file} and {REFERENCE / 'tokenizers'} (../shared/reference); not found")

    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    gsm8k = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"messages": [{"role": "user", "content": r["question"]}], "solution": r["answer"]} for r in gsm8k]
    dataset = datasets.Dataset.from_list([rows[i % len(rows)] for i in range(args.rows)])
    summary = {}
    for name in args.tokenizers.split(","):
        tokenizer = load_tokenizer(name)
        summary[name] = compare(name, tokenizer, dataset, args)
        if name == "Qwen2.5":
            cold_memo(tokenizer)
    if not args.skip_families:
        families_ids_stage([r["question"] for r in gsm8k], args.rows)
    print(f"\n== targets (1 process >= 1.3x batched and >= 0.85 of the ceiling; num_proc={args.num_proc} >= 1.8x "
          "batched; ids stage >= 1.0x whole)")
    for name, r in summary.items():
        n = f"prefill-kit render_dataset, num_proc={args.num_proc}"
        one = LABELS["one"]
        print(f"{name:<16} 1 process {r[one + ' vs batched']:.2f}x batched, {r[one + ' of ceiling']:.2f} of ceiling; "
              f"num_proc={args.num_proc} {r[n + ' vs batched']:.2f}x batched; ids stage {r['ids']:.2f}x whole")
    print(f"\nload average after the timed runs: {os.getloadavg()[0]:.1f}")
    print(f"peak RSS of this process so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if args.rss_rows:
        peak_rss_of_cli(rows, args.rss_rows, REFERENCE / "tokenizers" / TOKENIZERS["Qwen2.5"], args.num_proc)


if __name__ == "__main__":
    main()
