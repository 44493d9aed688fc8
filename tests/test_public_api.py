"""The Python API as users try it: a template by name, `dir()`, `--version`, the README's imports."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

from tests.conftest import REPO

MESSAGES = [{"role": "user", "content": "2+2?"}]


def test_render_prompt_takes_a_template_spec_string():
    from prefill_kit import load_template, render_prompt

    by_name = render_prompt(MESSAGES, "deepseek-r1", "<think>\n")
    assert by_name == render_prompt(MESSAGES, load_template("deepseek-r1"), "<think>\n")
    assert by_name.prompt.endswith("<｜Assistant｜><think>\n") and by_name.prefix == "<think>\n"


def test_dir_lists_the_public_api_and_each_name_resolves():
    import prefill_kit

    assert set(prefill_kit.__all__) <= set(dir(prefill_kit))
    for name in prefill_kit.__all__:
        assert getattr(prefill_kit, name) is not None


def test_version_flag_prints_the_installed_version():
    result = subprocess.run([sys.executable, "-m", "prefill_kit", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout == f"prefill-kit {importlib.metadata.version('prefill-kit')}\n"


def test_readme_python_examples_run():
    """The README's ```python blocks that check themselves (they hold `assert`s) run as written; the others
    sketch a training script with the user's own model and data."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert any("from prefill_kit.rewards import accuracy_reward, format_reward" in b for b in blocks)
    runnable = [b for b in blocks if "\nassert " in b]
    assert runnable
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {})
