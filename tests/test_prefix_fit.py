"""Does the prefix fit the data: the pure checks, and what preflight reports with them (few-shot included)."""

from __future__ import annotations

import json

import pytest

from prefill_kit.config import config_from_dict
from prefill_kit.rewards import WeightedReward, parse_reward_spec
from prefill_kit.runs.prefix_fit import prefix_length_problem, solution_format_problems
from tests.conftest import REPO

PREFIX = "<think>\n"
PLAIN_PROMPTS = ["<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n<think>\n"] * 3


def rewards(spec: str) -> list[WeightedReward]:
    return parse_reward_spec(spec)


def test_prefix_length_warns_above_a_quarter_of_the_completion_budget():
    assert prefix_length_problem(64, 256) is None
    assert "65 tokens, more than a quarter of grpo.max_completion_length (256)" in prefix_length_problem(65, 256)


def test_bare_solutions_with_an_answer_tag_nobody_shows_are_reported():
    bare = ["42", "7", "\\frac{1}{2}"]
    (problem,) = solution_format_problems(PREFIX, bare, PLAIN_PROMPTS, rewards("format,accuracy"))
    assert problem.startswith("the prefix opens <think> and format requires <answer>...</answer> after the block, "
                              "but 3 of 3 reference solutions are bare answers and no prompt shows <answer>")
    shown = [p.replace("What", "Answer in <answer></answer>. What") for p in PLAIN_PROMPTS]
    assert solution_format_problems(PREFIX, bare, shown, rewards("format")) == []  # the prompt tells the model
    assert solution_format_problems(PREFIX, bare, PLAIN_PROMPTS, rewards("think_format,accuracy")) == []
    assert solution_format_problems("", bare, PLAIN_PROMPTS, rewards("format")) == []  # no block opened
    assert solution_format_problems(PREFIX, [None, None], PLAIN_PROMPTS, rewards("format")) == []


def test_whole_response_solutions_in_another_block_or_format_are_reported():
    other = ["<reasoning>6*7</reasoning> 42", "<reasoning>3+4</reasoning> 7", "42"]
    (problem,) = solution_format_problems(PREFIX, other, PLAIN_PROMPTS, rewards("think_format"))
    assert problem.startswith("2 of 3 reference solutions are responses opening <reasoning>, but the prefix opens "
                              "<think>")
    think_only = ["<think>\n6*7\n</think>\n42", "<think>\n3+4\n</think>\n<answer>7</answer>"]
    problems = solution_format_problems(PREFIX, think_only, PLAIN_PROMPTS, rewards("format,think_format"))
    assert problems == ["1 of 2 reference solutions that open <think> score below 1.0 on format: the data's format "
                        "is not the one the reward expects; change the reward (its tags) or the solutions"]


@pytest.mark.usefixtures("one_torch_thread")
def test_preflight_reports_the_examples_format_reward_and_the_fit_warnings(tiny_model_dir, tmp_path, capsys):
    from prefill_kit.cli import main
    from prefill_kit.runs.preflight import run_preflight

    shots = tmp_path / "shots.jsonl"  # they close </think> (the render check) but never write <answer> tags
    shots.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"<think>\n{i}\n</think>\n{i}"}) + "\n"
                             for i in range(4)), encoding="utf-8")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "solution": str(2 * i)}) + "\n"
                            for i in range(4)), encoding="utf-8")
    raw = {"model": {"path": str(tiny_model_dir)},
           "data": {"path": str(data), "prefix": "<think>\nFirst, I restate the question in my own words.\n",
                    "few_shot": {"path": str(shots), "shots": 2}},
           "rewards": [{"name": "format"}, {"name": "think_format"}],
           "grpo": {"num_generations": 2, "max_completion_length": 16},
           "train": {"per_device_train_batch_size": 2, "seed": 0}, "output": {"dir": "unused"}}
    report = run_preflight(config_from_dict(raw), num_prompts=1, progress=False)
    assert report.few_shot_examples == 4 and report.few_shot_format == {"format": 0.0, "think_format": 1.0}
    messages = [p.message for p in report.problems if p.severity == "warning"]
    assert any(m.startswith("the few-shot examples score 0.000 on format, not 1.0") for m in messages), messages
    assert not any("on think_format, not 1.0" in m for m in messages)
    assert any("more than a quarter of grpo.max_completion_length (16)" in m for m in messages), messages
    # the examples are in the prompts but show no <answer> either, and the solutions are bare numbers
    assert any(m.startswith("the prefix opens <think> and format requires <answer>") for m in messages), messages

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(raw), encoding="utf-8")
    assert main(["preflight", str(config), "--prompts", "1"]) == 0
    assert "few-shot:    4 examples; their format reward: format 0.000, think_format 1.000" in capsys.readouterr().out


def test_preflight_on_the_shipped_examples_finds_them_in_format(tiny_model_dir):
    from prefill_kit.runs.preflight import run_preflight

    raw = {"model": {"path": str(tiny_model_dir)},
           "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": PREFIX,
                    "few_shot": {"path": str(REPO / "examples" / "math_few_shot.jsonl"), "shots": 1}},
           "rewards": "format,accuracy", "grpo": {"num_generations": 2, "max_completion_length": 16},
           "train": {"per_device_train_batch_size": 2, "seed": 0}, "output": {"dir": "unused"}}
    report = run_preflight(config_from_dict(raw), num_prompts=1, progress=False)
    assert report.few_shot_format == {"format": 1.0}
    assert not any("few-shot" in p.message or "reference solutions" in p.message or "quarter" in p.message
                   for p in report.problems), [p.message for p in report.problems]
