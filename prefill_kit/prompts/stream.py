"""The render loop every front end shares: chunks in, the format detected from the first readable row, each
chunk rendered by one `BatchRenderer`, results out in input order, in this process or in a pool of forked ones.

`render_file` (files), `render_dataset` (HF datasets) and the verl export all run here, so there is one
detection rule and one way to start workers (`_worker_pool`, for `ordered_map` and `map_here_and_forked`): they
inherit the loaded tokenizer and template by fork and ignore Ctrl-C (the parent handles it); `ordered_map` keeps
at most `2 * num_proc` jobs in flight.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any

from prefill_kit.data.readers import Chunk, Record, chunk_columns, chunk_records
from prefill_kit.interrupts import ignore_interrupts, leave_signals_to_parent, signals_held_for_new_workers
from prefill_kit.prompts.batch import BatchRenderer, BatchResult
from prefill_kit.prompts.options import RenderOptions, detect


@dataclass
class Stream:
    """An input's chunks with the format they are read as: `fmt` and `columns` are None when no row was
    readable (every record is then a reject); `empty` when there were no chunks at all."""

    fmt: str | None
    columns: list[str] | None
    chunks: Iterator[Chunk]
    empty: bool


def open_stream(chunks: Iterable[Chunk], options: RenderOptions) -> Stream:
    """Detect the format from the first readable row; the chunks read for that are kept and come first."""
    chunks = iter(chunks)
    seen: list[Chunk] = []
    columns = None
    for chunk in chunks:
        seen.append(chunk)
        if (columns := chunk_columns(chunk)) is not None:
            break
    fmt = detect(columns, options) if columns is not None else None
    return Stream(fmt, columns, chain(seen, chunks), not seen)


@dataclass(frozen=True)
class ChunkJob:
    """A chunk's records rendered, then `finish(records, result)` (run where the rendering ran: a worker
    encodes its rows for the writer there, so only bytes cross back)."""

    renderer: BatchRenderer
    finish: Callable[[list[Record], BatchResult], Any]

    def __call__(self, chunk: Chunk) -> Any:
        return self.start(chunk)()

    def start(self, chunk: Chunk) -> Callable[[], Any]:
        """Render the chunk now; the returned call waits for its ids and finishes it."""
        records = chunk_records(chunk)
        pending = self.renderer.start(records)
        return lambda: self.finish(records, pending.result())


def render_stream(stream: Stream, options: RenderOptions, finish: Callable[[list[Record], BatchResult], Any], *,
                  num_proc: int = 1, keep_messages: bool = False) -> Iterator[Any]:
    """`finish(records, result)` of every chunk of `stream`, in input order."""
    renderer = BatchRenderer(options, stream.fmt or "messages", keep_messages=keep_messages)
    return render_chunks(renderer, stream.chunks, finish, num_proc=num_proc)


def render_chunks(renderer: BatchRenderer, chunks: Iterator[Chunk], finish: Callable[[list[Record], BatchResult], Any],
                  *, num_proc: int = 1) -> Iterator[Any]:
    """`finish(records, result)` of every chunk, in input order: in this process (`overlapped`), or in
    `num_proc` forked workers that take the ids route the parent decides on the first chunk."""
    job = ChunkJob(renderer, finish)
    if num_proc <= 1:
        return overlapped(job, chunks)
    if (first := next(chunks, None)) is not None:
        decide_ids_route(renderer, chunk_records(first)[:renderer.calibration_rows])
        chunks = chain([first], chunks)
    return ordered_map(job, chunks, num_proc)


def overlapped(job: ChunkJob, chunks: Iterable[Chunk]) -> Iterator[Any]:
    """`map(job, chunks)` in this process, each chunk rendered before the one before it is finished: Python
    renders chunk k+1 while the tokenizer (Rust, without the GIL) encodes chunk k, so one process keeps two
    cores busy. Meanwhile the tokenizer runs single-threaded (its own thread pool would take the core that
    rendering needs; `BatchRenderer` puts a second thread on tokenizing when that is the slower side).

    An error rendering chunk k+1 is raised once chunk k is finished and given out: its rows come first, and so
    does a bad row of its own (one too long, found once tokenized). Results and errors come in input order, as
    they do without the overlap. The garbage collector leaves the caller's objects alone meanwhile
    (`_collector_eased`).
    """
    with _tokenizers_single_threaded(), _collector_eased():
        waiting = None
        for chunk in chunks:
            try:
                started = job.start(chunk)
            except Exception:
                if waiting is not None:
                    yield waiting()
                raise
            if waiting is not None:
                yield waiting()
            waiting = started
        if waiting is not None:
            yield waiting()


def decide_ids_route(renderer: BatchRenderer, records: list[Record]) -> None:
    """Before forking workers: render `records` (the input's first rows) here, and throw the result away, so
    that the encoder decides its ids route once (`PromptTokenizer.decide`) and every worker forks with it
    instead of measuring again. Rendering the same rows twice is exact: a row's output is its own."""
    if renderer.encoder is not None and renderer.encoder.route is None:
        renderer(records)


_worker_job: Callable | None = None


def _init_worker(job: Callable, parent: int) -> None:
    global _worker_job
    ignore_interrupts()  # also for a worker the pool starts later to replace one that died
    leave_signals_to_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no thread oversubscription
    _worker_job = job


def _run_in_worker(item: Any) -> Any:
    return _worker_job(item)


def ordered_map(job: Callable[[Any], Any], items: Iterable[Any], num_proc: int) -> Iterator[Any]:
    """`map(job, items)` in input order; with several processes, at most 2 * num_proc items are in flight.

    Workers are forked: `job` (tokenizer, template, a dataset) reaches them as it is in memory, never pickled;
    only the items and results are. An error in a worker is raised here (DataError keeps its location).
    """
    if num_proc <= 1:
        yield from map(job, items)
        return
    with _worker_pool(job, num_proc) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(_run_in_worker, (item,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def map_here_and_forked(job: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """`[job(item) for item in items]`: the first in this process, the others in `len(items) - 1` workers forked
    as `ordered_map` forks them. This process would otherwise wait for its workers with nothing to do,
    and one fork fewer is one copy fewer of its memory map before the work starts. Errors come in input order:
    one in the first item is raised before the workers' results are looked at."""
    if len(items) <= 1:
        return [job(item) for item in items]
    with _worker_pool(job, len(items) - 1) as pool:
        rest = [pool.apply_async(_run_in_worker, (item,)) for item in items[1:]]
        first = job(items[0])
        return [first, *(result.get() for result in rest)]


@contextmanager
def _worker_pool(job: Callable[[Any], Any], processes: int) -> Iterator[Any]:
    """A pool of `processes` forked workers that run `job`; leaving it, also by Ctrl-C or a broken pipe,
    terminates them."""
    pool = None
    try:
        with _tokenizers_single_threaded(), signals_held_for_new_workers(), _collector_eased():
            pool = multiprocessing.get_context("fork").Pool(processes, initializer=_init_worker,
                                                            initargs=(job, os.getpid()))
    except BaseException:  # a Ctrl-C held while the pool started is raised as the block ends: stop its workers
        if pool is not None:
            pool.terminate()
        raise
    with pool:
        yield pool


YOUNG_THRESHOLD = 50_000  # net new container objects between collections of the youngest generation, while rendering
_eased = 0  # render loops (and pool starts) of this process now inside `_collector_eased`
_eased_lock = threading.Lock()
_saved_threshold: tuple[int, ...] = ()
_frozen_here = False
os.register_at_fork(after_in_child=lambda: globals().update(_eased_lock=threading.Lock()))


@contextmanager
def _collector_eased() -> Iterator[None]:
    """While the render loop runs, and while the pool forks, the cyclic garbage collector spends its time on the
    loop's own objects only. Both steps change no output, only when garbage cycles are collected:

    - `gc.freeze` moves the objects that exist into a generation no collection scans. A full collection of a large
      heap (a caller holding datasets, a tokenizer, a model) takes a tenth of a second; in a forked worker it would
      also touch, so copy, every inherited page (Python's advice before a fork). Where the caller has frozen
      objects itself, nothing is frozen or thawed here: thawing would undo the caller's freeze.
    - The youngest generation's threshold is raised to `YOUNG_THRESHOLD`: a chunk's rows, a dozen containers each,
      live until the chunk is written, so at the default of 700 every collection rescans rows about to be freed.
      Cycles are still collected, at most that many allocations late.

    Loops that overlap (threads, nested streams) share one setting: the first in sets it, the last out restores it.
    """
    global _eased, _saved_threshold, _frozen_here
    with _eased_lock:
        if _eased == 0:
            _saved_threshold = gc.get_threshold()
            _frozen_here = gc.get_freeze_count() == 0
            if _frozen_here:
                gc.freeze()
            gc.set_threshold(max(_saved_threshold[0], YOUNG_THRESHOLD), *_saved_threshold[1:])
        _eased += 1
    try:
        yield
    finally:
        with _eased_lock:
            _eased -= 1
            if _eased == 0:
                gc.set_threshold(*_saved_threshold)
                if _frozen_here:
                    gc.unfreeze()


@contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false while the pool forks: workers run one per core, and tokenizers' own thread
    pool would oversubscribe (and warn about the fork)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
