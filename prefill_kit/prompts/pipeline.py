"""Render whole datasets: rows in, rendered rows (prompt, prefix, passthrough columns) out.

`BatchRenderer` is the one place a batch of located input rows becomes output rows and rejects;
the file pipeline (`prefill_kit.prompts.render_file`) and `render_dataset` (HF datasets) both use it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefill_kit.data.formats import (
    FORMATS,
    consumed_columns,
    detect_format,
    rename_columns,
    row_tools,
    to_conversation,
)
from prefill_kit.data.readers import Record
from prefill_kit.data.writers import to_columns
from prefill_kit.errors import ConfigError, DataError, PrefillKitError, TemplateError, TemplateSecurityError
from prefill_kit.interrupts import ignore_interrupts, interrupts_ignored_by_new_processes, leave_signals_to_parent
from prefill_kit.prompts.tokens import BoundaryMerge, PromptTokenizer, boundary_merges, describe_merge
from prefill_kit.prompts.render import assistant_opening, render_prompt
from prefill_kit.templates import SPECIAL_TOKEN_KEYS, ChatTemplate, load_template

if TYPE_CHECKING:
    from prefill_kit.prompts.few_shot import FewShot

ON_ERROR = ("fail", "skip")
ID_COLUMNS = ("prompt_ids", "num_prompt_tokens")
logger = logging.getLogger(__name__)


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
        if self.few_shot is not None:
            from prefill_kit.prompts.few_shot import FewShot

            if not isinstance(self.few_shot, FewShot):
                raise ConfigError("few_shot: expected prefill_kit.prompts.few_shot.load_few_shot(...), got "
                                  f"{type(self.few_shot).__name__}")


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


def render_row(row: dict[str, Any], options: RenderOptions, fmt: str, index: int | None = None,
               shots: int | None = None, *, opening: str | None = None) -> dict[str, Any]:
    """Render one (already renamed) row; raises DataError (with the field) or TemplateError.

    With few-shot examples, `index` (the row's position in the input) picks them and `shots` caps their number.
    `opening` is the template's assistant opening (`render.assistant_opening`): a `prompt` string holding it is
    already rendered and is never wrapped again.
    """
    if opening is not None and fmt == "prompt" and isinstance(row.get("prompt"), str) and opening in row["prompt"]:
        return _rendered_row(row, options, opening)
    conversation = to_conversation(row, fmt)
    prefix = row.get("prefix")
    if prefix is None:
        prefix = options.prefix
    elif not isinstance(prefix, str):
        raise DataError(f"expected a string, got {type(prefix).__name__}", field="prefix")
    messages, examples, chosen = conversation.messages, [], None
    if options.few_shot is not None:
        from prefill_kit.prompts import few_shot

        if index is None:
            raise ConfigError("few-shot examples are chosen by row index, and this row has none")
        chosen = few_shot.choose_examples(options.few_shot, index, few_shot.row_question(messages))[:shots]
        examples = [options.few_shot.examples[i] for i in chosen]
        messages = few_shot.with_examples(messages, examples, options.few_shot.mode)
    rendered = render_prompt(messages, options.template, prefix,
                             continue_final=options.continue_final, template_kwargs=options.template_kwargs,
                             tools=row_tools(row))
    out = {"prompt": rendered.prompt, "prefix": rendered.prefix}
    if chosen is not None:
        few_shot.check_verbatim(rendered.prompt, examples, options.template.name, options.few_shot.mode)
        out["few_shot_indices"] = [e.index for e in examples]
    out.update((k, v) for k, v in row.items() if k not in conversation.consumed and k not in out)
    reference = rendered.solution if rendered.solution is not None else conversation.reference
    if reference is not None and out.get("solution") is None:
        out["solution"] = reference
    return out


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


@dataclass
class BatchResult:
    """Output rows of one batch, its rejects (JSON-ready), the boundary-merge audit, and the rows that got
    fewer few-shot examples: `shots_trimmed` to fit max_prompt_tokens, `shots_short` for want of other questions."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    merges: int = 0
    merge_example: BoundaryMerge | None = None
    shots_trimmed: int = 0
    shots_short: int = 0
    ids_route: str | None = None  # how prompt_ids were computed (`PromptTokenizer.route`)


def reject_entry(record: Record, reason: str, field_name: str | None) -> dict[str, Any]:
    """A rejects-file line: where the row was, why it was rejected, and the row (or raw line) itself."""
    entry = {"source": record.source, record.kind: record.loc, "field": field_name, "reason": reason}
    entry.update({"data": record.row} if record.row is not None else {"raw": record.raw})
    return entry


class BatchRenderer:
    """Turns located records into output rows; bad rows raise (on_error=fail) or become rejects (skip).

    With a tokenizer, rows are rendered in slices and each slice is tokenized on a background thread
    while the next one renders: the tokenizer releases the GIL, so Jinja and BPE run side by side.
    The slice that picks the encoder's route (`PromptTokenizer.route`) is encoded in the foreground, so that
    its CPU-time measurement holds the tokenizer's work only. `encoder` shares one already built (a forked
    worker takes its parent's, with its added-token cutter and memo). Picklable (the thread is not carried),
    so worker processes and `datasets.map` can carry it.
    """

    SLICE = 256

    def __init__(self, options: RenderOptions, fmt: str, encoder: PromptTokenizer | None = None) -> None:
        self.options = options
        self.fmt = fmt
        if encoder is None and options.tokenizer is not None:
            encoder = PromptTokenizer(options.tokenizer)
        self.encoder = encoder
        self._thread: ThreadPoolExecutor | None = None
        self._opening = assistant_opening(options.template, options.template_kwargs) if fmt == "prompt" else None

    def __getstate__(self) -> dict:
        return {"options": self.options, "fmt": self.fmt}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["options"], state["fmt"])

    def __call__(self, records: list[Record]) -> BatchResult:
        result = BatchResult()
        kept: list[Record] = []
        pending: list[Future] = []
        for start in range(0, len(records), self.SLICE):
            first_row = len(result.rows)
            self._render(records[start:start + self.SLICE], result, kept)
            if self.encoder is not None and len(result.rows) > first_row:
                prompts = [r["prompt"] for r in result.rows[first_row:]]
                if self.encoder.route is None:  # not measured yet: measure with nothing else of ours running
                    done: Future = Future()
                    done.set_result(self.encoder.encode(prompts))
                    pending.append(done)
                    continue
                if self._thread is None:
                    self._thread = ThreadPoolExecutor(1, thread_name_prefix="prefill-kit-tokenize")
                pending.append(self._thread.submit(self.encoder.encode, prompts))
        if pending:
            self._add_ids(result, kept, [ids for future in pending for ids in future.result()])
            result.ids_route = self.encoder.route or "piecewise (too few rows to measure)"
        return result

    def _render(self, records: list[Record], result: BatchResult, kept: list[Record]) -> None:
        for record in records:
            if record.error is not None:
                self._bad(result, record, record.error.reason, record.error.field)
                continue
            try:
                row = render_row(rename_columns(record.row, self.options.columns), self.options, self.fmt,
                                 record.index, opening=self._opening)
                result.rows.append(row)
                kept.append(record)
                if self.options.few_shot is not None:
                    result.shots_short += len(row.get("few_shot_indices", ())) < self.options.few_shot.shots
            except DataError as exc:
                self._bad(result, record, exc.reason, exc.field)
            except TemplateSecurityError as exc:  # the template, not the row, is at fault: always fatal
                raise TemplateSecurityError(f"{record.where}: {exc}") from None
            except ConfigError as exc:  # the options conflict (two reasoning openers, a rewritten few-shot
                # example): fatal, named at its row
                raise ConfigError(f"{record.where}: {exc}") from None
            except TemplateError as exc:
                if self.options.on_error == "fail":
                    raise TemplateError(f"{record.where}: {exc}") from None
                result.rejects.append(reject_entry(record, f"template error: {exc}", None))

    def _bad(self, result: BatchResult, record: Record, reason: str, field_name: str | None) -> None:
        if self.options.on_error == "fail":
            if record.kind == "line":
                raise DataError(reason, source=record.source, line=record.loc, field=field_name)
            raise DataError(reason, source=record.where, field=field_name)
        result.rejects.append(reject_entry(record, reason, field_name))

    def _fewer_shots(self, row: dict[str, Any], ids: list[int], record: Record, limit: int):
        """The row rendered with the most of its few-shot examples that fit `limit` tokens (down to none);
        the zero-shot row when even that is over, so that it is rejected with its own length."""
        renamed = rename_columns(record.row, self.options.columns)
        for shots in range(len(row["few_shot_indices"]) - 1, -1, -1):
            row = render_row(renamed, self.options, self.fmt, record.index, shots)
            ids = self.encoder.encode([row["prompt"]])[0]
            if len(ids) <= limit:
                break
        return row, ids

    def _add_ids(self, result: BatchResult, kept: list[Record], ids: list[list[int]]) -> None:
        rows = result.rows
        limit = self.options.max_prompt_tokens
        if limit is not None and any(len(i) > limit for i in ids):
            fits = []
            for row, row_ids, record in zip(rows, ids, kept, strict=True):
                if len(row_ids) > limit and row.get("few_shot_indices"):
                    row, row_ids = self._fewer_shots(row, row_ids, record, limit)
                    result.shots_trimmed += len(row_ids) <= limit
                if len(row_ids) <= limit:
                    fits.append((row, row_ids, record))
                else:
                    self._bad(result, record, f"prompt too long: {len(row_ids)} tokens, more than "
                                              f"max_prompt_tokens={limit}", "prompt")
            rows, ids, kept = (list(c) for c in zip(*fits, strict=True)) if fits else ([], [], [])
            result.rows = rows
        for row, row_ids in zip(rows, ids, strict=True):
            row["prompt_ids"] = row_ids
            row["num_prompt_tokens"] = len(row_ids)
        if self.options.check_tokens and rows:
            merged = boundary_merges(self.encoder, [r["prompt"] for r in rows], [r["prefix"] for r in rows], ids)
            result.merges = len(merged)
            if merged:
                i, whole, split = merged[0]
                result.merge_example = describe_merge(self.options.tokenizer, kept[i].where, whole, split)


