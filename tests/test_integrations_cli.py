"""`prefill-kit integrations swift`: where the ms-swift plugin is and how to launch with it. The plugin itself runs
against ms-swift in CI's ms-swift venv (tests/integrations/test_swift_real.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

from prefill_kit.cli import main
from prefill_kit.rewards import available_rewards


def test_prints_the_plugin_path_the_reward_names_and_a_launch_line(capsys):
    assert main(["integrations", "swift"]) == 0
    path_line, names_line, _, launch = capsys.readouterr().out.splitlines()
    path = Path(path_line.removeprefix("ms-swift plugin: "))
    assert path.name == "swift_plugin.py" and path.is_file()
    assert path.parent.name == "integrations" and path.parent.parent.name == "prefill_kit"
    assert names_line.split(": ")[1].split() == [f"prefill_kit_{r}" for r in available_rewards()]
    words = shlex.split(launch)
    assert words[:4] == ["swift", "rlhf", "--rlhf_type", "grpo"]
    assert words[words.index("--external_plugins") + 1] == str(path)
    assert words[words.index("--reward_funcs") + 1:][:2] == ["prefill_kit_format", "prefill_kit_accuracy"]
    assert words[words.index("--response_prefix") + 1] == "<think>\\n"  # as typed: ms-swift decodes \n itself


def test_the_launch_line_takes_the_model_data_and_a_weighted_reward_spec(capsys):
    assert main(["integrations", "swift", "--model", "m dir", "--dataset", "d.jsonl", "--rewards",
                 "format,accuracy:2,soft_overlong"]) == 0
    words = shlex.split(capsys.readouterr().out.splitlines()[-1])
    assert words[words.index("--model") + 1] == "m dir" and words[words.index("--dataset") + 1] == "d.jsonl"
    funcs = words[words.index("--reward_funcs") + 1:words.index("--reward_weights")]
    assert funcs == ["prefill_kit_format", "prefill_kit_accuracy", "prefill_kit_soft_overlong"]
    assert words[words.index("--reward_weights") + 1:][:3] == ["1", "2", "1"]


def test_a_reward_the_plugin_does_not_register_is_refused(capsys):
    assert main(["integrations", "swift", "--rewards", "format,json:dumps"]) == 2
    assert "not prefill-kit rewards" in capsys.readouterr().err
