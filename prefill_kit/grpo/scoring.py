"""Call the reward functions the way TRL does, and collect their scores as a (B, K) tensor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from prefill_kit.errors import ConfigError
from prefill_kit.grpo.advantages import combine_rewards
from prefill_kit.rewards.registry import none_if_nan  # the one NaN/None rule; re-exported for the loop


class WeightedRewardLike(Protocol):
    """What `prefill_kit.rewards.parse_reward_spec` returns: a named reward function and its weight."""

    name: str
    fn: Callable[..., list[float | None]]
    weight: float


def score_completions(rewards: Sequence[WeightedRewardLike], *, prompts: list[str], completions: list[str],
                      completion_ids: list[list[int]], columns: dict[str, list[Any]]) -> torch.Tensor:
    """Each reward's score of each completion: (B, K), NaN where a reward returned None.

    Every reward gets TRL's call: `fn(prompts=..., completions=..., completion_ids=..., **columns)`, where
    `columns` holds every dataset column (with `prefix` and `solution`), one value per completion.
    """
    n = len(completions)
    out = torch.full((n, len(rewards)), float("nan"), dtype=torch.float32)
    for k, reward in enumerate(rewards):
        values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        values = list(values)
        if len(values) != n:
            raise ConfigError(f"reward {reward.name}: returned {len(values)} scores for {n} completions")
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"reward {reward.name}: expected a number or None, got {v!r}") from None
            out[i, k] = v if not math.isnan(v) else float("nan")
    return out


def nullable(values: torch.Tensor) -> list[float | None]:
    """A (B,) score tensor as the list rewards and logs use: None where it holds NaN."""
    return [none_if_nan(v) for v in values.tolist()]


def reward_weights(rewards: Sequence[WeightedRewardLike]) -> torch.Tensor:
    return torch.tensor([float(r.weight) for r in rewards], dtype=torch.float32)


def weighted_totals(scores: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float | None]:
    """Each completion's total reward from lists of scores (one row per completion, None: cannot judge).

    The rollout's rule and arithmetic (`combine_rewards`, in float32), so a logged or evaluated total equals
    the one the advantages came from; None where every reward returned None.
    """
    table = torch.tensor([[float("nan") if s is None else float(s) for s in row] for row in scores],
                         dtype=torch.float32).reshape(len(scores), len(weights))
    return nullable(combine_rewards(table, torch.tensor([float(w) for w in weights], dtype=torch.float32)))
