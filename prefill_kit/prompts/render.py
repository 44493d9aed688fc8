"""Render a conversation into a prefilled GRPO prompt, and one input row into one output row.

Names used throughout prefill-kit:

- **generation prompt**: the template's rendering with `add_generation_prompt=True`, i.e. the
  conversation followed by an open assistant turn.
- **prefix**: text the rollout must start from, e.g. ``"<think>\\n"``. It belongs to the prompt: the model
  conditions on it and never samples (or trains on) it.
- **prompt**: generation prompt + the part of the prefix the template did not already write.
- **effective prefix**: what the model continues from after the assistant header, stored per row so
  that rewards can score ``prefix + completion``. It includes a reasoning opener the template itself
  writes (R1-style templates end with ``<think>\\n``), so a format reward sees ``<think>`` even when
  the user asked for no prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefill_kit.data.formats import Conversation, message_text, row_tools, to_conversation
from prefill_kit.errors import ConfigError, DataError, TemplateError
from prefill_kit.prompts import few_shot
from prefill_kit.templates import ChatTemplate, load_template

if TYPE_CHECKING:
    from prefill_kit.prompts.options import RenderOptions

# A reasoning block the template opened (or opened and closed empty, as Qwen3 does with
# enable_thinking=False) at the very end of its generation prompt.
_TEMPLATE_THINK_TAIL = re.compile(r"<think>(?:\s*</think>)?\s*\Z")
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|[ntr\\])")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


@dataclass(frozen=True)
class RenderedPrompt:
    """One rendered row: the full `prompt` text, its effective `prefix`, and the `solution` taken
    from a trailing assistant message (None when there was none)."""

    prompt: str
    prefix: str
    solution: str | None = None


def decode_escapes(text: str) -> str:
    """Decode ``\\n``, ``\\t``, ``\\r``, ``\\\\`` and ``\\uXXXX`` as typed on a command line; keep all else.

    A shell passes ``--prefix '<think>\\n'`` as a backslash and an ``n``; users mean a newline.
    """
    return _ESCAPE.sub(lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "u" else _ESCAPES[m[1]], text)


def prefix_overlap(text: str, prefix: str, atomic: tuple[str, ...] = ()) -> int:
    """Length of the longest beginning of `prefix` that `text` already ends with, on a token boundary.

    Only overlaps holding a non-space character count: a header ending in ``\\n`` must not eat the
    newline a prefix starts with. An overlap may not begin inside one of the `atomic` tokens (added tokens
    such as ``<|im_sep|>``): the ``>`` that ends it is not the ``>`` a prefix ``> quoted`` starts with.
    """
    k = min(len(prefix), len(text))
    while k > 0:
        # the next candidate: only a beginning of `prefix` that ends with text's last character can be an ending
        # of text (the same lengths, longest first, as trying each one; a row's render pays one or two tries)
        k = prefix.rfind(text[-1], 0, k) + 1
        if k and text.endswith(prefix[:k]) and prefix[:k].strip() and not _inside_token(text, len(text) - k, atomic):
            return k
        k -= 1
    return 0


def _inside_token(text: str, position: int, tokens: tuple[str, ...]) -> bool:
    """Whether `position` falls strictly inside an occurrence of one of `tokens` in `text`."""
    for token in tokens:
        start = text.find(token, max(0, position - len(token) + 1))
        while 0 <= start < position:
            if start + len(token) > position:
                return True
            start = text.find(token, start + 1)
    return False


def assistant_opening(template: ChatTemplate, template_kwargs: dict[str, Any] | None = None) -> str | None:
    """What the template writes between a user message and the assistant's text (e.g.
    ``<|im_end|>\\n<|im_start|>assistant\\n``), without a reasoning opener; None when that is only whitespace.

    A prompt string that holds it was rendered already: wrapping it again would nest two conversations.
    """
    sentinel = "\x00PREFILL_KIT_USER\x00"
    rendered = template.render([{"role": "user", "content": sentinel}], add_generation_prompt=True,
                               **(template_kwargs or {}))
    cut = rendered.rfind(sentinel)
    if cut < 0:
        return None
    tail = rendered[cut + len(sentinel):]
    think = _TEMPLATE_THINK_TAIL.search(tail)
    tail = tail[:think.start()] if think else tail
    return tail if tail.strip() else None


def render_prompt(messages: list[dict[str, Any]], template: ChatTemplate | str | Path, prefix: str = "", *,
                  continue_final: bool = False, template_kwargs: dict[str, Any] | None = None,
                  tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
    """Render `messages` with `template` into a prompt that ends with `prefix`, written once.

    `template` is a loaded `ChatTemplate` or a spec for `load_template` (`"deepseek-r1"`, a `.jinja` file,
    a model directory).

    - Without `continue_final`, a trailing assistant message is the reference answer: it is removed
      from the prompt and returned as `solution` (as ms-swift does for GRPO).
    - With `continue_final`, the conversation must end in an assistant message; it is rendered left
      open (transformers' `continue_final_message`) and its text becomes the prefix, after `prefix`
      is applied to its beginning if it does not already start with it.
    - The returned prefix is the effective prefix (module docstring).
    - `tools` (JSON schemas) go to the template as `apply_chat_template(..., tools=...)` passes them.

    Raises `DataError` for an empty conversation and `TemplateError` when the template fails.
    """
    if not isinstance(template, ChatTemplate):
        template = load_template(template)
    if not messages:
        raise DataError("empty conversation", field="messages")
    kwargs = dict(template_kwargs or {})
    if tools is not None:
        kwargs["tools"] = tools
    if continue_final:
        return _render_continue_final(messages, template, prefix, kwargs)

    solution = None
    if messages[-1].get("role") == "assistant":
        solution = message_text(messages[-1].get("content"))
        messages = messages[:-1]
        if not messages:
            raise DataError("conversation holds only an assistant message", field="messages")
    generation_prompt = template.render(messages, add_generation_prompt=True, **kwargs)
    k = prefix_overlap(generation_prompt, prefix, template.atomic_tokens)
    think_tail = _TEMPLATE_THINK_TAIL.search(generation_prompt)
    if think_tail and "</think>" in think_tail[0] and "<think>" in prefix[k:]:
        raise ConfigError(_conflict(template, think_tail[0], prefix, kwargs))
    written = max(k, len(think_tail[0]) if think_tail else 0)
    effective = generation_prompt[len(generation_prompt) - written:] + prefix[k:]
    return RenderedPrompt(generation_prompt + prefix[k:], effective, solution)


def _conflict(template: ChatTemplate, closed: str, prefix: str, kwargs: dict[str, Any]) -> str:
    import json

    how = f"with template kwargs {json.dumps(kwargs)}" if kwargs else "by default"
    return (f"template {template.name} closes an empty reasoning block ({closed!r}) {how}, and the prefix "
            f"{prefix!r} opens a new one: every response would hold two reasoning blocks and the format reward "
            f"could never be 1. Drop the prefix, or let the template open the block"
            + (" (change those template kwargs, e.g. enable_thinking: true)" if kwargs else ""))


def _render_continue_final(messages, template, prefix, kwargs) -> RenderedPrompt:
    last = messages[-1]
    if last.get("role") != "assistant":
        raise DataError("continue_final needs a conversation ending in an assistant message", field="messages")
    partial = message_text(last.get("content"))
    if prefix and not partial.startswith(prefix):
        partial = prefix + partial
    # Render with a sentinel after the partial text and cut there: the same approach as transformers'
    # continue_final_message, which keeps the template's own spacing before the message.
    sentinel = "\x00PREFILL_KIT_CUT\x00"
    rendered = template.render([*messages[:-1], {**last, "content": partial + sentinel}],
                               add_generation_prompt=False, **kwargs)
    cut = rendered.rfind(sentinel)
    if cut < 0:
        raise TemplateError(f"template {template.name}: it drops the final assistant message, "
                            "so that message cannot be continued")
    prompt = rendered[:cut]
    if not prompt.endswith(partial):
        raise TemplateError(f"template {template.name}: it rewrites the final assistant message "
                            "(e.g. strips reasoning), so that message cannot be continued verbatim")
    return RenderedPrompt(prompt, partial, None)


@dataclass(frozen=True)
class RowConversation:
    """An input row read for rendering: the `messages` the template gets (few-shot examples in front), the
    row's `prefix`, its `conversation` (consumed columns, reference answer) and the few-shot `examples` put in
    front (None without few-shot)."""

    messages: list[dict[str, Any]]
    prefix: str
    conversation: Conversation
    examples: list[few_shot.Example] | None


def without_reference(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages `render_prompt` renders (without continue_final): a trailing assistant message is the
    reference answer, never part of the prompt."""
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def is_rendered(row: dict[str, Any], fmt: str, opening: str | None) -> bool:
    """Whether a `prompt` row is already rendered: it holds the template's assistant opening."""
    return opening is not None and fmt == "prompt" and isinstance(row.get("prompt"), str) and opening in row["prompt"]


def read_row(row: dict[str, Any], options: RenderOptions, fmt: str, index: int | None = None,
             shots: int | None = None) -> RowConversation:
    """Read one (already renamed) row as the conversation to render; raises DataError (with the field).

    With few-shot examples, `index` (the row's position in the input) picks them and `shots` caps their number.
    """
    conversation = to_conversation(row, fmt)
    prefix = row.get("prefix")
    if prefix is None:
        prefix = options.prefix
    elif not isinstance(prefix, str):
        raise DataError(f"expected a string, got {type(prefix).__name__}", field="prefix")
    messages, examples = conversation.messages, None
    if options.few_shot is not None:
        if index is None:
            raise ConfigError("few-shot examples are chosen by row index, and this row has none")
        chosen = few_shot.choose_examples(options.few_shot, index, few_shot.row_question(messages))[:shots]
        examples = [options.few_shot.examples[i] for i in chosen]
        messages = few_shot.with_examples(messages, examples, options.few_shot.mode)
    return RowConversation(messages, prefix, conversation, examples)


def render_read(row: dict[str, Any], read: RowConversation, options: RenderOptions) -> dict[str, Any]:
    """The output row of `row` read as `read`: prompt, prefix, passthrough columns, solution; raises
    TemplateError when the template fails."""
    rendered = render_prompt(read.messages, options.template, read.prefix,
                             continue_final=options.continue_final, template_kwargs=options.template_kwargs,
                             tools=row_tools(row))
    out = {"prompt": rendered.prompt, "prefix": rendered.prefix}
    if read.examples is not None:
        few_shot.check_verbatim(rendered.prompt, read.examples, options.template.name, options.few_shot.mode)
        out["few_shot_indices"] = [e.index for e in read.examples]
    out.update((k, v) for k, v in row.items() if k not in read.conversation.consumed and k not in out)
    reference = rendered.solution if rendered.solution is not None else read.conversation.reference
    if reference is not None and out.get("solution") is None:
        out["solution"] = reference
    return out


def render_row(row: dict[str, Any], options: RenderOptions, fmt: str, index: int | None = None,
               shots: int | None = None, *, opening: str | None = None) -> dict[str, Any]:
    """Render one (already renamed) row; raises DataError (with the field) or TemplateError.

    With few-shot examples, `index` (the row's position in the input) picks them and `shots` caps their number.
    `opening` is the template's assistant opening (`assistant_opening`): a `prompt` string holding it is
    already rendered and is never wrapped again.
    """
    if is_rendered(row, fmt, opening):
        return _rendered_row(row, options, opening)
    return render_read(row, read_row(row, options, fmt, index, shots), options)


def _rendered_row(row: dict[str, Any], options: RenderOptions, opening: str) -> dict[str, Any]:
    """A row whose prompt is already rendered: copied unchanged with `pass_rendered`, else an error.

    Its effective prefix is what follows the last assistant opening; a `prefix` column must say the same.
    """
    prompt = row["prompt"]
    if not options.pass_rendered:
        raise DataError(f"already rendered: it holds the template's assistant opening {opening!r}. Rendering it "
                        "again would wrap one conversation in another. Train on the file as it is, or pass "
                        "--pass-rendered to copy such rows unchanged", field="prompt")
    after = prompt[prompt.rfind(opening) + len(opening):]
    prefix = row.get("prefix")
    if prefix is not None and prefix != after:
        raise DataError(f"the rendered prompt ends with {after!r} after the assistant opening, not with the "
                        f"row's prefix {prefix!r}", field="prefix")
    return {**row, "prefix": after}
