"""Rewards that score what the model said, prefix included, with TRL's signature:
`fn(completions, **kwargs) -> list[float | None]`.

Each reward scores `prefix + completion` (the `prefix` column), always; callers whose completions already hold
the prefix pass none. Completions may be strings or `[{"role": "assistant", "content": ...}]`; unknown
kwargs are ignored; None means "cannot judge this row" (TRL skips it).
"""

from prefill_kit.rewards.accuracy import AccuracyReward, AccuracyStats, accuracy_reward
from prefill_kit.rewards.choice import ChoiceAccuracyReward, choice_accuracy_reward
from prefill_kit.rewards.extract import extract_gold, extract_prediction
from prefill_kit.rewards.format import (
    FormatReward,
    TagCountReward,
    ThinkFormatReward,
    format_reward,
    tag_count_reward,
    think_format_reward,
)
from prefill_kit.rewards.length import CosineLengthReward, SoftOverlongReward
from prefill_kit.rewards.registry import WeightedReward, available_rewards, get_reward, parse_reward_spec
from prefill_kit.rewards.repetition import RepetitionPenaltyReward

__all__ = [
    "AccuracyReward", "AccuracyStats", "ChoiceAccuracyReward", "CosineLengthReward", "FormatReward",
    "RepetitionPenaltyReward", "SoftOverlongReward", "TagCountReward", "ThinkFormatReward", "WeightedReward",
    "accuracy_reward", "available_rewards", "choice_accuracy_reward", "extract_gold", "extract_prediction",
    "format_reward", "get_reward", "parse_reward_spec", "tag_count_reward", "think_format_reward",
]
