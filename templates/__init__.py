"""Chat templates (`prefill_kit.templates`): find one, and render it exactly as `apply_chat_template` does.

A template is named by a *spec*, resolved in this order:

1. a shipped name (`prefill_kit.templates.available_templates()`), e.g. `chatml`, `qwen3`, `deepseek-r1`;
2. a path to a `.jinja` file;
3. a Hugging Face model or tokenizer directory: its `chat_template.jinja`, else the `chat_template`
   of its `tokenizer_config.json` (a string, or the list-of-named-templates form, whose `default`
   entry is used unless `name=` picks another);
4. a path to a `tokenizer_config.json`.

Special tokens (`bos_token`, `eos_token`, ...) come from the `tokenizer_config.json` beside the
template when there is one, and are passed to the template like `transformers` passes them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from prefill_kit.errors import TemplateError, TemplateSecurityError
from prefill_kit.templates.sandbox import compile_template

# Names a message's reasoning may arrive under; transformers copies it to `reasoning_content` (what
# templates read) and to `thinking` (gpt-oss), so templates see it whichever name the data used.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REASONING_KEYS = frozenset(_REASONING_FIELDS)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")
# The added (atomic) tokens each shipped template's family writes: a prefix never starts inside one of them.
SHIPPED_ADDED_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5": ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    "qwen3": ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<think>", "</think>"),
    "deepseek-r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                    "</think>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
               "<|python_tag|>"),
    "mistral": ("<s>", "</s>", "[INST]", "[/INST]"),
    "gemma": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "phi4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
}


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's source plus the special tokens it is rendered with, and the added tokens of its
    tokenizer (atomic pieces of text: the prefix overlap rule never cuts into one)."""

    source: str
    name: str = "<inline>"
    special_tokens: dict[str, str] = field(default_factory=dict)
    added_tokens: tuple[str, ...] = ()

    @functools.cached_property
    def atomic_tokens(self) -> tuple[str, ...]:
        """Every token the tokenizer keeps whole: the added tokens and the special tokens passed to the template."""
        return tuple(dict.fromkeys((*self.added_tokens, *self.special_tokens.values())))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
               tools: list[dict] | None = None, **template_kwargs: Any) -> str:
        """Render like `tokenizer.apply_chat_template(messages, tokenize=False, ...)`.

        Messages are normalised as transformers does: keys whose value is None are dropped, and
        reasoning given as `reasoning` or `thinking` is also offered as `reasoning_content`.
        Raises `TemplateError` (or `TemplateSecurityError`) naming this template.
        """
        messages = [_normalise(m) for m in messages]
        try:
            compiled = compile_template(self.source)
            return compiled.render(messages=messages, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **{**self.special_tokens, **template_kwargs})
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateSecurityError(f"template {self.name}: blocked by the sandbox: {exc}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"template {self.name}: syntax error at line {exc.lineno}: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {self.name}: {exc}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            raise TemplateError(f"template {self.name}: {type(exc).__name__}: {exc}") from None

    @property
    def generation_prompt_ending(self) -> str:
        """What the template writes to open an assistant turn after one user message."""
        msgs = [{"role": "user", "content": "x"}]
        with_gen = self.render(msgs, add_generation_prompt=True)
        without = self.render(msgs, add_generation_prompt=False)
        return with_gen[len(without):] if with_gen.startswith(without) else with_gen[-24:]


def _normalise(message: dict[str, Any]) -> dict[str, Any]:
    if _REASONING_KEYS.isdisjoint(message) and not any(v is None for v in message.values()):
        return message  # nothing to drop or add; no copy needed: the template cannot change it (immutable sandbox)
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def available_templates() -> list[str]:
    """The shipped template names."""
    return sorted(p.name.removesuffix(".jinja") for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".jinja"))


def _special_tokens(config: dict) -> dict[str, str]:
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _from_tokenizer_config(path: Path, name: str | None, template_file: Path | None = None) -> ChatTemplate:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TemplateError(f"{path}: cannot read tokenizer config: {exc}") from None
    special = _special_tokens(config)
    decoder = config.get("added_tokens_decoder")
    entries = decoder.values() if isinstance(decoder, dict) else ()
    added = tuple(t["content"] for t in entries if isinstance(t, dict) and isinstance(t.get("content"), str))
    if template_file is not None:
        return ChatTemplate(template_file.read_text(encoding="utf-8"), str(template_file), special, added)
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        wanted = name or "default"
        if wanted not in named:
            raise TemplateError(f"{path}: no chat template named {wanted!r}; it has {sorted(map(str, named))}")
        source = named[wanted]
    if not isinstance(source, str):
        raise TemplateError(f"{path}: has no `chat_template`")
    return ChatTemplate(source, f"{path}#chat_template" + (f"[{name}]" if name else ""), special, added)


def load_template(spec: str | Path, *, name: str | None = None) -> ChatTemplate:
    """Resolve a template spec (see the module docstring) into a `ChatTemplate`."""
    text = str(spec)
    if text in available_templates():
        source = resources.files(__name__).joinpath(f"{text}.jinja").read_text(encoding="utf-8")
        return ChatTemplate(source, text, added_tokens=SHIPPED_ADDED_TOKENS.get(text, ()))
    path = Path(text).expanduser()
    if path.is_dir():
        config = path / "tokenizer_config.json"
        jinja_file = path / "chat_template.jinja"
        if config.is_file():
            return _from_tokenizer_config(config, name, jinja_file if jinja_file.is_file() else None)
        if jinja_file.is_file():
            return ChatTemplate(jinja_file.read_text(encoding="utf-8"), str(jinja_file))
        raise TemplateError(f"{path}: directory has neither chat_template.jinja nor tokenizer_config.json")
    if path.is_file():
        if path.suffix == ".json":
            return _from_tokenizer_config(path, name)
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    raise TemplateError(f"unknown template {text!r}: not a shipped name ({', '.join(available_templates())}), "
                        "a .jinja file, a model directory or a tokenizer_config.json")
