"""Render whole datasets: rows in, rendered rows (prompt, prefix, passthrough columns) out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefill_kit.errors import DataError, TemplateError
from prefill_kit.formats import detect_format, to_conversation
from prefill_kit.render import render_prompt
from prefill_kit.templates import SPECIAL_TOKEN_KEYS, ChatTemplate, load_template


@dataclass(frozen=True)
class RenderOptions:
    """Everything that decides how a row renders. `tokenizer` (optional) adds `prompt_ids`."""

    template: ChatTemplate
    prefix: str = ""
    continue_final: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    format: str = "auto"
    tokenizer: Any = None


def load_tokenizer(spec: Any):
    """A tokenizer object as is, or `AutoTokenizer.from_pretrained(spec)` for a local directory."""
    if spec is None or not isinstance(spec, str | bytes) and not hasattr(spec, "__fspath__"):
        return spec
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec))
    except (OSError, ValueError) as exc:
        raise TemplateError(f"cannot load tokenizer {spec}: {exc}") from None


def resolve_template(template: Any = None, tokenizer: Any = None) -> ChatTemplate:
    """The template to render with: `template` (a ChatTemplate or spec), else the tokenizer's own,
    with the tokenizer's special tokens; `chatml` when neither is given."""
    if isinstance(template, ChatTemplate):
        return template
    if template is not None:
        return load_template(template)
    if tokenizer is None:
        return load_template("chatml")
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                            "pass --template")
    special = {k: v for k in SPECIAL_TOKEN_KEYS if isinstance(v := getattr(tokenizer, k, None), str)}
    return ChatTemplate(source, f"{getattr(tokenizer, 'name_or_path', 'tokenizer')} (chat_template)", special)


def render_row(row: dict[str, Any], options: RenderOptions, fmt: str) -> dict[str, Any]:
    """Render one row; raises DataError (with the field) or TemplateError."""
    conversation = to_conversation(row, fmt)
    prefix = row.get("prefix")
    if prefix is None:
        prefix = options.prefix
    elif not isinstance(prefix, str):
        raise DataError(f"expected a string, got {type(prefix).__name__}", field="prefix")
    rendered = render_prompt(conversation.messages, options.template, prefix,
                             continue_final=options.continue_final, template_kwargs=options.template_kwargs)
    out = {"prompt": rendered.prompt, "prefix": rendered.prefix}
    out.update((k, v) for k, v in row.items() if k not in conversation.consumed and k not in out)
    reference = rendered.solution if rendered.solution is not None else conversation.reference
    if reference is not None and out.get("solution") is None:
        out["solution"] = reference
    return out


def add_prompt_ids(rows: list[dict[str, Any]], tokenizer) -> None:
    """Tokenize prompts as rendered: `add_special_tokens=False`, so a template's BOS is the only one."""
    ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    for row, row_ids in zip(rows, ids, strict=True):
        row["prompt_ids"] = row_ids
        row["num_prompt_tokens"] = len(row_ids)


def render_dataset(data, template=None, tokenizer=None, prefix: str = "", *, continue_final: bool = False,
                   template_kwargs: dict[str, Any] | None = None, format: str = "auto"):
    """Render a `datasets.Dataset`/`IterableDataset` (or a path to one saved, or a JSON Lines file).

    Returns the same kind of dataset with `prompt`, `prefix`, every non-conversation column and,
    with a tokenizer, `prompt_ids` and `num_prompt_tokens`. Bad rows raise DataError naming the row.
    """
    import datasets

    if not isinstance(data, datasets.Dataset | datasets.IterableDataset):
        data = datasets.load_dataset("json", data_files=str(data), split="train")
    tokenizer = load_tokenizer(tokenizer)
    options = RenderOptions(resolve_template(template, tokenizer), prefix, continue_final,
                            dict(template_kwargs or {}), format, tokenizer)
    columns = data.column_names or list(next(iter(data)).keys())
    fmt = detect_format(columns) if format == "auto" else format

    def render_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        out = []
        for i, row in zip(indices, rows, strict=True):
            try:
                out.append(render_row(row, options, fmt))
            except DataError as exc:
                raise exc.located(source="dataset", line=i) from None
        if tokenizer is not None:
            add_prompt_ids(out, tokenizer)
        keys = dict.fromkeys(k for r in out for k in r)
        return {k: [r.get(k) for r in out] for k in keys}

    return data.map(render_batch, batched=True, with_indices=True, remove_columns=columns)