class _MapRenderer:
    """`datasets.map` function: a column batch in, rendered columns out (fewer rows when skipping)."""

    def __init__(self, renderer: BatchRenderer, columns: list[str], out_columns: list[str], offset: int = 0) -> None:
        self.renderer = renderer
        self.columns = columns
        self.out_columns = out_columns
        self.offset = offset  # index of the first row of the shard this renders, for error messages

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        values = [batch[c] for c in self.columns]
        offset = self.offset
        records = [Record("dataset", "row", i + offset + 1, dict(zip(self.columns, row, strict=True)),  # 1-based
                          index=i + offset)
                   for i, row in zip(indices, zip(*values, strict=True), strict=True)]
        result = self.renderer(records)
        for reject in result.rejects:
            logger.warning("skipped dataset row %s: %s%s", reject["row"],
                           f"field {reject['field']!r}: " if reject["field"] else "", reject["reason"])
        return to_columns(result.rows, self.out_columns)


def as_dataset(data):
    import datasets

    if isinstance(data, datasets.Dataset | datasets.IterableDataset):
        return data
    from prefill_kit.data.readers import resolve_inputs

    inputs = resolve_inputs(data)
    kinds = {kind for _, kind in inputs}
    if kinds == {"hf"} and len(inputs) == 1:
        from prefill_kit.data.readers import _load_from_disk

        return _load_from_disk(inputs[0][0])
    builder = {"jsonl": "json", "json": "json"}.get(next(iter(kinds)), next(iter(kinds)))
    if len(kinds) != 1 or builder == "hf":
        raise DataError(f"mixes input types {sorted(kinds)}; pass shards of one type", source=str(data))
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p, _ in inputs], split="train")
    except Exception as exc:  # datasets wraps parser errors in many types; name the input
        if builder == "json" and kinds == {"jsonl"}:
            from prefill_kit.data.readers import first_unreadable_line

            for path, _ in inputs:  # the located error (line, column in the line), not pyarrow's "row 1"
                if (located := first_unreadable_line(path)) is not None:
                    raise located from None
        raise DataError(f"cannot load as {builder}: {exc}", source=str(data)) from None


