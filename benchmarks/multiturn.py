"""Multi-turn rollout overhead, at 8 and at 64 turns, with a scripted sampler: rollout time split into sampling,
tool execution and prefill-kit's own work (bridges rendered and checked, ids, masks, parsing).

The headline is the share of prefill-kit's own work (issue 17: "outside sampling (bridges, ids, masks)"; target
under 2% at both); the share outside sampling with the tools' run time included is printed beside it. The tool
here is `add`, so its time is the cost of calling a tool (the worker thread and the deadline), not of the tool.
The scripted policy writes a fixed tool-call turn (about 40 tokens) and sleeps as a model would: DECODE_MS per
decoding step of the batch (default 20 ms, a 0.5B-7B model on one GPU), so the share is what this code adds to a
real rollout. TRL's anchor (trl#6250): 4% at 8 turns, 56% at 128 (its figure holds everything outside sampling).
Baseline in the same process: a tool call on a new thread per call (the earlier way) against the reused worker.

    .venv/bin/python benchmarks/multiturn.py [--decode-ms 20] [--rollouts 8]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from prefill_kit.grpo.multiturn import Timing, run_rollouts
from prefill_kit.grpo.tools import call_with_deadline, load_tools
from prefill_kit.prompts.turns import TrajectoryBuilder
from prefill_kit.templates import load_template
from prefill_kit.tiny_model import build_tokenizer


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decode-ms", type=float, default=20.0)
    parser.add_argument("--rollouts", type=int, default=8)
    args = parser.parse_args()
    tok = build_tokenizer(chat_template=load_template("qwen2.5").source)
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tools = load_tools(["__main__:add"], None)
    call = json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})
    turn = tok("I add.\n</think>\n\nLet me add.\n<tool_call>\n" + call + "\n</tool_call><|im_end|>",
               add_special_tokens=False)["input_ids"]
    answer = tok("Done.\n</think>\n\n<answer>5</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    for turns in (8, 64):
        def sampler(prompts, budgets, turns=turns):
            time.sleep(args.decode_ms / 1000 * len(turn))  # one batched decode step per token
            out = []
            for ids in prompts:
                k = tok.decode(ids[-200:]).count("<tool_response>")  # not timed as overhead: inside the sampler
                out.append(answer if k + 1 >= turns else turn)
            return out

        builders = [TrajectoryBuilder([{"role": "user", "content": f"Question {i}?"}], "qwen2.5", tok,
                                      prefix="<think>\n", tools=tools.schemas) for i in range(args.rollouts)]
        timing = Timing()
        results = run_rollouts(builders, sampler, tokenizer=tok, eos_ids=[tok.eos_token_id],
                               tables=[tools.tool_table()] * len(builders), schemas=[tools.schemas] * len(builders),
                               max_turns=turns, max_completion_length=10**6, tool_timeout=10, timing=timing)
        assert all(r.turns == turns for r in results), [r.turns for r in results]
        own = timing.total - timing.sampling - timing.tools
        outside = timing.total - timing.sampling
        print(f"{turns:3d} turns x {args.rollouts} rollouts: rollout {timing.total:.2f} s = sampling "
              f"{timing.sampling:.2f} s + tools {timing.tools:.3f} s + prefill-kit {own:.3f} s | prefill-kit's own "
              f"work {100 * own / timing.total:.2f}% (target < 2%; {1000 * own / (turns * args.rollouts):.2f} ms per "
              f"turn) | outside sampling, tools included {100 * outside / timing.total:.2f}% (TRL: 4% at 8 turns, "
              f"56% at 128)")
    thread_us, worker_us = _tool_call_costs()
    print(f"one tool call: a new thread per call {thread_us:.0f} us, the reused worker {worker_us:.0f} us "
          f"({thread_us / worker_us:.1f}x)")


def _thread_per_call(fn, arguments, timeout):
    """The earlier way (the baseline): each call on a new daemon thread, joined up to the deadline."""
    box = {}

    def target():
        try:
            box["result"] = fn(**arguments)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = str(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return box.get("result"), "error" in box


def _tool_call_costs(n: int = 2000) -> tuple[float, float]:
    """Microseconds per call of `add` through each way, best of three rounds of `n`, alternated."""
    best = {"thread": float("inf"), "worker": float("inf")}
    for _ in range(3):
        for name, call in (("thread", _thread_per_call), ("worker", call_with_deadline)):
            start = time.perf_counter()
            for _ in range(n):
                assert call(add, {"a": 2, "b": 3}, 10) == (5, False)
            best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
    return best["thread"], best["worker"]

if __name__ == "__main__":
    main()
