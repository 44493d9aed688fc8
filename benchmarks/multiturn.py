"""Multi-turn rollout overhead: the share of rollout time spent outside sampling (parsing, tools, bridges, ids,
masks), at 8 and at 64 turns, with a scripted sampler.

The scripted policy writes a fixed tool-call turn (about 40 tokens) and sleeps as a model would: DECODE_MS per
decoding step of the batch (default 20 ms, a 0.5B-7B model on one GPU), so the share is what this code adds to a
real rollout. TRL's anchor (trl#6250): 4% at 8 turns, 56% at 128. Target: under 2% at both.

    .venv/bin/python benchmarks/multiturn.py [--decode-ms 20] [--rollouts 8]
"""

from __future__ import annotations

import argparse
import json
import time

from prefill_kit.grpo.multiturn import Timing, run_rollouts
from prefill_kit.grpo.tools import load_tools
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
        outside = timing.total - timing.sampling
        print(f"{turns:3d} turns x {args.rollouts} rollouts: rollout {timing.total:.2f} s, sampling "
              f"{timing.sampling:.2f} s, outside sampling {outside:.2f} s = {100 * outside / timing.total:.1f}% "
              f"({1000 * outside / (turns * args.rollouts):.1f} ms per turn; TRL: 4% at 8 turns, 56% at 128)")


if __name__ == "__main__":
    main()
