"""What a training run can check before it loads anything: its paths and its rewards.

A model that is not there should cost a one-line error naming the config key, not a minute of network retries
and a traceback. So every path is checked first: a local path must exist; a name that can only be a Hugging
Face Hub id (`org/name`) is looked up once, with no retries: in the local cache under `HF_HUB_OFFLINE=1`,
else with one request to the Hub. Rewards are resolved (names looked up, `module:function` imported) before
any model loads too.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefill_kit.config import TrainingConfig
from prefill_kit.errors import ConfigError, PrefillKitError
from prefill_kit.prompts.training_data import check_eval_held_out

HUB_TIMEOUT_S = 10.0  # one request; a Hub that does not answer within this is unreachable
# The file a cached snapshot must hold to count as that kind of repository.
_MARKER = {"model.path": "config.json", "model.tokenizer": "tokenizer_config.json"}


def check_paths(config: TrainingConfig) -> None:
    """The model, tokenizer and data paths of the config exist (locally, or on the Hub where that is meant), and
    the eval data is held out. Train (both backends) and preflight call this one function, so that preflight
    never calls ready what train refuses."""
    check_model_source("model.path", config.model.path)
    if config.model.tokenizer:
        check_model_source("model.tokenizer", config.model.tokenizer)
    check_data_path("data.path", config.data.path)
    if config.data.eval_path:
        check_data_path("data.eval_path", config.data.eval_path)
        check_eval_held_out(config.data.path, config.data.eval_path)
    if config.data.few_shot is not None:
        check_data_path("data.few_shot.path", config.data.few_shot.path)


def check_data_path(key: str, path: str) -> None:
    """A data file, a dataset directory, or a glob that matches something."""
    if glob.has_magic(path):
        if not glob.glob(path):
            raise ConfigError(f"{key}: {path}: no file matches")
    elif not Path(path).exists():
        raise ConfigError(f"{key}: {path}: no such file or directory")


def could_be_hub_id(name: str) -> bool:
    """True for `name` or `org/name` as the Hub allows them; never for a path that says it is one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("/", "./", "../", "~")) or os.sep != "/" and os.sep in name or name.endswith("/"):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_source(key: str, name: str) -> None:
    """A model (or tokenizer) directory here, or a Hub repository that is cached or answers one request."""
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}: {name} is a file; expected a model directory (or a Hugging Face Hub id)")
        return
    if not could_be_hub_id(name):
        raise ConfigError(f"{key}: {name}: no such directory")
    cached = hub_cache_has(name, _MARKER.get(key, "config.json"))
    if hub_offline():
        if not cached:
            raise ConfigError(f"{key}: {name} is neither a local directory nor in the Hugging Face cache "
                              "(HF_HUB_OFFLINE is set, so the Hub is not asked)")
        return
    problem = hub_lookup(name)
    if problem is None:
        return
    if problem == "not found":
        raise ConfigError(f"{key}: {name} is neither a local directory nor a model on the Hugging Face Hub "
                          "(or it is private and you are not logged in)")
    advice = ("it is in the local cache: set HF_HUB_OFFLINE=1 to use that copy" if cached else
              "check the path, or download the model while online and run with HF_HUB_OFFLINE=1")
    raise ConfigError(f"{key}: {name} is not a local directory, and the Hugging Face Hub is unreachable "
                      f"({problem}); {advice}")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_has(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def hub_lookup(repo_id: str) -> str | None:
    """None when the Hub has `repo_id` (gated counts: access is the download's business), "not found" when it
    has not, else why it could not be asked. One request, no retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None
    except RepositoryNotFoundError:
        return "not found"
    except Exception as exc:  # httpx transport errors, HTTP 5xx: the Hub could not answer
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_rewards(spec: str | Sequence[Mapping[str, Any] | str]):
    """The config's rewards, each looked up (or imported) now; an error names the `rewards` entry at fault."""
    from prefill_kit.rewards import parse_reward_spec

    if isinstance(spec, str):
        return _named("rewards", lambda: parse_reward_spec(spec))
    rewards = []
    for i, entry in enumerate(spec):
        rewards += _named(f"rewards[{i}]", lambda entry=entry: parse_reward_spec([entry]))
    return rewards


def run_rewards(config, reward_funcs: Sequence[Any] | None = None) -> list:
    """The rewards a run scores with: `reward_funcs` when given (objects with `name`, `fn`, `weight`), else
    `config.rewards` resolved; a run needs at least one."""
    rewards = list(reward_funcs) if reward_funcs is not None else resolve_rewards(config.rewards)
    if not rewards:
        raise ConfigError("rewards: at least one reward is needed")
    return rewards


def run_tools(config, rewards: list) -> tuple[Any, list]:
    """The tools of a multi-turn run (a `grpo.tools.ToolConfig`; None for single-turn) and its rewards, with the
    environment's own `get_reward` added as TRL does (named after its class, weight 1). Train and preflight call
    this one function, so both score with the same rewards."""
    if not config.rollout.multi_turn:
        return None, rewards
    from prefill_kit.grpo.multiturn import EnvironmentReward
    from prefill_kit.grpo.tools import load_tools

    r = config.rollout
    tools = load_tools(r.tools, r.environment, r.tool_timeout)
    if tools.reward_name is not None:
        rewards = [*rewards, EnvironmentReward(tools.reward_name)]
    return tools, rewards


def check_rewards_of(config_path: str, spec) -> None:
    """Resolve the config's rewards once, early (before the training stack is imported: seconds), and name the
    config file in the error, as every other config error does."""
    try:
        resolve_rewards(spec)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None


def _named(key: str, resolve):
    try:
        return resolve()
    except PrefillKitError as exc:
        raise ConfigError(f"{key}: {exc}") from None
