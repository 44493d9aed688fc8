"""Rendering overlaps tokenizing in one process (issue 19): the next chunk renders while this one tokenizes,
a slice the background thread has not begun is tokenized by the caller, and `render_dataset` writes what
`Dataset.map` writes. The outputs themselves are compared with the plain path in tests/test_pipeline.py and
tests/test_render_files.py; these tests are about order, threads and the written table.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from prefill_kit.data.readers import Record
from prefill_kit.errors import DataError
from prefill_kit.prompts.batch import BatchRenderer
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.stream import overlapped

PREFIX = "<think>\n"


def _records(n: int) -> list[Record]:
    return [Record("in.jsonl", "line", i + 1, {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
                   index=i) for i in range(n)]


class _Job:
    """A stand-in ChunkJob that records when each chunk starts and finishes, and can fail either step."""

    def __init__(self, fail_start: int | None = None, fail_finish: int | None = None) -> None:
        self.events: list[str] = []
        self.fail_start, self.fail_finish = fail_start, fail_finish
        self.parallelism: list[str | None] = []

    def start(self, chunk: int):
        self.parallelism.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        if chunk == self.fail_start:
            raise ValueError(f"bad row in chunk {chunk}")
        self.events.append(f"start {chunk}")

        def finish():
            if chunk == self.fail_finish:
                raise DataError(f"too long in chunk {chunk}")
            self.events.append(f"finish {chunk}")
            return chunk

        return finish


def test_the_next_chunk_renders_before_this_one_is_finished():
    job = _Job()
    assert list(overlapped(job, range(4))) == [0, 1, 2, 3]
    assert job.events == ["start 0", "start 1", "finish 0", "start 2", "finish 1", "start 3", "finish 2", "finish 3"]


def test_chunks_before_a_failing_one_are_given_out_and_an_earlier_error_comes_first():
    job = _Job(fail_start=2)
    got = []
    with pytest.raises(ValueError, match="chunk 2"):
        for result in overlapped(job, range(4)):
            got.append(result)
    assert got == [0, 1]  # chunk 1 was rendered before chunk 2 failed: it is still written
    # chunk 1 fails once tokenized, chunk 2 while rendering: chunk 1's error is the one raised
    with pytest.raises(DataError, match="chunk 1"):
        list(overlapped(_Job(fail_start=2, fail_finish=1), range(4)))


def test_the_tokenizer_runs_single_threaded_during_the_overlap_and_is_restored(monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    job = _Job()
    list(overlapped(job, range(3)))
    assert job.parallelism == ["false"] * 3
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    list(overlapped(_Job(), range(2)))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_slices_the_thread_has_not_begun_are_tokenized_by_the_caller(chatml, tiny_tokenizer, monkeypatch):
    """The background thread is kept busy: `result()` must not wait for it, and computes every slice itself."""
    monkeypatch.setattr(BatchRenderer, "SLICE", 4)
    renderer = BatchRenderer(RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer), "messages")
    renderer.encoder.route = "piecewise"  # decided: every slice goes to the thread
    release = threading.Event()
    renderer._tokenizing_thread().submit(release.wait, 10)  # occupies the thread until released
    threads, encode = [], renderer.encoder.encode

    def recording_encode(texts):
        threads.append(threading.current_thread().name)
        return encode(texts)

    monkeypatch.setattr(renderer.encoder, "encode", recording_encode)
    try:
        pending = renderer.start(_records(10))
        result = pending.result()
    finally:
        release.set()
    assert threads == [threading.current_thread().name] * 3  # 3 slices of at most 4 rows, all taken back
    prompts = [r["prompt"] for r in result.rows]
    assert [r["prompt_ids"] for r in result.rows] == tiny_tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert [r["num_prompt_tokens"] for r in result.rows] == [len(r["prompt_ids"]) for r in result.rows]
    renderer._thread.shutdown()


def test_a_slice_the_thread_has_begun_is_waited_for_not_computed_twice(chatml, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(BatchRenderer, "SLICE", 4)
    renderer = BatchRenderer(RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer), "messages")
    renderer.encoder.route = "piecewise"
    calls, encode = [], renderer.encoder.encode
    monkeypatch.setattr(renderer.encoder, "encode", lambda texts: calls.append(len(texts)) or encode(texts))
    pending = renderer.start(_records(10))
    for piece in pending.slices:
        piece.future.result()  # the thread has done them all
    result = pending.result()
    assert sorted(calls) == [2, 4, 4] and len(result.rows) == 10


def test_while_the_thread_is_on_this_batch_the_caller_tokenizes_the_next_batch(chatml, tiny_tokenizer,
                                                                             monkeypatch):
    """The caller does not wait for the slice the thread is on: it takes the next batch's slices the thread has
    not begun, the last first, and that batch then finds them done."""
    monkeypatch.setattr(BatchRenderer, "SLICE", 4)
    renderer = BatchRenderer(RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer), "messages")
    renderer.encoder.route = "piecewise"
    begun, release = threading.Event(), threading.Event()
    calls, released, encode = [], [], renderer.encoder.encode

    def encode_blocking_the_thread(texts):
        here = threading.current_thread() is threading.main_thread()
        calls.append(("caller" if here else "thread", texts[0]))
        if not here and not begun.is_set():  # the thread's first slice: it stays busy on it
            begun.set()
            released.append(release.wait(5))  # False: the caller waited for this slice instead
        if here and len(calls) == 3:  # the caller has taken both slices of the second batch
            release.set()
        return encode(texts)

    monkeypatch.setattr(renderer.encoder, "encode", encode_blocking_the_thread)
    first = renderer.start(_records(4))
    assert begun.wait(5)
    records = _records(12)[4:]
    second = renderer.start(records)
    rows = first.result().rows + second.result().rows
    prompts = [r["prompt"] for r in rows]
    assert released == [True]
    assert calls == [("thread", prompts[0]), ("caller", prompts[8]), ("caller", prompts[4])]
    assert [r["prompt_ids"] for r in rows] == tiny_tokenizer(prompts, add_special_tokens=False)["input_ids"]
    renderer._thread.shutdown()


_FORKED: BatchRenderer | None = None


def _render_in_child(n: int) -> tuple[list[list[int]], str]:
    """The rows' ids and the name of the thread that runs this process's background work (a slice taken back
    by the caller would hide a thread that never runs, so it is asked directly)."""
    ids = [row["prompt_ids"] for row in _FORKED(_records(n)).rows]
    return ids, _FORKED._tokenizing_thread().submit(lambda: threading.current_thread().name).result(timeout=5)


def test_a_forked_worker_tokenizes_on_its_own_thread_not_the_parents(chatml, tiny_tokenizer, monkeypatch):
    """Threads do not survive a fork: a worker handed the parent's started executor has no thread behind it."""
    import multiprocessing

    global _FORKED
    monkeypatch.setattr(BatchRenderer, "SLICE", 4)
    renderer = BatchRenderer(RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer), "messages")
    renderer.encoder.route = "piecewise"
    expected = [row["prompt_ids"] for row in renderer(_records(10)).rows]  # the parent's thread is running now
    assert renderer._thread is not None
    _FORKED = renderer
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            ids, thread = pool.apply_async(_render_in_child, (10,)).get(timeout=30)
        assert ids == expected and thread.startswith("prefill-kit-tokenize")
    finally:
        _FORKED = None


