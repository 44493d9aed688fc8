"""The core install alone (`pip install prefill-kit`, no `[train]`): run in CI's core venv (.ci/run), where torch,
accelerate, trl and matplotlib are not installed. tests/test_extras.py checks the same import paths in the dev
venv by hiding those modules."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO

if importlib.util.find_spec("torch") is not None:
    pytest.skip("needs an environment without the [train] extra (CI's core venv, see .ci/run)", allow_module_level=True)

EXAMPLE = REPO / "examples" / "math_tiny.jsonl"


def test_nothing_of_the_train_extra_is_installed():
    assert [m for m in ("torch", "accelerate", "trl", "matplotlib", "peft") if importlib.util.find_spec(m)] == []


def test_render_reward_export_and_the_adapters_work(tmp_path, monkeypatch, capsys, tiny_tokenizer):
    from prefill_kit.cli import main
    from prefill_kit.integrations.verl import compute_score

    monkeypatch.chdir(tmp_path)
    tiny_tokenizer.save_pretrained("tok")
    assert main(["render", str(EXAMPLE), "-o", "out.jsonl", "--tokenizer", "tok", "--prefix", r"<think>\n"]) == 0
    rows = [json.loads(line) for line in open("out.jsonl", encoding="utf-8")]
    assert len(rows) == 32 and all(r["prompt_ids"] for r in rows)
    with open("scored.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"completion": f"ok\n</think>\n<answer>{row['solution']}</answer>",
                                "prefix": row["prefix"], "solution": row["solution"]}) + "\n")
    assert main(["reward", "scored.jsonl", "--rewards", "format,accuracy", "-o", "r.jsonl"]) == 0
    assert {json.loads(line)["reward"] for line in open("r.jsonl")} == {2.0}
    assert main(["export", "verl", str(EXAMPLE), "-o", "verl", "--tokenizer", "tok", "--prefix", r"<think>\n"]) == 0
    assert compute_score("x", "7\n</think>\n<answer>7</answer>", "7", {"response_prefix": "<think>\n"})["score"] == 2.0
    assert main(["integrations", "swift"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv", [["train", "x.yaml"], ["preflight", "x.yaml"], ["make-tiny-model", "m"],
                                  ["plot", "runs"]])
def test_train_commands_say_they_need_the_extra(argv, capsys, tmp_path, monkeypatch):
    from prefill_kit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the [train] extra" in err and "pip install 'prefill-kit[train]'" in err
