"""The package's layers, read from its module-level imports: each layer imports only from the layers below it.

data, then prompts and rewards, then grpo (the algorithm), then runs, then backends (and the integrations
with other stacks), then cli. An import that runs upward makes the lower layer unusable on its own (`data/`
could not be imported without `prompts/`) and hides a cycle; an import inside a function is allowed (it
loads an optional dependency late, or is the CLI's lazy loading), but none may exist only to dodge a cycle.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

# package (first part after prefill_kit) -> layer; modules directly under prefill_kit are the foundation
LAYERS = {"templates": 0, "data": 1, "prompts": 2, "rewards": 2, "grpo": 3, "runs": 4, "backends": 5,
          "integrations": 5, "cli": 6}
FOUNDATION = {"config", "errors", "wording", "extras", "interrupts", "tiny_model", "__init__"}
SOURCES = {"prefill_kit": REPO / "prefill_kit", "backends": REPO / "backends", "templates": REPO / "templates"}


def layer(module: str) -> int:
    """The layer of a dotted module name inside prefill_kit (`prefill_kit.runs.session` -> runs)."""
    parts = module.split(".")
    assert parts[0] == "prefill_kit", module
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return 0
    if parts[1] == "__main__":  # `python -m prefill_kit`: the CLI
        return LAYERS["cli"]
    return LAYERS[parts[1]]


def modules():
    for top, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            name = ".".join(("prefill_kit",) + ((top,) if top != "prefill_kit" else ()) + rel)
            yield name.removesuffix(".__init__"), path, "/".join((top, *rel)) + ".py"


def module_level_imports(path) -> list[tuple[int, str]]:
    """(line, module) of every prefill_kit import at module level (also under `if`/`try` at the top)."""
    out = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                out.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((node.lineno, node.module))
            elif isinstance(node, ast.If | ast.Try):
                for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                              *[h.body for h in getattr(node, "handlers", [])]):
                    visit(block)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return [(line, name) for line, name in out if name == "prefill_kit" or name.startswith("prefill_kit.")]


def upward_imports() -> list[str]:
    found = []
    for name, path, shown in modules():
        if name == "prefill_kit":
            continue  # the package's lazy re-exports
        for line, target in module_level_imports(path):
            if layer(target) > layer(name):
                found.append(f"{shown}:{line}: {name} imports {target}")
    return found


def test_every_module_has_a_layer():
    for name, _, _ in modules():
        layer(name)


def test_no_module_level_import_runs_to_a_higher_layer():
    assert upward_imports() == []


@pytest.mark.parametrize("lower, higher", [("data/writers.py", "prefill_kit.prompts.render"),
                                           ("grpo/rollout.py", "prefill_kit.runs.session"),
                                           ("runs/preflight.py", "prefill_kit.backends.trl")])
def test_an_upward_import_is_found(tmp_path, monkeypatch, lower, higher):
    """The check can fail: the same files with one upward import added are refused."""
    package = tmp_path / "prefill_kit"
    import shutil

    shutil.copytree(REPO / "prefill_kit", package)
    target = package / lower
    target.write_text(f"import {higher}\n" + target.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setitem(SOURCES, "prefill_kit", package)
    assert any(f"imports {higher}" in found for found in upward_imports())


def test_preflight_imports_nothing_from_the_backends():
    """Not even inside a function: preflight checks a run with the algorithm's own code, not a backend's."""
    tree = ast.parse((REPO / "prefill_kit/runs/preflight.py").read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("prefill_kit.backends")]
