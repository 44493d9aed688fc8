"""The light core: render, rewards, export and the CLI run without the `[train]` extra (torch, accelerate, trl,
matplotlib), and a command that needs it says so in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from prefill_kit.cli import main
from prefill_kit.errors import MissingExtraError
from prefill_kit.extras import TRAIN_MODULES, install_train_hint, require_train
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "math_tiny.jsonl"
# Import names of what the core must not need (peft joins [train] too).
HEAVY = ("torch", "accelerate", "trl", "matplotlib", "peft")


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_dependencies_leave_the_training_stack_to_the_train_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    train = _requirement_names(project["optional-dependencies"]["train"])
    assert not core & set(HEAVY), core & set(HEAVY)
    assert {"torch", "accelerate", "trl", "matplotlib"} <= train
    assert set(TRAIN_MODULES) <= train  # every module require_train names is installed by [train]


@pytest.fixture
def without(monkeypatch):
    """Make modules look uninstalled (find_spec -> None, import fails), as in a core-only install."""
    def hide(*names):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def test_require_train_names_the_extra_and_the_missing_modules(without):
    without("trl")
    with pytest.raises(MissingExtraError) as info:
        require_train("prefill-kit train", ("torch", "trl"))
    assert str(info.value) == ("prefill-kit train needs the [train] extra (trl not installed): "
                               + install_train_hint())
    require_train("prefill-kit plot", ("torch",))  # what is there passes


@pytest.mark.parametrize("argv, hidden", [
    (["train", "missing.yaml"], "torch"),
    (["preflight", "missing.yaml"], "trl"),
    (["plot", "runs/x"], "matplotlib"),
    (["make-tiny-model", "out"], "torch"),
    (["reward", str(EXAMPLE), "--rewards", "format", "--plot", "h.png"], "matplotlib"),
])
def test_a_command_that_needs_train_says_so_in_one_line(argv, hidden, without, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    without(hidden)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"needs the [train] extra ({hidden} not installed): {install_train_hint()}\n" in err
    assert not list(tmp_path.iterdir())  # nothing written before the check


# Runs CLI commands in one fresh interpreter where the heavy modules cannot be imported: every import path the
# core commands take is exercised, as in a core-only install (CI also installs the core alone into a fresh venv).
_CORE_ONLY = """
import json, sys
for name in {heavy!r}:
    sys.modules[name] = None
from prefill_kit.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
leaked = sorted(n for n in {heavy!r} if sys.modules.get(n) is not None)
assert not leaked, leaked
print(json.dumps(codes))
"""


def run_core_only(*commands: list[str], cwd) -> tuple[list[int], str]:
    script = _CORE_ONLY.format(heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                            cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def test_render_reward_and_export_run_without_the_train_extra(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    rows = [json.loads(line) for line in open(EXAMPLE, encoding="utf-8")][:4]
    with open(tmp_path / "scored.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"completion": f"ok</think><answer>{row['solution']}</answer>",
                                "prefix": "<think>\n", "solution": row["solution"]}) + "\n")
    codes, stderr = run_core_only(
        ["render", str(EXAMPLE), "-o", "out.jsonl", "--tokenizer", "tok", "--prefix", r"<think>\n"],
        ["reward", "scored.jsonl", "--rewards", "format,accuracy", "-o", "r.jsonl"],
        ["export", "verl", str(EXAMPLE), "-o", "verl", "--tokenizer", "tok", "--prefix", r"<think>\n"],
        ["train", "missing.yaml"],
        cwd=tmp_path)
    assert codes == [0, 0, 0, 2], stderr
    rendered = [json.loads(line) for line in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert len(rendered) == 32 and all(r["prompt_ids"] and r["prefix"] == "<think>\n" for r in rendered)
    assert [json.loads(line)["reward"] for line in open(tmp_path / "r.jsonl")] == [2.0] * 4
    assert (tmp_path / "verl" / "train.parquet").is_file()
    assert "PyTorch was not found" not in stderr  # transformers' advice is noise to the core install (issue 18)
    assert stderr.endswith("prefill-kit train: error: prefill-kit train needs the [train] extra "
                           f"(torch, accelerate, trl not installed): {install_train_hint()}\n")


def test_the_train_hint_from_a_checkout_names_the_checkout():
    """Issue 18: from a source checkout (an editable install), `pip install 'prefill-kit[train]'` would fetch
    another copy from the index; the hint gives the checkout's own editable install first."""
    assert install_train_hint().startswith(f"pip install -e '{REPO}[train]'")
