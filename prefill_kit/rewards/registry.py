"""Reward names, parametrised construction and weighted specs (`"format,accuracy:2.0"`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefill_kit.errors import ConfigError
from prefill_kit.rewards.accuracy import AccuracyReward
from prefill_kit.rewards.choice import ChoiceAccuracyReward
from prefill_kit.rewards.format import FormatReward, TagCountReward, ThinkFormatReward
from prefill_kit.rewards.length import CosineLengthReward, SoftOverlongReward
from prefill_kit.rewards.repetition import RepetitionPenaltyReward

# name -> reward class; every class is a picklable callable with a `__name__` (TRL logs under it).
_REGISTRY: dict[str, type] = {
    "format": FormatReward,
    "think_format": ThinkFormatReward,
    "accuracy": AccuracyReward,
    "choice_accuracy": ChoiceAccuracyReward,
    "tag_count": TagCountReward,
    "cosine_length": CosineLengthReward,
    "repetition_penalty": RepetitionPenaltyReward,
    "soft_overlong": SoftOverlongReward,
}


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: Callable[..., list[float | None]]
    weight: float


def none_if_nan(value: Any) -> float | None:
    """The one rule for a score that cannot judge: None in lists, logs and JSON; NaN in tensors and for verl.

    None and NaN give None; anything else is the score as a float.
    """
    if value is None:
        return None
    value = float(value)
    return None if value != value else value


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _import_reward(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # importing runs the user's module: any error there means "cannot import it"
        raise ConfigError(f"reward {path!r}: cannot import it ({type(exc).__name__}: {exc})") from exc
    if not callable(obj):
        raise ConfigError(f"reward {path!r} is not callable")
    return obj


def get_reward(name: str, **params: Any) -> Callable[..., list[float | None]]:
    """The reward called `name` (see `available_rewards()`), or `package.module:function` for a user's own.

    `params` go to the reward's constructor (e.g. `get_reward("cosine_length", max_len=512)`); for an imported
    callable they are only allowed when it is a class or factory that accepts them.
    """
    if ":" in name:
        obj = _import_reward(name)
        return obj(**params) if params else obj
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}, "
                          "or an import path `package.module:function`")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"reward {name!r}: bad parameters {sorted(params)}: {exc}") from exc


def _parse_weight(text: str, item: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"reward spec {item!r}: weight {text!r} is not a number") from None


def parse_reward_spec(spec: str | Sequence[Mapping[str, Any] | str]) -> list[WeightedReward]:
    """`"format,accuracy:2.0"` or `[{"name": "accuracy", "weight": 2.0, "timeout": 3}, "format"]`.

    In a string an item is `name[:weight]`; an import path `pkg.mod:fn` takes its weight after a second colon
    (`pkg.mod:fn:0.5`). Weights default to 1.0.
    """
    items: list[tuple[str, float, dict[str, Any]]] = []
    if isinstance(spec, str):
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                continue
            parts = item.split(":")
            if len(parts) == 1 or (len(parts) == 2 and parts[0] in _REGISTRY):
                weight = _parse_weight(parts[1], item) if len(parts) == 2 else 1.0
                items.append((parts[0], weight, {}))
            elif len(parts) == 2:
                items.append((item, 1.0, {}))
            elif len(parts) == 3:
                items.append((f"{parts[0]}:{parts[1]}", _parse_weight(parts[2], item), {}))
            else:
                raise ConfigError(f"reward spec {item!r}: expected name[:weight]")
    else:
        for entry in spec:
            if isinstance(entry, str):
                items.extend((w.name, w.weight, {}) for w in [_named(entry)])
                continue
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ConfigError(f"reward spec entry {entry!r}: expected a mapping with a 'name'")
            params = {k: v for k, v in entry.items() if k not in ("name", "weight")}
            weight = entry.get("weight", 1.0)
            if not isinstance(weight, int | float) or isinstance(weight, bool):
                raise ConfigError(f"reward spec entry {entry['name']!r}: weight must be a number, got {weight!r}")
            items.append((str(entry["name"]), float(weight), params))
    if not items:
        raise ConfigError("reward spec is empty: name at least one reward")
    return [WeightedReward(name, get_reward(name, **params), weight) for name, weight, params in items]


def _named(item: str) -> WeightedReward:
    (reward,) = parse_reward_spec(item)
    return reward
