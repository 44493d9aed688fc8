"""What a chat template does to a multi-turn rollout, found by rendering a probe conversation through it.

For one template: what its generation prompt already writes (a reasoning opener), the stop token that ends
an assistant turn and what the template writes after it, whether rendering is append-only across user, tool
and assistant turns (and which turn it rewrites where not), the bridge after a tool turn and after a user turn,
and, with a tokenizer, whether the prefix and the bridges are token-stable (the ids of the text before them
do not change when a continuation follows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefill_kit.errors import TemplateError
from prefill_kit.prompts.render import _TEMPLATE_THINK_TAIL, render_prompt
from prefill_kit.prompts.tokens import PromptTokenizer
from prefill_kit.prompts.turns import TurnBridge, _atomic, _bridge, _stop
from prefill_kit.templates import ChatTemplate

# Continuations a model commonly starts with: the boundary before them must not merge into one token.
PROBES = ("The", " The", "\n", "1", "<", "{")
_TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                          "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}
_CALL = {"type": "function", "function": {"name": "lookup", "arguments": {"word": "prefix"}}}


@dataclass(frozen=True)
class TemplateAudit:
    """The audit of one template (module docstring). A bridge is None where the template refuses that turn
    (`tool_error` says why for tools); token stability is None without a tokenizer."""

    name: str
    opener: str
    stop: str
    after_stop: str
    tool_bridge: TurnBridge | None
    tool_error: str | None
    user_bridge: TurnBridge
    prefix_stable: bool | None
    bridges_stable: bool | None

    @property
    def append_only(self) -> bool:
        return all(b is None or b.rewrites is None for b in (self.tool_bridge, self.user_bridge))


def audit_template(template: ChatTemplate, *, prefix: str = "", tokenizer: Any = None,
                   template_kwargs: dict[str, Any] | None = None) -> TemplateAudit:
    """Audit `template` with a probe conversation: a user question, a reasoning turn that calls a tool, the
    tool's result, a reasoning answer, then a new user question."""
    kwargs = dict(template_kwargs or {})
    encoder = PromptTokenizer(tokenizer) if tokenizer is not None else None
    user = {"role": "user", "content": "What does prefix mean?"}
    first = render_prompt([user], template, prefix, template_kwargs=kwargs)
    think = _TEMPLATE_THINK_TAIL.search(template.render([user], add_generation_prompt=True, **kwargs))
    opener = think[0] if think else ""

    def turn(text: str, **extra) -> dict[str, Any]:
        reasoning = ("" if first.prefix else "<think>\n") + "I should look it up.\n</think>\n\n"
        return {"role": "assistant", "content": first.prefix + reasoning + text, **extra}

    answered = [user, turn("It is text the answer starts from.")]
    rendered = template.render(answered, **kwargs)
    stop_end, stop = _stop(rendered, _atomic(template, encoder), template)
    user_bridge = _bridge(answered, [{"role": "user", "content": "Thanks!"}], template, prefix, kwargs, None,
                          encoder)[0]
    tool_bridge, tool_error = None, None
    try:
        calling = [user, turn("Let me check.", tool_calls=[_CALL])]
        tool_bridge = _bridge(calling, [{"role": "tool", "content": "a fixed start"}], template, prefix, kwargs,
                              [_TOOL], encoder)[0]
        if tool_bridge.rewrites is None:  # then the answer after the tool, and a new user question
            after = [*calling, {"role": "tool", "content": "a fixed start"}, turn("It is a fixed start.")]
            again = _bridge(after, [{"role": "user", "content": "Thanks!"}], template, prefix, kwargs, [_TOOL],
                            encoder)[0]
            if again.rewrites is not None:
                user_bridge = again if user_bridge.rewrites is None else user_bridge
    except TemplateError as exc:
        tool_error = str(exc)
    prefix_stable = bridges_stable = None
    if encoder is not None:
        prefix_stable = _stable(encoder, first.prompt, "")
        bridges_stable = all(_stable(encoder, stop + b.text, stop) for b in (user_bridge, tool_bridge) if b)
    return TemplateAudit(template.name, opener, stop, rendered[stop_end:], tool_bridge, tool_error, user_bridge,
                         prefix_stable, bridges_stable)


def _stable(encoder: PromptTokenizer, text: str, lead: str) -> bool:
    """Whether `text`'s ids stay a beginning of the ids of `text + probe` for every probe."""
    ids = encoder.encode([text, *(text + p for p in PROBES)])
    return all(row[:len(ids[0])] == ids[0] for row in ids[1:])


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[:width] + "..."


def audit_table(audits: list[TemplateAudit]) -> str:
    """A Markdown table of audits, one row per template."""
    def show(value: str) -> str:
        return "`" + repr(value)[1:-1].replace("|", "\\|") + "`" if value else "(none)"

    def rewrite(bridge: TurnBridge | None, error: str | None = None) -> str:
        if bridge is None:
            return "refused" if error else "-"
        if bridge.rewrites is None:
            return "yes"
        r = bridge.rewrites
        return f"no: rewrites {r.role} turn {r.turn}, {show(_short(r.was))} -> {show(_short(r.now))}"

    def stable(value: bool | None) -> str:
        return "-" if value is None else "yes" if value else "NO"

    lines = ["| template | generation prompt writes | stop token | after stop | append-only (tool) | "
             "append-only (user) | bridge after a tool turn | bridge after a user turn | token-stable (prefix, "
             "bridges) |", "|" + "---|" * 9]
    for a in audits:
        tool = show(a.tool_bridge.text) if a.tool_bridge else "(tools refused)"
        if a.tool_bridge and "a fixed start" not in a.tool_bridge.text:
            tool += " (drops the tool result)"
        lines.append(f"| {a.name} | {show(a.opener)} | {show(a.stop)} | {show(a.after_stop)} | "
                     f"{rewrite(a.tool_bridge, a.tool_error)} | {rewrite(a.user_bridge)} | {tool} | "
                     f"{show(a.user_bridge.text)} | {stable(a.prefix_stable)}, {stable(a.bridges_stable)} |")
    return "\n".join(lines)
