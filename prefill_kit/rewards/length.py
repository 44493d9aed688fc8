"""Length-shaped rewards: `cosine_length` (correctness scaled by length) and `soft_overlong` (DAPO)."""

from __future__ import annotations

import math
from typing import Any

from prefill_kit.errors import ConfigError
from prefill_kit.rewards.response import column, completion_text

_UNITS = ("tokens", "chars")


def _check_unit(unit: str, reward: str) -> str:
    if unit not in _UNITS:
        raise ConfigError(f"{reward}: unit must be one of {_UNITS}, got {unit!r}")
    return unit


def completion_lengths(completions: list[Any], unit: str, reward: str, **kwargs: Any) -> list[int]:
    """Length of what the model generated (the prefix is not the model's doing): tokens from `completion_ids`,
    or characters of the completion text."""
    if unit == "chars":
        return [len(completion_text(c)) for c in completions]
    if kwargs.get("completion_ids") is None:
        raise ConfigError(f"{reward}: unit='tokens' needs the `completion_ids` column (TRL passes it); "
                          "use unit='chars' to measure characters")
    return [len(ids) if ids is not None else 0 for ids in column(kwargs, "completion_ids", len(completions))]


def cosine_value(length: int, max_len: int, correct: bool, min_value_wrong: float, max_value_wrong: float,
                 min_value_correct: float, max_value_correct: float) -> float:
    """Cosine schedule of "Demystifying Long CoT" (arXiv 2502.03373, App. C.1), progress clamped to 1 so that
    lengths past `max_len` stay at the long-length bound instead of climbing back up the cosine."""
    progress = min(max(length, 0) / max_len, 1.0)
    cosine = math.cos(progress * math.pi)
    low, high = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
    return low + 0.5 * (high - low) * (1.0 + cosine)


class CosineLengthReward:
    """Correct: from `max_value_correct` (empty) down to `min_value_correct` (at `max_len`). Wrong: from
    `min_value_wrong` (empty) up to `max_value_wrong` (at `max_len`). None where the gold answer is unparseable.
    Parameter names and defaults are TRL's/open-r1's `get_cosine_scaled_reward`."""

    __name__ = "cosine_length_reward"

    def __init__(self, max_len: int = 1000, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                 min_value_correct: float = 0.5, max_value_correct: float = 1.0, unit: str = "tokens",
                 timeout: float = 5.0) -> None:
        if max_len <= 0:
            raise ConfigError(f"cosine_length: max_len must be > 0, got {max_len}")
        from prefill_kit.rewards.accuracy import AccuracyReward

        self.max_len = max_len
        self.values = (min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
        self.unit = _check_unit(unit, "cosine_length")
        self.accuracy = AccuracyReward(timeout=timeout)

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        lengths = completion_lengths(completions, self.unit, "cosine_length", **kwargs)
        verdicts = self.accuracy.correctness(completions, **kwargs)
        return [None if ok is None else cosine_value(n, self.max_len, ok, *self.values)
                for n, ok in zip(lengths, verdicts, strict=True)]


def soft_overlong_value(length: int, max_completion_len: int, soft_punish_cache: int) -> float:
    """DAPO Eq. 13: 0 up to `max_completion_len - soft_punish_cache`, then linear down to -1 at
    `max_completion_len`, -1 beyond."""
    start = max_completion_len - soft_punish_cache
    if length <= start:
        return 0.0
    if length <= max_completion_len:
        return (start - length) / soft_punish_cache
    return -1.0


class SoftOverlongReward:
    """Penalises overlong completions without rewarding short ones (DAPO); names as TRL's
    `get_soft_overlong_punishment`."""

    __name__ = "soft_overlong_reward"

    def __init__(self, max_completion_len: int = 1024, soft_punish_cache: int = 256, unit: str = "tokens") -> None:
        if not 0 <= soft_punish_cache <= max_completion_len:
            raise ConfigError("soft_overlong: need 0 <= soft_punish_cache <= max_completion_len, got "
                              f"{soft_punish_cache} and {max_completion_len}")
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache
        self.unit = _check_unit(unit, "soft_overlong")

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        lengths = completion_lengths(completions, self.unit, "soft_overlong", **kwargs)
        return [soft_overlong_value(n, self.max_completion_len, self.soft_punish_cache) for n in lengths]
