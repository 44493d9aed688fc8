"""verl's custom reward function, backed by prefill-kit's rewards.

verl (0.9) calls `compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...,
**reward_kwargs)` once per response, with `solution_str` the decoded generated text only. verl has no
response prefix: the prefix `prefill-kit export verl` wrote into the chat template is in the prompt, so
`solution_str` never holds it. The row's `extra_info["response_prefix"]` carries it, and this adapter passes
it to the rewards as their `prefix` column, so that they score `prefix + solution_str` by their own rule
(`prefill_kit.rewards.response`) while the length rewards still measure only what the model generated.

Configure it with `reward.custom_reward_function.path=pkg://prefill_kit.integrations.verl`,
`.name=compute_score` and `.reward_kwargs.rewards="format,accuracy:2.0"` (any reward spec).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from prefill_kit.errors import ConfigError

DEFAULT_REWARDS = "format,accuracy"
# Keyword arguments verl's reward managers add themselves (for generative reward models); not ours to use.
VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


def _plain(value: Any) -> Any:
    """A reward spec from verl's config (OmegaConf containers) as plain lists, dicts and scalars."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return value


@lru_cache(maxsize=8)
def _rewards(spec_json: str):
    """The weighted rewards of a spec, built once per process: verl calls once per response, and the
    accuracy reward's verify workers must outlive a call."""
    from prefill_kit.rewards import parse_reward_spec

    return tuple(parse_reward_spec(json.loads(spec_json)))


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
                  **reward_kwargs: Any) -> dict[str, float]:
    """Score one verl response with the rewards named by `reward_kwargs["rewards"]` (default "format,accuracy").

    Returns `{"score": weighted total, <reward name>: score, ...}`, the dict form verl accepts (the extra keys
    become metrics). A reward that cannot judge the row (e.g. no gold answer) reports NaN and is left out of
    the total, as TRL's nansum does. Model output never raises; a bad spec or an unknown keyword is a
    ConfigError, raised on the first call.
    """
    spec = reward_kwargs.pop("rewards", DEFAULT_REWARDS)
    unknown = sorted(set(reward_kwargs) - VERL_KWARGS)
    if unknown:
        raise ConfigError(f"verl reward_kwargs: unknown {unknown}; prefill-kit's compute_score takes `rewards` "
                          "(a reward spec such as 'format,accuracy:2.0')")
    rewards = _rewards(json.dumps(_plain(spec), sort_keys=True))
    info = dict(extra_info or {})
    columns = {key: [value] for key, value in info.items() if key != "response_prefix"}
    columns["prefix"] = [info.get("response_prefix") or ""]
    columns["solution"] = [ground_truth]
    columns["data_source"] = [data_source]
    result: dict[str, float] = {}
    total = 0.0
    for reward in rewards:
        (value,) = reward.fn([solution_str], **columns)
        result[reward.name] = math.nan if value is None else float(value)
        if value is not None:
            total += reward.weight * float(value)
    return {"score": total, **result}
