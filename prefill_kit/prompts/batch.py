"""The batch renderer: located input rows in, output rows and rejects out, with `prompt_ids` when a tokenizer is
given, few-shot examples trimmed to fit `max_prompt_tokens`, and the prefix-boundary token audit.

`BatchRenderer` is the one place a batch of records becomes output rows; every front end (`render_file`,
`render_dataset`, the verl export) runs it through `prefill_kit.prompts.stream`.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prefill_kit.data.formats import rename_columns
from prefill_kit.data.readers import Record
from prefill_kit.errors import ConfigError, DataError, TemplateError, TemplateSecurityError
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.render import (
    assistant_opening,
    is_rendered,
    read_row,
    render_read,
    render_row,
    without_reference,
)
from prefill_kit.prompts.tokens import BoundaryMerge, PromptTokenizer, boundary_merges, describe_merge


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
    kept: list[Record] = field(default_factory=list)  # the record of each output row, in step with `rows`
    # with `keep_messages`: the messages each row's prompt renders (None for a row passed through rendered)
    messages: list[list[dict[str, Any]] | None] = field(default_factory=list)


def reject_entry(record: Record, reason: str, field_name: str | None) -> dict[str, Any]:
    """A rejects-file line: where the row was, why it was rejected, and the row (or raw line) itself."""
    entry = {"source": record.source, record.kind: record.loc, "field": field_name, "reason": reason}
    entry.update({"data": record.row} if record.row is not None else {"raw": record.raw})
    return entry


class BatchRenderer:
    """Turns located records into output rows; bad rows raise (on_error=fail) or become rejects (skip).

    With a tokenizer, `start(records)` renders the rows in slices here and hands each slice to a background
    thread to tokenize (the tokenizer runs in Rust without the GIL), and returns at once: the caller renders
    its next batch while this one tokenizes, and `PendingBatch.result()` collects the ids, tokenizing here
    any slice the thread has not begun, so that both threads tokenize when tokenizing is the slower side.
    The slice that picks the encoder's route (`PromptTokenizer.route`) is encoded in the foreground, so that
    its CPU-time measurement holds the tokenizer's work only. `encoder` shares one already built (a forked
    worker takes its parent's, with its added-token cutter and memo). Picklable (the thread is not carried),
    so worker processes and `datasets.map` can carry it. `keep_messages` records in `BatchResult.messages` the
    messages each prompt renders (the verl export writes them), so nobody reads a row twice.
    """

    SLICE = 256

    def __init__(self, options: RenderOptions, fmt: str, encoder: PromptTokenizer | None = None, *,
                 keep_messages: bool = False) -> None:
        self.options = options
        self.fmt = fmt
        self.keep_messages = keep_messages
        if encoder is None and options.tokenizer is not None:
            encoder = PromptTokenizer(options.tokenizer)
        self.encoder = encoder
        self._thread: ThreadPoolExecutor | None = None
        self._thread_pid = 0
        self._queued: deque[Slice] = deque()  # slices submitted to the thread, oldest first (finished ones pruned)
        self._opening = assistant_opening(options.template, options.template_kwargs) if fmt == "prompt" else None

    @property
    def calibration_rows(self) -> int:
        """How many rows the encoder needs to decide its ids route (0 without an encoder)."""
        return 0 if self.encoder is None else self.encoder.CALIBRATE_ROWS

    def __getstate__(self) -> dict:
        return {"options": self.options, "fmt": self.fmt, "keep_messages": self.keep_messages}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["options"], state["fmt"], keep_messages=state["keep_messages"])

    def __call__(self, records: list[Record]) -> BatchResult:
        return self.start(records).result()

    def start(self, records: list[Record]) -> PendingBatch:
        """Render `records` here and start tokenizing them in the background (class docstring)."""
        result = BatchResult()
        slices: list[Slice] = []
        for start in range(0, len(records), self.SLICE):
            first_row = len(result.rows)
            self._render(records[start:start + self.SLICE], result)
            if self.encoder is not None and len(result.rows) > first_row:
                prompts = [r["prompt"] for r in result.rows[first_row:]]
                if self.encoder.route is None:  # not measured yet: measure with nothing else of ours running
                    done: Future = Future()
                    done.set_result(self.encoder.encode(prompts))
                    slices.append(Slice(prompts, done))
                    continue
                slices.append(self._submit(prompts))
        return PendingBatch(self, result, slices)

    def _tokenizing_thread(self) -> ThreadPoolExecutor:
        """This process's background thread; a forked worker starts its own (threads do not survive a fork), with
        an empty queue (its parent's slices are not its own)."""
        if self._thread is None or self._thread_pid != os.getpid():
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="prefill-kit-tokenize")
            self._thread_pid = os.getpid()
            self._queued = deque()
        return self._thread

    def _submit(self, prompts: list[str]) -> Slice:
        thread = self._tokenizing_thread()  # first: in a forked worker it also empties the queue
        queued = self._queued
        while queued and queued[0].future.done():
            queued.popleft()
        queued.append(Slice(prompts, thread.submit(self.encoder.encode, prompts)))
        return queued[-1]

    def _take_last_waiting(self) -> bool:
        """Tokenize here the last slice the thread has not begun, whichever batch it belongs to; False when there
        is none. The thread takes slices in order, so once the last is begun or done, so is every other."""
        while self._queued:
            last = self._queued.pop()
            if last.take(self.encoder):
                return True
            if last.ids is None:  # begun or done by the thread
                return False
        return False

    def _render(self, records: list[Record], result: BatchResult) -> None:
        for record in records:
            if record.error is not None:
                self._bad(result, record, record.error.reason, record.error.field)
                continue
            try:
                row, messages = self._render_row(rename_columns(record.row, self.options.columns), record.index)
                result.rows.append(row)
                result.kept.append(record)
                if self.keep_messages:
                    result.messages.append(messages)
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

    def _render_row(self, row: dict[str, Any], index: int | None, shots: int | None = None):
        """The output row and, with `keep_messages`, the messages its prompt renders (None otherwise, and for
        a row passed through already rendered)."""
        if not self.keep_messages or is_rendered(row, self.fmt, self._opening):
            return render_row(row, self.options, self.fmt, index, shots, opening=self._opening), None
        read = read_row(row, self.options, self.fmt, index, shots)
        return render_read(row, read, self.options), without_reference(read.messages)

    def _fewer_shots(self, row: dict[str, Any], ids: list[int], record: Record, limit: int):
        """The row rendered with the most of its few-shot examples that fit `limit` tokens (down to none);
        the zero-shot row when even that is over, so that it is rejected with its own length."""
        renamed = rename_columns(record.row, self.options.columns)
        messages = None
        for shots in range(len(row["few_shot_indices"]) - 1, -1, -1):
            row, messages = self._render_row(renamed, record.index, shots)
            ids = self.encoder.encode([row["prompt"]])[0]
            if len(ids) <= limit:
                break
        return row, ids, messages

    def _add_ids(self, result: BatchResult, ids: list[list[int]]) -> None:
        rows, kept = result.rows, result.kept
        limit = self.options.max_prompt_tokens
        if limit is not None and any(len(i) > limit for i in ids):
            fits = []
            messages = result.messages or [None] * len(rows)
            for row, row_ids, record, row_messages in zip(rows, ids, kept, messages, strict=True):
                if len(row_ids) > limit and row.get("few_shot_indices"):
                    row, row_ids, row_messages = self._fewer_shots(row, row_ids, record, limit)
                    result.shots_trimmed += len(row_ids) <= limit
                if len(row_ids) <= limit:
                    fits.append((row, row_ids, record, row_messages))
                else:
                    self._bad(result, record, f"prompt too long: {len(row_ids)} tokens, more than "
                                              f"max_prompt_tokens={limit}", "prompt")
            rows, ids, kept, messages = (list(c) for c in zip(*fits, strict=True)) if fits else ([], [], [], [])
            result.rows, result.kept = rows, kept
            if self.keep_messages:
                result.messages = messages
        for row, row_ids in zip(rows, ids, strict=True):
            row["prompt_ids"] = row_ids
            row["num_prompt_tokens"] = len(row_ids)
        if self.options.check_tokens and rows:
            merged = boundary_merges(self.encoder, [r["prompt"] for r in rows], [r["prefix"] for r in rows], ids)
            result.merges = len(merged)
            if merged:
                i, whole, split = merged[0]
                result.merge_example = describe_merge(self.options.tokenizer, kept[i].where, whole, split)


