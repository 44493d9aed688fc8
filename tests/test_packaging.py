"""The wheel installs backends/ and templates/ inside the package, and nothing at the top level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_holds_one_top_level_package_with_backends_and_templates(tmp_path):
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", ".ci", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  ".hypothesis")
    # runs/ at the top holds training output; prefill_kit/runs is a package
    shutil.copytree(REPO, source, ignore=lambda d, names: skip(d, names) | ({"runs"} if d == str(REPO) else set()))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("prefill_kit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"prefill_kit", wheel.name.split("-py")[0] + ".dist-info"}
    assert "prefill_kit/backends/trl.py" in names and "prefill_kit/backends/builtin/loop.py" in names
    assert "prefill_kit/templates/__init__.py" in names and "prefill_kit/templates/sandbox.py" in names
    assert {"prefill_kit/data/readers.py", "prefill_kit/prompts/render.py", "prefill_kit/runs/preflight.py"} \
        <= set(names)
    assert "prefill_kit/integrations/swift_plugin.py" in names and "prefill_kit/integrations/verl.py" in names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.endswith(".jinja")}
    assert {"chatml.jinja", "qwen3.jinja", "deepseek-r1.jinja", "llama3.jinja"} <= shipped
    entry_points = zipfile.ZipFile(wheel).read(wheel.name.split("-py")[0] + ".dist-info/entry_points.txt").decode()
    assert "prefill-kit = prefill_kit.cli:main" in entry_points
