"""The file pipeline: every input type, every output type, bad rows in both modes, atomic writes, streaming."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from prefill_kit.data import writers
from prefill_kit.data.readers import Chunk
from prefill_kit.errors import DataError, TemplateError
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.render import render_prompt
from prefill_kit.prompts.render_file import render_file
from prefill_kit.templates import ChatTemplate

PREFIX = "<think>\n"
QUESTIONS = [f"What is {i} + {i}?" for i in range(6)]
ROWS = [{"id": i, "messages": [{"role": "user", "content": q}], "solution": str(2 * i)}
        for i, q in enumerate(QUESTIONS)]


def expected_prompt(template: ChatTemplate, question: str) -> str:
    return render_prompt([{"role": "user", "content": question}], template, PREFIX).prompt


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- every input type -------------------------------------------------------------------------------------------

def _jsonl(tmp: Path) -> Path:
    return write_jsonl(tmp / "in.jsonl", ROWS)


def _json_array(tmp: Path) -> Path:
    (tmp / "in.json").write_text(json.dumps(ROWS), encoding="utf-8")
    return tmp / "in.json"


def _parquet(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp / "in.parquet", row_group_size=4)
    return tmp / "in.parquet"


def _csv(tmp: Path) -> Path:  # CSV holds flat columns: the math-set shape
    with open(tmp / "in.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, ["id", "question", "solution"])
        out.writeheader()
        out.writerows({"id": r["id"], "question": r["messages"][0]["content"], "solution": r["solution"]}
                      for r in ROWS)
    return tmp / "in.csv"


def _arrow_file(tmp: Path) -> Path:
    import pyarrow as pa

    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_file(tmp / "in.arrow", table.schema) as f:
        f.write_table(table, max_chunksize=4)
    return tmp / "in.arrow"


def _arrow_stream(tmp: Path) -> Path:
    import pyarrow as pa

    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_stream(tmp / "in.arrow", table.schema) as f:
        f.write_table(table, max_chunksize=4)
    return tmp / "in.arrow"


def _save_to_disk(tmp: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp / "saved"))
    return tmp / "saved"


def _shard_dir(tmp: Path) -> Path:
    (tmp / "shards").mkdir()
    write_jsonl(tmp / "shards" / "part-0.jsonl", ROWS[:4])
    write_jsonl(tmp / "shards" / "part-1.jsonl", ROWS[4:])
    return tmp / "shards"


def _glob(tmp: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, part in enumerate((ROWS[:2], ROWS[2:])):
        pq.write_table(pa.Table.from_pylist(part), tmp / f"train-{i}.parquet")
    return str(tmp / "train-*.parquet")


INPUTS = {"jsonl": _jsonl, "json-array": _json_array, "parquet": _parquet, "csv": _csv, "arrow-file": _arrow_file,
          "arrow-stream": _arrow_stream, "save_to_disk": _save_to_disk, "shard-dir": _shard_dir, "glob": _glob}


@pytest.mark.parametrize("kind", INPUTS)
def test_every_input_type_renders_every_row_in_order(kind, tmp_path, chatml):
    source = INPUTS[kind](tmp_path)
    out = tmp_path / "out.jsonl"
    summary = render_file(source, str(out), RenderOptions(chatml, PREFIX), batch_size=4)
    rows = read_jsonl(out)
    assert summary.rows_in == summary.rows_out == len(ROWS) and summary.rejected == 0
    assert [r["prompt"] for r in rows] == [expected_prompt(chatml, q) for q in QUESTIONS]
    assert [str(r["solution"]) for r in rows] == [r["solution"] for r in ROWS]
    assert all(r["prefix"] == PREFIX and "messages" not in r and "question" not in r for r in rows)


# --- every output type ------------------------------------------------------------------------------------------

def _read_parquet(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_hf(path):
    import datasets

    return datasets.load_from_disk(str(path)).to_list()


@pytest.mark.parametrize(("name", "explicit", "read"), [
    ("out.jsonl", None, read_jsonl), ("out.parquet", None, _read_parquet), ("out_ds", None, _read_hf),
    ("out.data", "parquet", _read_parquet),
])
def test_every_output_type(name, explicit, read, tmp_path, chatml, tiny_tokenizer):
    out = tmp_path / name
    options = RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer)
    render_file(_jsonl(tmp_path), str(out), options, output_format_name=explicit, batch_size=4)
    rows = read(out)
    assert [r["prompt"] for r in rows] == [expected_prompt(chatml, q) for q in QUESTIONS]
    assert [r["id"] for r in rows] == list(range(len(ROWS)))
    ids = tiny_tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    assert [r["prompt_ids"] for r in rows] == ids
    assert [r["num_prompt_tokens"] for r in rows] == [len(i) for i in ids]


# --- bad rows: each kind, both modes ----------------------------------------------------------------------------

RAISING = ChatTemplate("{% for m in messages %}{% if m.content == 'BOOM' %}{{ raise_exception('no booms') }}"
                       "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "raising.jinja")
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}], "id": 0}).encode()

BAD_LINES = {  # kind: (the bad line, a phrase its reason must hold)
    "invalid JSON": (b'{"messages": [', "invalid JSON"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid UTF-8"),
    "missing conversation": (b'{"id": 7}', "missing or empty conversation"),
    "empty conversation": (b'{"messages": []}', "missing or empty conversation"),
    "unknown role": (b'{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),
    "malformed content": (b'{"messages": [{"role": "user", "content": {"a": 1}}]}', "malformed content"),
    "template error": (b'{"messages": [{"role": "user", "content": "BOOM"}]}', "no booms"),
    "prompt too long": (json.dumps({"messages": [{"role": "user", "content": "long " * 200}]}).encode(),
                        "prompt too long"),
}


def _bad_input(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([GOOD, BAD_LINES[kind][0], GOOD]) + b"\n")
    return path


def _options(kind, tokenizer, on_error):
    if kind == "prompt too long":  # "hi" renders to far fewer than 100 tokens, 200 words to far more
        return RenderOptions(RAISING, tokenizer=tokenizer, on_error=on_error, max_prompt_tokens=100)
    return RenderOptions(RAISING, on_error=on_error)


@pytest.mark.parametrize("kind", BAD_LINES)
def test_bad_row_fails_with_location_and_reason_and_writes_nothing(kind, tmp_path, tiny_tokenizer):
    source = _bad_input(tmp_path, kind)
    out = tmp_path / "out.jsonl"
    with pytest.raises((DataError, TemplateError)) as err:
        render_file(source, str(out), _options(kind, tiny_tokenizer, "fail"))
    assert f"{source}:2" in str(err.value) and BAD_LINES[kind][1] in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temp file


@pytest.mark.parametrize("kind", BAD_LINES)
def test_bad_row_is_skipped_into_rejects_with_reason(kind, tmp_path, tiny_tokenizer):
    source = _bad_input(tmp_path, kind)
    out = tmp_path / "out.jsonl"
    summary = render_file(source, str(out), _options(kind, tiny_tokenizer, "skip"))
    assert (summary.rows_in, summary.rows_out, summary.rejected) == (3, 2, 1)
    assert len(read_jsonl(out)) == 2
    assert summary.rejects_path == str(tmp_path / "out.rejects.jsonl")
    [reject] = read_jsonl(summary.rejects_path)
    assert reject["line"] == 2 and reject["source"] == str(source)
    assert BAD_LINES[kind][1] in reject["reason"]
    raw_line = BAD_LINES[kind][0]
    if "raw" in reject:  # unreadable lines keep their raw text
        assert reject["raw"] == raw_line.decode("utf-8", "backslashreplace")
    else:
        assert reject["data"] == json.loads(raw_line)


def test_a_clean_run_removes_a_stale_rejects_file(tmp_path, chatml):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"oops": 1}])
    out = tmp_path / "out.jsonl"
    assert render_file(source, str(out), RenderOptions(chatml, on_error="skip")).rejected == 1
    assert (tmp_path / "out.rejects.jsonl").exists()
    write_jsonl(source, [{"messages": [{"role": "user", "content": "hi"}]}])  # the bad row fixed
    assert render_file(source, str(out), RenderOptions(chatml, on_error="skip")).rejected == 0
    assert not (tmp_path / "out.rejects.jsonl").exists()  # it would describe rows that are no longer bad


def test_counts_add_up_with_many_bad_rows_across_batches(tmp_path, chatml):
    lines = [GOOD if i % 3 else BAD_LINES["unknown role"][0] for i in range(50)]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    summary = render_file(source, str(tmp_path / "out.jsonl"), RenderOptions(chatml, on_error="skip"),
                          batch_size=7, num_proc=2)
    bad = sum(1 for i in range(50) if i % 3 == 0)
    assert (summary.rows_in, summary.rows_out, summary.rejected) == (50, 50 - bad, bad)
    assert [r["line"] for r in read_jsonl(summary.rejects_path)] == [i + 1 for i in range(0, 50, 3)]


def test_row_indexed_inputs_report_the_row(tmp_path, chatml):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "robot", "content": "x"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    with pytest.raises(DataError, match=r"in\.parquet row 2: field 'messages\[0\]\.role': unknown role"):
        render_file(tmp_path / "in.parquet", str(tmp_path / "out.jsonl"), RenderOptions(chatml))


# --- atomic writes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "sink"), [("out.jsonl", "_StreamSink"), ("out.parquet", "_ArrowSink"),
                                            ("out_ds", "_ArrowSink")])
def test_failure_mid_write_leaves_no_output(name, sink, tmp_path, chatml, monkeypatch):
    source = _jsonl(tmp_path)
    cls = getattr(writers, sink)
    real_write, calls = cls.write, []

    def failing_write(self, payload):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real_write(self, payload)

    monkeypatch.setattr(cls, "write", failing_write)
    with pytest.raises(OSError, match="injected"):
        render_file(source, str(tmp_path / name), RenderOptions(chatml), batch_size=2)
    assert len(calls) == 2  # it failed mid-write, after a batch had been written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# --- streaming --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_proc", [1, 2])
def test_input_larger_than_a_batch_streams_with_bounded_read_ahead(num_proc, tmp_path, chatml, monkeypatch):
    pulled, written, lag = [0], [0], []

    def chunks():
        for c in range(40):
            pulled[0] += 1
            lines = [(c * 5 + i + 1, json.dumps({"messages": [{"role": "user", "content": f"q{c * 5 + i}"}]}).encode())
                     for i in range(5)]
            yield Chunk("gen.jsonl", "line", lines=lines)

    real_write = writers._StreamSink.write

    def spying_write(self, payload):
        written[0] += 1
        lag.append(pulled[0] - written[0])
        real_write(self, payload)

    monkeypatch.setattr(writers._StreamSink, "write", spying_write)
    out = tmp_path / "out.jsonl"
    summary = render_file("gen.jsonl", str(out), RenderOptions(chatml), num_proc=num_proc,
                          chunks=chunks())
    assert summary.rows_out == 200 and written[0] == 40
    assert max(lag) <= 2 * num_proc  # never more than the in-flight window read ahead of what is written
    prompts = [r["prompt"] for r in read_jsonl(out)]
    assert prompts == [render_prompt([{"role": "user", "content": f"q{i}"}], chatml).prompt for i in range(200)]


def test_num_proc_output_equals_one_process_output(tmp_path, chatml, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * (i % 5 + 1)}], "id": i} for i in range(60)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    options = RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer)
    render_file(source, str(tmp_path / "one.jsonl"), options, batch_size=8)
    render_file(source, str(tmp_path / "two.jsonl"), options, batch_size=8, num_proc=2)
    assert read_jsonl(tmp_path / "one.jsonl") == read_jsonl(tmp_path / "two.jsonl")
    assert [r["id"] for r in read_jsonl(tmp_path / "two.jsonl")] == list(range(60))