def render_dataset(data, template=None, tokenizer=None, prefix: str = "", *, continue_final: bool = False,
                   template_kwargs: dict[str, Any] | None = None, format: str = "auto",
                   columns: dict[str, str] | None = None, on_error: str = "fail",
                   max_prompt_tokens: int | None = None, num_proc: int | None = None,
                   batch_size: int = 1000, few_shot: FewShot | None = None):
    """Render a `datasets.Dataset` / `IterableDataset`, or a path to data (any type `prefill-kit render` reads).

    Returns a `Dataset` (an `IterableDataset` for an iterable input) with `prompt`, `prefix`, every
    non-conversation column, `solution` and, with a tokenizer, `prompt_ids` and `num_prompt_tokens`;
    for `GRPOTrainer(train_dataset=...)` pass `prefill_kit.exact_ids_tokenizer(tokenizer)` as its
    `processing_class`, or TRL adds a second BOS on BOS-adding tokenizers. Bad rows raise DataError naming the row,
    or with `on_error="skip"` are dropped and logged (logger `prefill_kit.prompts.pipeline`).
    `few_shot` (`prefill_kit.prompts.few_shot.load_few_shot`) puts worked examples before each row and adds
    `few_shot_indices`.
    """
    import datasets

    data = as_dataset(data)
    tokenizer = load_tokenizer(tokenizer)
    options = RenderOptions(resolve_template(template, tokenizer), prefix, continue_final,
                            dict(template_kwargs or {}), format, tokenizer, dict(columns or {}), on_error,
                            max_prompt_tokens, few_shot=few_shot)
    in_columns = data.column_names or list(next(iter(data)).keys())
    fmt = detect(in_columns, options)
    function = _MapRenderer(BatchRenderer(options, fmt), in_columns, output_columns(in_columns, fmt, options))
    if isinstance(data, datasets.Dataset) and num_proc and num_proc > 1:
        shards = shard_bounds(len(data), num_proc, batch_size)
        if len(shards) > 1 and "fork" in multiprocessing.get_all_start_methods():
            return _map_in_processes(data, function, shards, batch_size)
    return data.map(function, batched=True, batch_size=batch_size, with_indices=True, remove_columns=in_columns)