def test_a_too_long_row_in_an_earlier_chunk_is_the_error_over_a_bad_row_in_the_next(tmp_path, chatml,
                                                                                   tiny_tokenizer):
    from prefill_kit.prompts.render_file import render_file

    rows = [{"messages": [{"role": "user", "content": "short"}]} for _ in range(5)]
    rows[2] = {"messages": [{"role": "user", "content": "a much longer question " * 20}]}
    rows[4] = {"messages": [{"role": "nobody", "content": "x"}]}
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    options = RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer, max_prompt_tokens=40)
    with pytest.raises(DataError, match="prompt too long") as caught:
        render_file(source, str(tmp_path / "out.jsonl"), options, batch_size=3)
    assert caught.value.line == 3
    assert not (tmp_path / "out.jsonl").exists()


# --- render_dataset writes what Dataset.map writes ---------------------------------------------------------------

def _by_map(data, options, batch_size):
    """The reference: `Dataset.map` with the renderer, as render_dataset ran before it wrote its own table."""
    from prefill_kit.prompts.dataset import _MapRenderer
    from prefill_kit.prompts.options import detect, output_columns

    columns = data.column_names
    fmt = detect(columns, options)
    function = _MapRenderer(BatchRenderer(options, fmt), columns, output_columns(columns, fmt, options))
    return data.map(function, batched=True, batch_size=batch_size, with_indices=True, remove_columns=columns)


