"""`prefill-kit plot`: curves from one or several runs' metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from prefill_kit.cli import main
from prefill_kit.errors import DataError
from prefill_kit.runs.plots import _series, read_metrics


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


def _config(run, rewards):
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump({"rewards": rewards}), encoding="utf-8")


def test_panels_without_data_are_left_out_and_legends_sit_beside_the_data(tmp_path):
    import matplotlib.pyplot as plt

    from prefill_kit.runs.plots import draw_runs

    run = write_run(tmp_path / "run", rows(0.0))  # kl is None throughout: beta == 0
    _config(run, [{"name": "format", "weight": 0.5}])
    fig = draw_runs([run])
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 3 and not any(t.startswith("KL") for t in titles)
    assert not any("eval" in t for t in titles)  # no eval points, no word of them (issue 18)
    with_eval = write_run(tmp_path / "evaluated", [*rows(0.0), {"step": 2, "eval/reward": 0.5}])
    assert draw_runs([with_eval]).axes[0].get_title().endswith("; dots: eval")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["run: total", "run: format (x0.5)"]
    plt.close(fig)


def test_unknown_weights_are_said_not_guessed(tmp_path):
    import matplotlib.pyplot as plt

    from prefill_kit.runs.plots import draw_runs

    fig = draw_runs([write_run(tmp_path / "run", rows(0.0))])  # no config.yaml
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["run: total", "run: format (x?)"]
    assert "no config.yaml" in fig._suptitle.get_text()
    plt.close(fig)


def test_default_image_goes_into_the_first_run_directory(tmp_path, monkeypatch):
    a, b = write_run(tmp_path / "a", rows(0.0)), write_run(tmp_path / "b", rows(0.2))
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(a), str(b)]) == 0
    assert (a / "curves.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "curves.png").exists()


def test_reward_histograms_say_how_many_scores_are_none():
    from prefill_kit.cli.reward import histogram_title

    assert histogram_title("accuracy (x2)", [1.0, None, 0.0, None]) == "accuracy (x2)\n2 of 4 None (not drawn)"
    assert histogram_title("format (x1)", [1.0, 0.0]) == "format (x1)\nall 2 scored"


def test_an_environments_own_reward_is_labelled_with_weight_one(tmp_path):
    """A multi-turn run's environment reward (named after its class, weight 1 as TRL gives it) is not in
    config.yaml's `rewards`; its label must still carry its weight, not `x?`."""
    from prefill_kit.runs.plots import reward_weights

    run = write_run(tmp_path / "run", rows(0.0))
    (run / "config.yaml").write_text("rewards: [{name: format, weight: 0.5}]\n"
                                     "rollout: {environment: 'examples.calculator:Calculator'}\n", encoding="utf-8")
    assert reward_weights(run) == {"format": 0.5, "Calculator": 1.0}