def shard_bounds(rows: int, num_proc: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, one per process, none smaller than about one batch."""
    n = max(1, min(num_proc, -(-rows // batch_size)))
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)]


_shard_job: tuple | None = None


def _map_in_processes(data, function: _MapRenderer, shards: list[tuple[int, int]], batch_size: int):
    """`data.map(function)` over contiguous shards in forked processes, concatenated in input order.

    Why not `Dataset.map(num_proc=...)`: it pickles the function, tokenizer included, for every shard and
    hashes it for a fingerprint, which costs seconds per call. Forked workers inherit the function and
    the data instead, and each writes its own Arrow file (in datasets' temporary cache directory, removed
    at exit), so only file names cross the process boundary.
    """
    import datasets
    from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory

    fingerprint = generate_random_fingerprint()
    directory = get_temporary_cache_files_directory()
    job = (data, function, shards, batch_size, directory, fingerprint)
    # Workers run one per core: tokenizers' own thread pool would oversubscribe (and warn about the fork).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        # Forked workers get `job` as it is in memory: fork passes initializer arguments without pickling.
        with interrupts_ignored_by_new_processes():  # Ctrl-C is the parent's to handle (see prefill_kit.interrupts)
            pool = multiprocessing.get_context("fork").Pool(len(shards), initializer=_init_shard_worker,
                                                            initargs=(job, os.getpid()))
        with pool:
            paths = []
            for outcome in pool.imap(_render_shard, range(len(shards))):
                if not isinstance(outcome, str):
                    raise _rebuild_error(*outcome)
                paths.append(outcome)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in paths])


def _init_shard_worker(job: tuple, parent: int) -> None:
    global _shard_job
    ignore_interrupts()
    leave_signals_to_parent(parent)
    _shard_job = job


def _render_shard(index: int) -> str | tuple:
    """Worker: render shard `index` into its own Arrow file; its path, or the error as plain values."""
    data, function, shards, batch_size, directory, fingerprint = _shard_job
    start, stop = shards[index]
    path = os.path.join(directory, f"prefill-kit-{fingerprint}-{index:05d}.arrow")
    parent = function.renderer  # its encoder (cutter, memo) is inherited; its thread is not
    renderer = BatchRenderer(parent.options, parent.fmt, parent.encoder)
    shard_function = _MapRenderer(renderer, function.columns, function.out_columns, offset=start)
    try:
        data.select(range(start, stop)).map(shard_function, batched=True, batch_size=batch_size, with_indices=True,
                                            remove_columns=function.columns, cache_file_name=path,
                                            new_fingerprint=f"{fingerprint}-{index}")
    except DataError as exc:
        return DataError, str(exc), {"source": exc.source, "line": exc.line, "field": exc.field, "reason": exc.reason}
    except PrefillKitError as exc:
        return type(exc), str(exc), None
    return path


def _rebuild_error(kind: type, message: str, located: dict | None) -> PrefillKitError:
    """A worker's error as raised there: DataError keeps its location fields (pickling would drop them)."""
    if located is not None:
        return DataError(located.pop("reason"), **located)
    return kind(message)
