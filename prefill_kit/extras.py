"""Optional dependency groups: what a command needs beyond the core, checked before anything imports it.

The core (render, rewards, export, the CLI) installs without torch, accelerate or trl, so that it fits beside
verl and ms-swift. Commands that train or plot need `pip install 'prefill-kit[train]'`; they call
`require_train` first, so a missing package is one line naming the extra instead of a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from prefill_kit.errors import MissingExtraError

# The import names of the `[train]` extra in pyproject.toml.
TRAIN_MODULES = ("torch", "accelerate", "trl", "matplotlib")


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of `modules` that cannot be imported here (found without importing them)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require_train(what: str, modules: Sequence[str] = TRAIN_MODULES) -> None:
    """Raise MissingExtraError when any of `modules` (all of `[train]` by default) is missing for `what`."""
    missing = missing_modules(modules)
    if missing:
        raise MissingExtraError(f"{what} needs the [train] extra ({', '.join(missing)} not installed): "
                                f"{install_train_hint()}")


def install_train_hint() -> str:
    """The pip command for `[train]`: from the source checkout this package runs from, else from the index."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "backends").is_dir():  # an editable install of a checkout
        return f"pip install -e '{root}[train]' (this checkout; from the index: pip install 'prefill-kit[train]')"
    return "pip install 'prefill-kit[train]'"
