"""What a new user meets (issue 18): one line on stderr, the right exit code, no traceback, no leftovers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "math_tiny.jsonl"


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefill_kit", *args], capture_output=True, text=True, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"prefill-kit {command}: error: "), line
    return line


def test_reward_of_a_missing_file(tmp_path):
    line = one_error_line(run_cli("reward", "nothere.jsonl", "--rewards", "format", cwd=tmp_path), "reward")
    assert line.endswith("nothere.jsonl: no such file")


def test_render_with_a_missing_prefix_file(tmp_path):
    line = one_error_line(run_cli("render", str(EXAMPLE), "--prefix-file", "nothere.txt", "-o", "out.jsonl",
                                  cwd=tmp_path), "render")
    assert line.endswith("nothere.txt: no such file (given as --prefix-file)")
    assert list(tmp_path.iterdir()) == []


def _t5_like(directory):
    """A tokenizer directory whose loader raises something other than OSError/ValueError."""
    from tokenizers import Tokenizer, models

    directory.mkdir()
    Tokenizer(models.Unigram([("<pad>", 0.0), ("a", -1.0)])).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))


def _tekken(directory):
    directory.mkdir()
    (directory / "tekken.json").write_text("{}")


def _sentencepiece_only(directory):
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(b"\x0a\x00")


@pytest.mark.parametrize("make, expected", [
    (_t5_like, "cannot load tokenizer bad: "),
    (_tekken, "cannot load tokenizer bad: "),
    (_sentencepiece_only, "holds a SentencePiece tokenizer.model but neither tokenizer.json nor tokenizer_config.json"),
], ids=["t5", "tekken", "sentencepiece-only"])
def test_a_tokenizer_the_loader_cannot_load(tmp_path, make, expected):
    make(tmp_path / "bad")
    result = run_cli("render", str(EXAMPLE), "--tokenizer", "bad", "-o", "out.jsonl", cwd=tmp_path)
    assert expected in one_error_line(result, "render")
    assert "tiktoken" not in result.stderr


@pytest.mark.parametrize("spec", ["/nope", "./nope", "nope"])
def test_a_tokenizer_directory_that_is_not_there(tmp_path, spec):
    line = one_error_line(run_cli("export", "verl", str(EXAMPLE), "-o", "out", "--tokenizer", spec, cwd=tmp_path),
                          "export")
    assert f"tokenizer {spec}: no such directory" in line and "Repo id" not in line


def test_an_empty_input_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    line = one_error_line(run_cli("render", "empty.jsonl", "-o", "out.jsonl", cwd=tmp_path), "render")
    assert line.endswith("empty.jsonl: no rows: the input is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_an_unclosed_json_object_is_reported_at_the_end_of_its_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"completion": "x"}\n{"completion": "y"\n')
    line = one_error_line(run_cli("reward", "c.jsonl", "--rewards", "format", cwd=tmp_path), "reward")
    assert line.endswith("c.jsonl:2: invalid JSON: Expecting ',' delimiter at the end of the line")


def test_every_row_rejected_is_an_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"problem": 1}\n{"problem": 2}\n')
    result = run_cli("render", "d.jsonl", "-o", "out.jsonl", "--on-error", "skip", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == ("prefill-kit render: error: all 2 rows were rejected "
                                              "(see out.rejects.jsonl)")


def test_reward_warns_when_most_completions_already_start_with_the_prefix(tmp_path):
    """Issue 18: `--prefix '<think>\\n'` on completions that start with it gave format 0.0 everywhere, silently."""
    rows = [{"completion": "<think>\nadd them\n</think>\n<answer>4</answer>"}] * 3
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doubled = run_cli("reward", "c.jsonl", "--rewards", "format", "--prefix", r"<think>\n", cwd=tmp_path)
    assert doubled.returncode == 0, doubled.stderr
    assert "warning: 3 of 3 completions already start with their prefix" in doubled.stderr
    assert "--completions-include-prefix" in doubled.stderr
    assert "format (x1)                    0.0000" in doubled.stdout  # the scores stay as they are
    right = run_cli("reward", "c.jsonl", "--rewards", "format", "--completions-include-prefix", cwd=tmp_path)
    assert right.returncode == 0 and "warning" not in right.stderr
    assert "format (x1)                    1.0000" in right.stdout


def test_reward_does_not_warn_when_few_completions_start_with_the_prefix(tmp_path):
    rows = [{"completion": "add them\n</think>\n<answer>4</answer>"}] * 2 + [{"completion": "<think>\nx</think>"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("reward", "c.jsonl", "--rewards", "format", "--prefix", r"<think>\n", cwd=tmp_path)
    assert result.returncode == 0 and "warning" not in result.stderr


def test_an_unknown_option_gets_the_commands_usage(tmp_path):
    result = run_cli("render", str(EXAMPLE), "--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: prefill-kit render ")
    assert result.stderr.splitlines()[-1] == "prefill-kit render: error: unrecognized arguments: --bogus"


def test_output_into_a_missing_directory_is_an_error(tmp_path):
    line = one_error_line(run_cli("render", str(EXAMPLE), "-o", "nodir/out.jsonl", cwd=tmp_path), "render")
    assert line.endswith("-o nodir/out.jsonl: directory nodir does not exist (create it first)")
    assert list(tmp_path.iterdir()) == []


def test_few_shot_errors_name_the_flags_and_no_trim_count_without_the_flag(tmp_path):
    few_shot = str(REPO / "examples" / "math_few_shot.jsonl")
    line = one_error_line(run_cli("render", str(EXAMPLE), "-o", "o.jsonl", "--few-shot", few_shot, "--shots", "50",
                                  cwd=tmp_path), "render")
    assert "--shots: 50 examples per row" in line and "few_shot.shots" not in line
    ok = run_cli("render", str(EXAMPLE), "-o", "o.jsonl", "--few-shot", few_shot, "--shots", "2", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "few-shot: 2 of 8 examples" in ok.stderr and "--max-prompt-tokens" not in ok.stderr


def _config(tmp_path, **rewards) -> str:
    import yaml

    raw = {"model": {"path": str(tmp_path / "model")}, "data": {"path": str(EXAMPLE)},
           "rewards": [{"name": "format"}, {"name": "fromat"}], "output": {"dir": str(tmp_path / "run")}}
    raw.update(rewards)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp_path / "cfg.yaml")


def test_a_set_typo_is_blamed_on_the_set_not_the_file(tmp_path):
    cfg = _config(tmp_path, rewards=[{"name": "format"}])
    line = one_error_line(run_cli("train", cfg, "--set", "train.learning_rat=1e-3", cwd=tmp_path), "train")
    assert f"error: --set 'train.learning_rat=1e-3' (over {cfg}): train.learning_rat: unknown key" in line


@pytest.mark.parametrize("command", ["train", "preflight"])
def test_an_unknown_reward_names_the_config_file(tmp_path, command, monkeypatch):
    line = one_error_line(run_cli(command, _config(tmp_path), cwd=tmp_path), command)
    assert f"error: {tmp_path / 'cfg.yaml'}: rewards[1]: unknown reward 'fromat'" in line
