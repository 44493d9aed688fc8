"""How rows render: `RenderOptions`, and their resolution from what a user gives (a template spec, a tokenizer
directory). The CLI (`prefill-kit render`, `export verl`), the training config (`render_dataset`) and the verl
export all build their options here, so a flag, a config key and an argument mean the same thing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from prefill_kit.data.formats import FORMATS, consumed_columns, detect_format
from prefill_kit.errors import ConfigError, TemplateError
from prefill_kit.prompts.few_shot import FewShot
from prefill_kit.templates import SPECIAL_TOKEN_KEYS, ChatTemplate, load_template

ON_ERROR = ("fail", "skip")
ID_COLUMNS = ("prompt_ids", "num_prompt_tokens")


@dataclass(frozen=True)
class RenderOptions:
    """Everything that decides how a row renders. `tokenizer` (optional) adds `prompt_ids`.

    `columns` renames input columns before detection; `on_error="skip"` turns bad rows into rejects;
    `max_prompt_tokens` rejects longer prompts (after giving them fewer few-shot examples);
    `check_tokens` audits the prefix boundary; `few_shot` puts worked examples before each row. A `prompt`
    string that is already rendered (it holds the template's assistant opening) is an error, or with
    `pass_rendered` is copied unchanged.
    """

    template: ChatTemplate
    prefix: str = ""
    continue_final: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    format: str = "auto"
    tokenizer: Any = None
    columns: dict[str, str] = field(default_factory=dict)
    on_error: str = "fail"
    max_prompt_tokens: int | None = None
    check_tokens: bool = False
    pass_rendered: bool = False
    few_shot: FewShot | None = None

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError(f"format: unknown {self.format!r}; expected auto or one of {', '.join(FORMATS)}")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"on_error: expected one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items()):
            raise ConfigError('columns: expected a mapping of column names, e.g. {"src": "dst"}')
        if self.tokenizer is None and (self.max_prompt_tokens is not None or self.check_tokens):
            raise ConfigError("max_prompt_tokens and check_tokens count tokens: they need a tokenizer")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens: expected a positive integer, got {self.max_prompt_tokens}")
        if self.few_shot is not None and not isinstance(self.few_shot, FewShot):
            raise ConfigError("few_shot: expected prefill_kit.prompts.few_shot.load_few_shot(...), got "
                              f"{type(self.few_shot).__name__}")


def resolve_options(template: Any = None, tokenizer: Any = None, **settings: Any) -> RenderOptions:
    """RenderOptions from what a user gives: `tokenizer` as an object or a directory (`load_tokenizer`),
    `template` as a ChatTemplate, a spec or None (`resolve_template`); `settings` are the other fields."""
    tokenizer = load_tokenizer(tokenizer)
    return RenderOptions(resolve_template(template, tokenizer), tokenizer=tokenizer, **settings)


def load_tokenizer(spec: Any):
    """A tokenizer object as is, or `AutoTokenizer.from_pretrained(spec)` for a local directory.

    Any failure of the loader is a TemplateError naming the directory: loaders raise OSError, ValueError,
    TypeError (a T5 tokenizer.json), ImportError (tekken.json without mistral-common), KeyError, ...
    """
    if spec is None or not isinstance(spec, str | bytes) and not hasattr(spec, "__fspath__"):
        return spec
    text = os.fsdecode(spec)
    path = os.path.expanduser(text)
    if not os.path.exists(path) and (os.path.isabs(path) or text.startswith((".", "~")) or text.count("/") > 1):
        raise TemplateError(f"tokenizer {text}: no such directory")
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if "tokenizer.model" in files and not files & {"tokenizer.json", "tokenizer_config.json"}:
            raise TemplateError(f"tokenizer {text}: the directory holds a SentencePiece tokenizer.model but neither "
                                "tokenizer.json nor tokenizer_config.json, which say how to load it (the tokenizer "
                                "class, the special tokens): copy them from the model's repository")
    from transformers import AutoTokenizer

    cached = not os.path.exists(path)  # a model id: only from the local Hugging Face cache, never a download
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=cached)
    except Exception as exc:  # noqa: BLE001 - third-party loaders raise many types; the CLI prints one line
        if cached:
            raise TemplateError(f"tokenizer {text}: no such directory, and no model of that id in the local "
                                "Hugging Face cache") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TemplateError(f"cannot load tokenizer {text}: {type(exc).__name__}: {reason}") from None


def resolve_template(template: Any = None, tokenizer: Any = None) -> ChatTemplate:
    """The template to render with: `template` (a ChatTemplate or spec), else the tokenizer's own,
    with the tokenizer's special tokens; `chatml` when neither is given.

    A given template (a file, a shipped name, a directory) gets the tokenizer's `bos_token`, `eos_token`, ...
    too, as `apply_chat_template` passes them: without them a template that writes `{{ bos_token }}` renders
    no BOS, silently, and one that computes with it fails on every row.
    """
    added = _added_tokens(tokenizer)
    special = {k: v for k in SPECIAL_TOKEN_KEYS if isinstance(v := getattr(tokenizer, k, None), str)}
    if isinstance(template, ChatTemplate):
        return _with_tokens(template, special, added)
    if template is not None:
        return _with_tokens(load_template(template), special, added)
    if tokenizer is None:
        return load_template("chatml")
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                            "pass --template")
    return ChatTemplate(source, f"{getattr(tokenizer, 'name_or_path', 'tokenizer')} (chat_template)", special, added)


def _added_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The contents of the tokenizer's added tokens (special or not): text it never cuts into."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tuple(str(getattr(t, "content", t)) for t in decoder.values())


def _with_tokens(template: ChatTemplate, special: dict[str, str], added: tuple[str, ...]) -> ChatTemplate:
    """`template` with the tokenizer's special tokens (they win: the tokenizer is what encodes the prompt) and
    added tokens."""
    if not special and not added:
        return template
    return dataclasses.replace(template, special_tokens={**template.special_tokens, **special},
                               added_tokens=tuple(dict.fromkeys((*template.added_tokens, *added))))


def check_template(options: RenderOptions) -> None:
    """With on_error=skip, fail once when the template does not compile, instead of rejecting every row.

    (With on_error=fail the first row raises it anyway, naming that row.)
    """
    import jinja2

    from prefill_kit.templates.sandbox import compile_template

    try:
        compile_template(options.template.source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {options.template.name}: syntax error at line {exc.lineno}: "
                            f"{exc.message}") from None


def detect(columns: list[str], options: RenderOptions) -> str:
    """The format to read rows as: `options.format`, or detected from the (renamed) columns."""
    if options.format != "auto":
        return options.format
    return detect_format([options.columns.get(c, c) for c in columns])


def output_columns(columns: list[str], fmt: str, options: RenderOptions) -> list[str]:
    """The fixed column list of a columnar output (Arrow, Parquet, Dataset) for these input columns."""
    renamed = [options.columns.get(c, c) for c in columns]
    consumed = consumed_columns(fmt, renamed)
    out = ["prompt", "prefix", *(c for c in renamed if c not in consumed and c not in ("prompt", "prefix"))]
    if "solution" not in out:
        out.append("solution")
    if options.few_shot is not None and "few_shot_indices" not in out:
        out.append("few_shot_indices")
    return out + list(ID_COLUMNS) * (options.tokenizer is not None)
