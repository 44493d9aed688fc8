"""`repetition_penalty`: penalty for repeated n-grams ("Demystifying Long CoT", arXiv 2502.03373, App. C.2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefill_kit.errors import ConfigError
from prefill_kit.rewards.response import column, responses


def repetition_value(units: Sequence[Any], ngram_size: int, max_penalty: float) -> float:
    """`(1 - unique n-grams / all n-grams) * max_penalty`; 0.0 when there are fewer units than `ngram_size`."""
    total = len(units) - ngram_size + 1
    if total <= 0:
        return 0.0
    unique = len(set(zip(*(units[i:] for i in range(ngram_size)), strict=False)))
    return (1 - unique / total) * max_penalty if unique < total else 0.0


class RepetitionPenaltyReward:
    """In `[max_penalty, 0]`. `unit="words"` (open-r1: lower-cased whitespace words of prefix + completion) or
    `unit="tokens"` (TRL: `completion_ids`). Parameter names as `get_repetition_penalty_reward`."""

    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0, unit: str = "words") -> None:
        if max_penalty > 0:
            raise ConfigError(f"repetition_penalty: max_penalty {max_penalty} should not be positive")
        if ngram_size < 1:
            raise ConfigError(f"repetition_penalty: ngram_size must be >= 1, got {ngram_size}")
        if unit not in ("words", "tokens"):
            raise ConfigError(f"repetition_penalty: unit must be 'words' or 'tokens', got {unit!r}")
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty
        self.unit = unit

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        if self.unit == "tokens":
            if kwargs.get("completion_ids") is None:
                raise ConfigError("repetition_penalty: unit='tokens' needs the `completion_ids` column")
            sequences = [list(ids or ()) for ids in column(kwargs, "completion_ids", len(completions))]
        else:
            sequences = [text.lower().split() for text in responses(completions, **kwargs)]
        return [repetition_value(seq, self.ngram_size, self.max_penalty) for seq in sequences]