@dataclass
class Slice:
    """Prompts submitted to the tokenizing thread, or taken back and tokenized by the caller (`ids`)."""

    prompts: list[str]
    future: Future
    ids: list[list[int]] | None = None

    def take(self, encoder: PromptTokenizer) -> bool:
        """Tokenize here, if the thread has not begun this slice. `Future.cancel` succeeds only before the thread
        begins it, and the thread then skips it; the ids are the same whichever thread computes them."""
        if self.ids is None and self.future.cancel():
            self.ids = encoder.encode(self.prompts)
            return True
        return False

    def result(self) -> list[list[int]]:
        return self.ids if self.ids is not None else self.future.result()


@dataclass
class PendingBatch:
    """A batch rendered by `BatchRenderer.start`, its slices tokenizing in the background."""

    renderer: BatchRenderer
    rendered: BatchResult
    slices: list[Slice]

    def result(self) -> BatchResult:
        """The batch with its ids. Slices still waiting for the thread are taken back, the last first (the
        thread works from the first: the two meet in between), and tokenized here. While the thread is on one of
        this batch's slices, the caller does not wait: it takes the last slice the thread has not begun, of a
        batch started after this one, and looks again when that is done."""
        encoder, result = self.renderer.encoder, self.rendered
        if self.slices:
            for piece in reversed(self.slices):
                piece.take(encoder)
            for piece in self.slices:
                while piece.ids is None and not piece.future.done() and self.renderer._take_last_waiting():
                    pass
            ids = [i for piece in self.slices for i in piece.result()]
            self.renderer._add_ids(result, ids)
            result.ids_route = encoder.route or "piecewise (too few rows to measure)"
        return result
