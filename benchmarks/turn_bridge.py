"""Benchmark: the cost of multi-turn bridges in a 64-turn tool rollout, prefill-kit vs re-tokenizing.

    python benchmarks/turn_bridge.py [--turns 64] [--template qwen3] [--tokenizer DIR]

A scripted policy answers each tool result with a tool call (and finally an answer); each turn's sampled
ids are the in-context encoding of its text. Same process, same conversation: the baseline is what a
rollout without a bridge does, re-rendering the whole conversation and encoding it whole after each tool
result; prefill-kit's `TrajectoryBuilder.add_messages` renders the whole conversation once, checks it, and
encodes only the bridge. Both id sequences are asserted identical. Prints the time per bridge and the ratio.
Uses the real Qwen2.5 tokenizer from ../shared/reference when there, else a tiny local one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tokenizers"
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                         "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=64)
    parser.add_argument("--template", default="qwen3")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()

    from prefill_kit.prompts.render import render_prompt
    from prefill_kit.prompts.turns import TrajectoryBuilder
    from prefill_kit.templates import SHIPPED_ADDED_TOKENS, load_template

    path = args.tokenizer or next((str(p) for p in sorted(REFERENCE.glob("*")) if "qwen2.5" in p.name.lower()), None)
    if path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    else:
        from tests.tokenizer_families import build

        tok = build("qwen")
        tok.add_special_tokens({"additional_special_tokens": list(SHIPPED_ADDED_TOKENS[args.template])})
    template = load_template(args.template)
    prefix = "<think>\n"
    builder = TrajectoryBuilder([{"role": "user", "content": "Look up forty words."}], template, tok, prefix=prefix,
                                tools=[TOOL])
    conversation = list(builder.messages)
    bridge_s = baseline_s = 0.0
    for turn in range(args.turns):
        call = {"type": "function", "function": {"name": "lookup", "arguments": {"word": f"word{turn}"}}}
        message = {"content": f"I need word {turn}.\n</think>\n\n", "tool_calls": [call]}
        full = {**message, "role": "assistant", "content": builder.turn_prefix + message["content"]}
        prompt = render_prompt(conversation, template, prefix, tools=[TOOL]).prompt
        rendered = template.render([*conversation, full], tools=[TOOL])
        text = rendered[len(prompt):rendered.rfind("<|im_end|>") + len("<|im_end|>")]
        ids = tok(builder._text + text, add_special_tokens=False)["input_ids"][len(builder.prompt_ids):]
        builder.add_turn(ids, text, message)
        conversation += [full, {"role": "tool", "content": f"definition {turn}: " + "text " * 40}]
        start = time.perf_counter()
        builder.add_messages(conversation[-1:])
        bridge_s += time.perf_counter() - start
        start = time.perf_counter()
        whole = render_prompt(conversation, template, prefix, tools=[TOOL]).prompt
        whole_ids = tok(whole, add_special_tokens=False)["input_ids"]
        baseline_s += time.perf_counter() - start
        assert whole_ids == builder.prompt_ids, f"turn {turn}: ids differ"
    n = args.turns
    print(f"{args.template}, {n} turns, {len(builder.prompt_ids)} tokens at the end ({'real' if path else 'tiny'} "
          "tokenizer)")
    print(f"baseline (render + encode whole):      {1e3 * baseline_s / n:7.2f} ms per turn")
    print(f"prefill-kit bridge (one render, check):  {1e3 * bridge_s / n:7.2f} ms per turn "
          f"({bridge_s / baseline_s:.2f}x the baseline), {bridge_s:.2f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
