"""`prefill-kit plot`: curves from one or several runs' metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from prefill_kit.cli import main
from prefill_kit.errors import DataError
from prefill_kit.plotting import _series, read_metrics


def write_run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(offset: float):
    return [{"step": s, "loss": 0.1 / s, "reward": offset + s / 10, "rewards/format": s / 20, "kl": None,
             "completion_length": 30 - s} for s in range(1, 6)]


def test_plot_compares_runs_in_one_png(tmp_path):
    a, b = write_run(tmp_path / "builtin", rows(0.0)), write_run(tmp_path / "trl", rows(0.2))
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_series_skips_missing_and_null_values(tmp_path):
    run = write_run(tmp_path / "run", rows(0.0))
    metrics = read_metrics(run)
    steps, rewards = _series(metrics, "reward")
    assert steps == [1, 2, 3, 4, 5] and rewards == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert _series(metrics, "kl") == ([], [])  # beta == 0: no KL logged, nothing drawn


def test_bad_metrics_line_is_named(tmp_path):
    run = write_run(tmp_path / "run", rows(0.0))
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:6: invalid JSON"):
        read_metrics(run)
    with pytest.raises(DataError, match="no metrics.jsonl"):
        read_metrics(tmp_path)


def test_eval_rows_draw_an_eval_reward_line_and_leave_the_training_lines_alone(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, **kw: drawn.append((kw.get("label"), list(a[0]), list(a[1]))) or
                        original(ax, *a, **kw))
    evals = [{"step": 2, "eval/reward": 0.5, "eval/rewards/format": 0.25}, {"step": 4, "eval/reward": 0.75,
                                                                               "eval/rewards/format": 0.5}]
    run = write_run(tmp_path / "run", sorted(rows(0.0) + evals, key=lambda r: r["step"]))
    assert main(["plot", str(run), "-o", str(tmp_path / "curves.png")]) == 0
    lines = {label: (steps, values) for label, steps, values in drawn}
    assert lines["run: eval"] == ([2, 4], [0.5, 0.75])
    assert lines["run: total"][0] == [1, 2, 3, 4, 5]  # eval rows add no points to the training curves
