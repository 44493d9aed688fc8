"""Benchmark: prefill-kit's accuracy_reward vs trl.rewards.accuracy_reward on 800 real Qwen2.5-Math completions,
plus format_reward throughput.

Data: ../shared/reference/data/qwen25math/eval_rm_maj_example_math_cot_100.jsonl (100 MATH problems x 8
completions, gold `gt`, graded `score`). Prints throughput of both and their ratio, agreement of each with the
graded labels, and every disagreement between the two. Run: python benchmarks/rewards.py [--workers N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "data" / "qwen25math" / \
    "eval_rm_maj_example_math_cot_100.jsonl"


def load(path: Path) -> tuple[list[str], list[str], list[bool]]:
    completions, golds, labels = [], [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for response, score in zip(row["code"], row["score"], strict=True):
            completions.append(response)
            golds.append(row["gt"])
            labels.append(bool(score))
    return completions, golds, labels


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workers", type=int, default=None, help="verify-pool size (default: CPU count, max 8)")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"reference data not found: {args.data}")

    import trl.rewards

    from prefill_kit.rewards import AccuracyReward, format_reward

    completions, golds, labels = load(args.data)
    n = len(completions)
    conversational = [[{"role": "assistant", "content": c}] for c in completions]

    ours = AccuracyReward(num_workers=args.workers)
    # Both start warm: our verify workers started, TRL's math-verify imported and its grammar loaded.
    ours.warm_up()
    trl.rewards.accuracy_reward(conversational[:2], solution=golds[:2])
    ours_scores, ours_s = timed(ours, conversational, solution=golds)
    trl_scores, trl_s = timed(trl.rewards.accuracy_reward, conversational, solution=golds)

    def agreement(scores):
        return sum((s == 1.0) == label for s, label in zip(scores, labels, strict=True)) / n

    print(f"accuracy_reward on {n} Qwen2.5-Math completions ({ours.stats.as_dict()})")
    print(f"  prefill-kit: {n / ours_s:9.1f} completions/s  agreement with graded score: {agreement(ours_scores):.4f}")
    print(f"  trl        : {n / trl_s:9.1f} completions/s  agreement with graded score: {agreement(trl_scores):.4f}")
    print(f"  throughput ratio prefill-kit / trl: {trl_s / ours_s:.1f}x")
    diffs = [i for i in range(n) if ours_scores[i] != trl_scores[i]]
    print(f"  disagreements prefill-kit vs trl: {len(diffs)}")
    for i in diffs:
        tail = completions[i][-160:].replace("\n", " ")
        print(f"    #{i}: gold={golds[i]!r} graded={labels[i]} prefill-kit={ours_scores[i]} trl={trl_scores[i]} "
              f"| ...{tail}")

    many = completions * 125  # 100k completions
    prefixed = {"prefix": ["<think>\n"] * len(many)}
    _, fmt_s = timed(format_reward, many, **prefixed)
    print(f"format_reward: {len(many) / fmt_s:,.0f} completions/s on {len(many):,} completions (prefix '<think>\\n')")


if __name__ == "__main__":
    main()
