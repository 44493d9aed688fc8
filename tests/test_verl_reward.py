"""`prefill_kit.integrations.verl.compute_score`, called with the keywords verl's reward managers pass. Run against
verl's own naive reward manager in CI's verl venv (tests/integrations/test_verl_real.py)."""

from __future__ import annotations

import math

import pytest

from prefill_kit.errors import ConfigError
from prefill_kit.integrations.verl import compute_score

PREFIXED = {"index": 0, "response_prefix": "<think>\n", "num_turns": 2, "rollout_reward_scores": {}}
# What the model generated after the prefilled "<think>\n" (verl's solution_str never holds the prefix).
GENERATED = "5 + 2 = 7\n</think>\n<answer>7</answer>"


def score(solution_str=GENERATED, ground_truth="7", extra_info=PREFIXED, **reward_kwargs):
    return compute_score(data_source="gsm8k", solution_str=solution_str, ground_truth=ground_truth,
                         extra_info=extra_info, **reward_kwargs)


def test_the_prefix_from_extra_info_is_scored_in_front_of_the_solution():
    assert score() == {"score": 2.0, "format": 1.0, "accuracy": 1.0}
    # Without the prefix, the same text has no <think>: the format reward must not pass it.
    assert score(extra_info={"index": 0}) == {"score": 1.0, "format": 0.0, "accuracy": 1.0}
    assert score(extra_info=None)["format"] == 0.0


def test_rewards_and_weights_come_from_reward_kwargs():
    assert score(rewards="format:0.5,accuracy:2.0,think_format") == {
        "score": 3.5, "format": 1.0, "accuracy": 1.0, "think_format": 1.0}
    assert score(rewards=[{"name": "accuracy", "weight": 3}]) == {"score": 3.0, "accuracy": 1.0}
    assert score(solution_str="5 + 2 = 8\n</think>\n<answer>8</answer>")["score"] == 1.0


def test_a_row_the_reward_cannot_judge_is_nan_and_left_out_of_the_score():
    result = score(ground_truth=None)
    assert result["format"] == 1.0 and math.isnan(result["accuracy"]) and result["score"] == 1.0


def test_verls_own_keywords_are_accepted_and_unknown_ones_are_a_config_error():
    assert score(reward_router_address=None, reward_model_tokenizer=None)["score"] == 2.0
    with pytest.raises(ConfigError, match=r"unknown \['reward'\]"):
        score(reward="format")
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        score(rewards="nope")


@pytest.mark.parametrize("solution_str", ["", "\x00\ufffd", "</think>" * 1000, "<answer>" + "9" * 5000])
def test_odd_model_output_scores_without_raising(solution_str):
    result = score(solution_str=solution_str)
    assert set(result) == {"score", "format", "accuracy"} and result["format"] == 0.0


def test_a_completion_that_repeats_the_prefix_is_scored_with_it_twice():
    # The adapter passes the prefix on and never guesses: "<think>\n<think>\n..." is not the format.
    assert score(solution_str="<think>\n" + GENERATED)["format"] == 0.0
