"""Does the prefix fit the data? Checks preflight runs before any GPU hour is spent.

The practice the project follows: the prefix must match the training data's format and stay short. A prefix
that opens `<think>` while the data is written another way, or a format reward that asks for tags nothing
ever shows the model, gives a reward that cannot rise however long the run. Each function here is pure: texts
and rewards in, the problems found (plain sentences with advice) out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefill_kit.prompts.few_shot import opened_block
from prefill_kit.rewards.format import FormatReward, TagCountReward, ThinkFormatReward

PREFIX_SHARE = 0.25  # the most of max_completion_length the prefix should take, in tokens
FORMAT_REWARDS = (FormatReward, ThinkFormatReward, TagCountReward)


def format_rewards(rewards: Sequence[Any]) -> list[Any]:
    """The configured rewards (objects with `name` and `fn`) that score the response's tag structure."""
    return [r for r in rewards if isinstance(r.fn, FORMAT_REWARDS)]


def prefix_length_problem(prefix_tokens: int, max_completion_length: int) -> str | None:
    """A warning when the prefix takes more than a quarter of `max_completion_length` in tokens."""
    if prefix_tokens <= PREFIX_SHARE * max_completion_length:
        return None
    return (f"the prefix is {prefix_tokens} tokens, more than a quarter of grpo.max_completion_length "
            f"({max_completion_length}): a long prefix writes the answer's start for the model instead of letting it "
            "learn to; keep it to an opener such as '<think>\\n'")


def _leading_block(text: str) -> str | None:
    """The tag of the block `text` starts with and closes later (`think` for '<think>..</think> 42'), else None."""
    body = text.lstrip()
    if not body.startswith("<") or ">" not in body:
        return None
    tag = body[1:body.index(">")]
    return tag if tag.replace("_", "").replace("-", "").isalnum() and f"</{tag}>" in body else None


def solution_format_problems(prefix: str, solutions: Sequence[str | None], prompts: Sequence[str],
                             rewards: Sequence[Any]) -> list[str]:
    """Warnings where the rows' reference `solution`s are written in a format the prefix contradicts.

    Only applies when the prefix opens a block `<T>`. Three cases, each counted over the given rows:
    - solutions that are whole responses opening another block (`<reasoning>...` for a `<think>` prefix);
    - solutions that are whole responses opening `<T>` which a configured format reward scores below 1.0;
    - solutions that are bare answers while a configured format reward requires answer tags that neither the
      solutions nor any prompt (system message, few-shot examples) ever show: the model is scored on a format
      nobody tells it about.
    """
    tag = opened_block(prefix)
    texts = [s for s in solutions if isinstance(s, str)]
    if tag is None or not texts:
        return []
    out = []
    blocks = [_leading_block(s) for s in texts]
    other = sorted({b for b in blocks if b is not None and b != tag})
    if other:
        n = sum(b in other for b in blocks)
        out.append(f"{n} of {len(texts)} reference solutions are responses opening <{other[0]}>, but the prefix "
                   f"opens <{tag}>: the prefix must match the data's format (use --prefix '<{other[0]}>\\n', or "
                   "rewrite the solutions)")
    whole = [s for s, b in zip(texts, blocks, strict=True) if b == tag]
    for reward in format_rewards(rewards):
        if whole:
            scores = reward.fn(whole)
            failing = sum(score is not None and score < 1.0 for score in scores)
            if failing:
                out.append(f"{failing} of {len(whole)} reference solutions that open <{tag}> score below 1.0 on "
                           f"{reward.name}: the data's format is not the one the reward expects; change the "
                           "reward (its tags) or the solutions")
        answer_tag = getattr(reward.fn, "answer_tag", None)
        if not isinstance(reward.fn, FormatReward | TagCountReward) or answer_tag is None:
            continue
        opener = f"<{answer_tag}>"
        bare = [s for s, b in zip(texts, blocks, strict=True) if b is None and opener not in s]
        if bare and not any(opener in s for s in texts) and not any(opener in p for p in prompts):
            out.append(f"the prefix opens <{tag}> and {reward.name} requires {opener}...</{answer_tag}> after the "
                       f"block, but {len(bare)} of {len(texts)} reference solutions are bare answers and no prompt "
                       f"shows {opener}: nothing tells the model the format it is scored on; describe it in the "
                       "system message, add --few-shot examples, or use think_format")
    return out
