"""How ms-swift's ORM calls map onto prefill-kit's rewards: the generated ids and the rewards' settings.

Kept apart from `swift_plugin` (which imports ms-swift) so that these rules import, and are tested, without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral
from typing import Any

from prefill_kit.errors import ConfigError


def generated_token_ids(response_token_ids: Sequence[Any]) -> list[list[int]]:
    """Per sample, every token id the model generated, in order.

    ms-swift 4.6 gives a single-turn sample's ids as one flat list of ints and a multi-turn sample's as one
    list per generated turn (`swift/rl_core/data.py`); what the model generated is all of them.
    """
    return [_flatten(sample) for sample in response_token_ids]


def _flatten(sample: Iterable[Any] | None) -> list[int]:
    ids: list[int] = []
    for item in sample or ():
        if isinstance(item, Integral):
            ids.append(int(item))
        else:
            ids.extend(int(i) for i in item or ())
    return ids


def reward_params(reward: str, args: Any) -> dict[str, Any]:
    """The parameters a reward takes from ms-swift's arguments, where ms-swift has its own setting for them.

    `soft_overlong` penalises by ms-swift's `--soft_max_length` (default `--max_completion_length`) and
    `--soft_cache_length`, as ms-swift's own `soft_overlong` does; prefill-kit's 1024-token default would not know
    the run's length limit. Every other reward takes its defaults.
    """
    if reward != "soft_overlong" or args is None:
        return {}
    cache = getattr(args, "soft_cache_length", None)
    if cache is None:
        raise ConfigError("prefill_kit_soft_overlong needs --soft_cache_length (the penalty window before "
                          "--soft_max_length, default --max_completion_length), as ms-swift's soft_overlong does")
    return {"max_completion_len": getattr(args, "soft_max_length", None) or args.max_completion_length,
            "soft_punish_cache": cache}
