"""How ms-swift's ORM calls map onto prefill-kit's rewards, without ms-swift. The real `swift rlhf` run that checks
the same in place is tests/integrations/test_swift_real.py (CI's ms-swift venv)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from prefill_kit.errors import ConfigError
from prefill_kit.integrations.swift_calls import generated_token_ids, reward_params


def test_a_single_turn_samples_flat_ids_are_its_generated_ids():
    # ms-swift 4.6 single-turn rollouts: one flat list of ints per sample (swift/rl_core/data.py)
    assert generated_token_ids([[5, 6, 7], [8]]) == [[5, 6, 7], [8]]


def test_a_multi_turn_samples_ids_are_all_its_turns_in_order():
    assert generated_token_ids([[[5, 6], [7]], [[8], [], [9, 10]]]) == [[5, 6, 7], [8, 9, 10]]


def test_a_sample_without_ids_generated_none():
    assert generated_token_ids([[], None, [None]]) == [[], [], []]


def test_soft_overlong_takes_swifts_window():
    args = SimpleNamespace(max_completion_length=64, soft_max_length=None, soft_cache_length=16)
    assert reward_params("soft_overlong", args) == {"max_completion_len": 64, "soft_punish_cache": 16}
    args.soft_max_length = 48
    assert reward_params("soft_overlong", args) == {"max_completion_len": 48, "soft_punish_cache": 16}
    assert reward_params("format", args) == {} and reward_params("soft_overlong", None) == {}


def test_soft_overlong_without_swifts_cache_length_is_a_clear_error():
    args = SimpleNamespace(max_completion_length=64, soft_max_length=None, soft_cache_length=None)
    with pytest.raises(ConfigError, match="--soft_cache_length"):
        reward_params("soft_overlong", args)
