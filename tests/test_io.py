"""Per-step logs cut back on resume, and atomic outputs."""

from __future__ import annotations

import json

import pytest

from prefill_kit.data.io import atomic_output, keep_rows_through_step


def test_keep_rows_through_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 2, 3, 4)))
    keep_rows_through_step(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
    keep_rows_through_step(path, 0)  # a fresh run starts the log afresh
    assert not path.exists()
    keep_rows_through_step(path, 3)  # nothing to cut is not an error
    assert not path.exists()


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), atomic_output(target) as f:
        f.write("half a row")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as f:
        f.write("whole\n")
    assert target.read_text() == "whole\n" and list(tmp_path.iterdir()) == [target]


def test_a_failed_atomic_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("good\n")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as f:
        f.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "good\n" and list(tmp_path.iterdir()) == [target]
