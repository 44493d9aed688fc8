"""prefill-kit: GRPO with a fixed response prefix, rendered, rewarded and trained right.

The public entry points are re-exported here and imported on first use, so that
`import prefill_kit` stays cheap for the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "render_prompt": "prefill_kit.prompts.render",
    "RenderedPrompt": "prefill_kit.prompts.render",
    "decode_escapes": "prefill_kit.prompts.render",
    "render_dataset": "prefill_kit.prompts.dataset",
    "exact_ids_tokenizer": "prefill_kit.prompts.tokens",
    "turn_bridge": "prefill_kit.prompts.turns",
    "TurnBridge": "prefill_kit.prompts.turns",
    "load_template": "prefill_kit.templates",
    "ChatTemplate": "prefill_kit.templates",
    "available_templates": "prefill_kit.templates",
}
__all__ = list(_EXPORTS)


def __dir__() -> list[str]:
    """`dir(prefill_kit)` shows the lazily imported public API too, not only what is loaded so far."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prefill_kit' has no attribute {name!r}")
