"""`prefill-kit render` end to end, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "math_tiny.jsonl"


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefill_kit", *args], capture_output=True, text=True, cwd=cwd)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "math_tiny.jsonl"
    shutil.copy(EXAMPLE, path)
    return path


def test_render_example_with_defaults(example):
    result = run_cli("render", str(example), "--prefix", r"<think>\n", "--show", "1")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(example.with_name("math_tiny.prefilled.jsonl"))
    source = read_jsonl(example)
    assert len(rows) == len(source) >= 20
    for row, src in zip(rows, source, strict=True):
        assert row["prompt"].endswith("<|im_start|>assistant\n<think>\n")
        assert row["prompt"].count("<think>\n") == 1
        assert row["prefix"] == "<think>\n"
        assert row["solution"] == src["solution"] and row["id"] == src["id"]
        assert "messages" not in row
    assert "rendered 32 rows" in result.stderr and "chatml" in result.stderr
    assert "⟦<think>\n⟧" in result.stderr  # --show highlights the prefix


def test_render_with_tokenizer_adds_ids_without_special_tokens(example, tmp_path, bos_tokenizer_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "out.jsonl"
    result = run_cli("render", str(example), "-o", str(out), "--tokenizer", str(bos_tokenizer_dir),
                     "--prefix", r"<think>\n")
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    for row in read_jsonl(out):
        assert row["prompt"].startswith("<s>")  # the tokenizer's own template and bos_token
        assert row["prompt_ids"] == tokenizer(row["prompt"], add_special_tokens=False).input_ids
        assert row["prompt_ids"].count(tokenizer.bos_token_id) == 1
        assert row["num_prompt_tokens"] == len(row["prompt_ids"])


def test_render_to_stdout_and_prefix_file(example, tmp_path):
    prefix_file = tmp_path / "prefix.txt"
    prefix_file.write_text("<think>\\n stays literal\n", encoding="utf-8")
    result = run_cli("render", str(example), "-o", "-", "--prefix-file", str(prefix_file))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 32 and rows[0]["prefix"] == "<think>\\n stays literal\n"


def test_question_rows_and_per_row_prefix(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2", "system": "Sys"}) + "\n"
                    + json.dumps({"question": "2+2?", "answer": "4", "prefix": "Answer:"}) + "\n", encoding="utf-8")
    result = run_cli("render", str(data), "--template", "chatml", "--prefix", r"<think>\n")
    assert result.returncode == 0, result.stderr
    first, second = read_jsonl(tmp_path / "q.prefilled.jsonl")
    assert first["prompt"].startswith("<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\n1+1?")
    assert first["prompt"].endswith("assistant\n<think>\n") and first["prefix"] == "<think>\n"
    assert first["solution"] == "#### 2" and first["answer"] == "#### 2"
    assert second["prompt"].endswith("assistant\nAnswer:") and second["prefix"] == "Answer:"


@pytest.mark.parametrize(("template", "message"), [
    ("{{ raise_exception('no system role allowed') }}", "no system role allowed"),
    ("{% for m in messages %}", "syntax error"),
    ("{{ no_such_variable.content }}", "'no_such_variable' is undefined"),
    ("{{ ''.__class__.__mro__ }}", "blocked by the sandbox"),
])
def test_failing_template_exits_nonzero_and_writes_nothing(example, tmp_path, template, message):
    path = tmp_path / "bad.jinja"
    path.write_text(template, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("render", str(example), "-o", str(out), "--template", str(path))
    assert result.returncode != 0
    assert message in result.stderr and "bad.jinja" in result.stderr
    assert f"{example}:1" in result.stderr  # names the input line
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))


def test_row_without_conversation_names_the_line(example, tmp_path):
    lines = example.read_text(encoding="utf-8").splitlines()
    lines.insert(3, json.dumps({"messages": [], "solution": "1"}))
    example.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("render", str(example), "-o", str(out))
    assert result.returncode != 0
    assert f"{example}:4" in result.stderr and "messages" in result.stderr and "empty conversation" in result.stderr
    assert not out.exists()


def test_templates_command_lists_generation_prompt_endings():
    result = run_cli("templates")
    assert result.returncode == 0
    assert "chatml" in result.stdout and repr("<|im_start|>assistant\n") in result.stdout


def test_stdout_is_not_atomic_and_the_error_says_so(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)] + [{"messages": []}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = run_cli("render", str(data), "-o", "-", "--batch-size", "1")
    assert result.returncode == 2
    assert len(result.stdout.splitlines()) == 3  # streamed before the bad row was reached
    assert result.stderr == (f"prefill-kit render: error: {data}:4: field 'messages': missing or empty conversation "
                             "(stdout already holds the rows before it: only a file output is atomic)\n")
    file_result = run_cli("render", str(data), "-o", str(tmp_path / "out.jsonl"), "--batch-size", "1")
    assert file_result.returncode == 2 and "stdout already holds" not in file_result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
