"""Every message that names an input row says where it is: the 1-based line of the file for JSON Lines and CSV
(`file:LINE`), the 1-based row for Parquet, Arrow and JSON arrays (`file row N`), and `reward` counts as
`render` does."""

from __future__ import annotations

import json

import pytest

from prefill_kit.errors import DataError
from prefill_kit.prompts.dataset import render_dataset
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.render_file import render_file

GOOD = {"messages": [{"role": "user", "content": "hi"}]}
BAD = {"messages": [{"role": "robot", "content": "x"}]}


def test_csv_rows_are_named_by_the_line_they_start_on(tmp_path, chatml):
    # line 1 header, 2 good, 3 blank, 4-5 one record whose quoted value spans two lines, 6 bad, 7 bad
    (tmp_path / "in.csv").write_text('question,answer\nfine,1\n\n"two\nlines",2\n,3\n ,4\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.csv:6: field 'question': missing or empty"):
        render_file(tmp_path / "in.csv", str(tmp_path / "out.jsonl"), RenderOptions(chatml))
    summary = render_file(tmp_path / "in.csv", str(tmp_path / "out.jsonl"), RenderOptions(chatml, on_error="skip"))
    rejects = [json.loads(line) for line in open(summary.rejects_path, encoding="utf-8")]
    assert [(r["line"], r["data"]["answer"]) for r in rejects] == [(6, "3"), (7, "4")]
    assert summary.rows_out == 2


@pytest.mark.parametrize("suffix", ["parquet", "json"])
def test_row_indexed_inputs_count_rows_from_one(tmp_path, chatml, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"in.{suffix}"
    rows = [GOOD, GOOD, BAD]
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match=rf"in\.{suffix} row 3: field 'messages\[0\]\.role'"):
        render_file(path, str(tmp_path / "out.jsonl"), RenderOptions(chatml))
    summary = render_file(path, str(tmp_path / "out.jsonl"), RenderOptions(chatml, on_error="skip"))
    assert [json.loads(line)["row"] for line in open(summary.rejects_path, encoding="utf-8")] == [3]


def test_json_error_gives_the_column_in_its_line_also_through_render_dataset(tmp_path, chatml):
    path = tmp_path / "in.jsonl"
    broken = json.dumps(GOOD)[:-1] + ', "x": tru}'
    column = broken.index("tru") + 1
    path.write_text(json.dumps(GOOD) + "\n" + broken + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"in\.jsonl:2: invalid JSON: Expecting value at column {column}$"):
        render_file(path, str(tmp_path / "out.jsonl"), RenderOptions(chatml))
    with pytest.raises(DataError, match=rf"in\.jsonl:2: invalid JSON: Expecting value at column {column}$"):
        render_dataset(str(path))


def test_reward_names_rows_by_line_as_render_does(tmp_path, capsys):
    from prefill_kit.cli import main

    path = tmp_path / "in.jsonl"
    rows = [{"completion": "<think>a</think><answer>1</answer>"}, {"completion": "no tags"}]
    path.write_text("\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")  # rows on lines 3, 4
    assert main(["reward", str(path), "--rewards", "format"]) == 0
    out = capsys.readouterr().out
    assert f"{path}:4: reward=0.0000" in out and f"{path}:3: reward=1.0000" in out