@pytest.mark.parametrize("source", ["memory", "file", "with ids"])
def test_render_dataset_writes_the_table_dataset_map_writes(source, tmp_path, chatml, tiny_tokenizer):
    import datasets

    from prefill_kit.prompts.dataset import render_dataset

    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "id": datasets.Value("int32"), "label": datasets.ClassLabel(names=["no", "yes"]),
                                  "score": datasets.Value("float16")})
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}], "id": i, "label": i % 2, "score": i / 4}
            for i in range(23)]
    if source == "with ids":  # an input's own prompt_ids column: map keeps its type for the new ids
        features["prompt_ids"] = datasets.List(datasets.Value("int32"))
        rows = [{**row, "prompt_ids": [0]} for row in rows]
    data = datasets.Dataset.from_list(rows, features=features)
    if source == "file":
        data.save_to_disk(str(tmp_path / "saved"))
        data = datasets.load_from_disk(str(tmp_path / "saved"))
        assert data.cache_files
    data = data.with_format(None, columns=["messages", "id"])  # a format that still reads conversations
    options = RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer)
    ours = render_dataset(data, chatml, tiny_tokenizer, PREFIX, batch_size=5)
    reference = _by_map(data, options, 5)
    assert ours.features == reference.features  # int32, ClassLabel and float16 kept, as map keeps them
    assert ours.features["id"] == datasets.Value("int32")
    ids_type = "int32" if source == "with ids" else "int64"
    assert ours.features["prompt_ids"] == datasets.List(datasets.Value(ids_type))
    assert ours.format == reference.format and "label" not in ours.format["columns"]
    assert ours.with_format(None).to_list() == reference.with_format(None).to_list()
    assert ours.info.description == reference.info.description and ours.split == reference.split
    assert bool(ours.cache_files) == (source == "file")  # a file input gives a file-backed output, as map's is


def _frozen_in_worker(_: int) -> int:
    import gc

    return gc.get_freeze_count()


def test_workers_fork_with_the_parents_objects_frozen_and_the_parent_thaws():
    """A worker's garbage collections skip what it inherited (`gc.freeze` before the fork), so they do not copy
    the parent's memory pages; the parent's own collections are as before once the pool has started."""
    import gc

    from prefill_kit.prompts.stream import ordered_map

    kept = [[i] for i in range(1000)]  # objects the parent holds when it forks
    assert gc.get_freeze_count() == 0
    frozen = list(ordered_map(_frozen_in_worker, range(2), 2))
    assert min(frozen) >= len(kept)
    assert gc.get_freeze_count() == 0


def _pid_or_fail(item: int) -> int:
    if item < 0:
        raise DataError(f"bad item {item}")
    return os.getpid()


def test_the_first_shard_renders_in_this_process_and_the_others_in_forked_workers():
    """`render_dataset(num_proc=N)` forks N - 1 workers: this process renders the first shard meanwhile."""
    from prefill_kit.prompts.stream import map_here_and_forked

    pids = map_here_and_forked(_pid_or_fail, [0, 1, 2])
    assert pids[0] == os.getpid() and os.getpid() not in pids[1:]
    with pytest.raises(DataError, match="bad item -1"):  # input order: the first item's error, not the second's
        map_here_and_forked(_pid_or_fail, [-1, -2])
    with pytest.raises(DataError, match="bad item -2"):
        map_here_and_forked(_pid_or_fail, [0, -2])


class _CollectorJob(_Job):
    """Records, as each chunk starts, how many objects are frozen and the youngest generation's threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def start(self, chunk: int):
        import gc

        self.seen.append((gc.get_freeze_count(), gc.get_threshold()[0]))
        return super().start(chunk)


def test_the_collector_skips_the_callers_objects_while_rendering_and_is_restored():
    """While the loop runs, the caller's objects are frozen (a full collection does not rescan a large heap) and
    young collections are rarer (a chunk's rows are not rescanned before they are freed); after it, as before."""
    import gc

    from prefill_kit.prompts.stream import YOUNG_THRESHOLD

    kept = [[i] for i in range(1000)]
    before = gc.get_threshold()
    job = _CollectorJob()
    assert list(overlapped(job, range(3))) == [0, 1, 2]
    assert all(frozen >= len(kept) for frozen, _ in job.seen)
    assert [young for _, young in job.seen] == [YOUNG_THRESHOLD] * 3
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


def test_a_callers_own_freeze_is_kept_and_overlapping_loops_restore_once():
    import gc

    before = gc.get_threshold()
    kept = [[1]]
    gc.freeze()  # the caller's own (a server that preloads, then forks)
    try:
        list(overlapped(_Job(), range(2)))
        assert not any(o is kept for o in gc.get_objects())  # still frozen: no generation holds it
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())  # the check above can see a thawed object
    first, second = overlapped(_CollectorJob(), range(2)), overlapped(_CollectorJob(), range(2))
    next(first)
    next(second)  # two loops at once, the first ends before the second
    list(first)
    assert gc.get_threshold()[0] > before[0] and gc.get_freeze_count() > 0  # the second still runs eased
    list(second)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_importing_render_dataset_leaves_datasets_unloaded():
    """`datasets` loads when data does (`prompts.training_data`), not when the module that renders it is imported."""
    import subprocess
    import sys

    code = ("import sys, prefill_kit.prompts.dataset; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'datasets'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
