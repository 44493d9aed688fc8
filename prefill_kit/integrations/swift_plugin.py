"""ms-swift plugin: prefill-kit's rewards as ms-swift ORMs, for `swift rlhf --external_plugins THIS_FILE`.

Registers one class per prefill-kit reward in `swift.rewards.orms`, named `prefill_kit_<reward>`
(`prefill_kit_format`, `prefill_kit_accuracy`, `prefill_kit_think_format`, ...), for `--reward_funcs`.

ms-swift writes `--response_prefix` into the prompt and puts it back in front of each completion, so the
completions it passes already hold the prefix: they are scored as full responses and a `prefix` column is never
passed on (passing it would make the rewards prepend it a second time). Dataset columns (`solution`, ...) arrive
as keyword arguments, as they do for TRL. ms-swift's generated token ids (`response_token_ids`) are passed on
as `completion_ids`, which the length rewards count (a flat list per sample on a single-turn rollout, one list
per turn on a multi-turn one). `prefill_kit_soft_overlong` takes ms-swift's `--soft_max_length` and
`--soft_cache_length`, as ms-swift's own `soft_overlong`. The rewards themselves are prefill-kit's, unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from swift.rewards import ORM, orms

from prefill_kit.integrations.swift_calls import generated_token_ids, reward_params
from prefill_kit.rewards import available_rewards, get_reward

# ms-swift's import_external_file puts this file's directory first on sys.path; there, `verl.py` (the verl
# adapter) would shadow the real `verl` package for the rest of the process. Nothing here needs it on the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

ORM_PREFIX = "prefill_kit_"


class PrefillKitORM(ORM):
    """An ms-swift ORM that scores completions with the prefill-kit reward named `reward_name`."""

    reward_name = ""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(args, **kwargs)
        self.reward = get_reward(self.reward_name, **reward_params(self.reward_name, args))

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        kwargs.pop("prefix", None)  # ms-swift's completions already start with the prefix
        if "completion_ids" not in kwargs and kwargs.get("response_token_ids") is not None:
            kwargs["completion_ids"] = generated_token_ids(kwargs["response_token_ids"])
        return self.reward(completions, **kwargs)


def _class_name(reward: str) -> str:
    return "PrefillKit" + "".join(part.capitalize() for part in reward.split("_"))


for _reward in available_rewards():
    _cls = type(_class_name(_reward), (PrefillKitORM,), {"reward_name": _reward, "__module__": __name__})
    globals()[_cls.__name__] = _cls
    orms[ORM_PREFIX + _reward] = _cls
