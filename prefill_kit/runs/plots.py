"""Training curves from `metrics.jsonl`, the file both backends write with the same keys."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefill_kit.data.io import iter_jsonl
from prefill_kit.errors import DataError

EVAL_NOTE = "; dots: eval"  # in the reward panel's title only when some run has eval points
PANELS = (("reward", "reward: total (solid) = sum of weight x score of each reward (broken lines)"),
          ("loss", "loss"), ("kl", "KL"),
          ("completion_length", "completion length (tokens)"))


_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1))]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `RUN_DIR/metrics.jsonl` (or of that file given directly); DataError names a bad line."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError("no metrics.jsonl here: is it a prefill-kit run directory?", source=str(run_dir))
    rows = []
    for line_no, row in iter_jsonl(path):  # a bad line is named with its column, as everywhere
        if "step" not in row:
            raise DataError("expected an object with a `step`", source=str(path), line=line_no)
        rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and not math.isnan(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def reward_weights(run_dir: str | Path) -> dict[str, float] | str:
    """Each reward's weight from `RUN_DIR/config.yaml` (written by both backends), or why it cannot be known."""
    import yaml

    from prefill_kit.errors import PrefillKitError
    from prefill_kit.rewards import parse_reward_spec

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return "no config.yaml in the run directory"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        weights = {w.name: w.weight for w in parse_reward_spec(config["rewards"])}
    except (PrefillKitError, yaml.YAMLError, KeyError, TypeError) as exc:
        return f"config.yaml: {exc}"
    environment = (config.get("rollout") or {}).get("environment")
    if environment:  # its get_reward() is a reward named after its class, weight 1 (TRL's rule)
        weights.setdefault(environment.rsplit(":", 1)[-1].rsplit(".", 1)[-1], 1.0)
    return weights


def _reward_label(name: str, weights: dict[str, float] | str) -> str:
    return f"{name} (x{weights[name]:g})" if isinstance(weights, dict) and name in weights else f"{name} (x?)"


def draw_runs(run_dirs: list[str | Path]):
    """The figure: reward (total and each weighted part), loss, KL and completion length over steps, one line
    per run. A panel with no data in any run (KL when `beta` is 0) is left out; legends sit beside the panels,
    never over the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d).resolve().name or str(d), read_metrics(d), reward_weights(d)) for d in run_dirs]
    panels = [(key, title) for key, title in PANELS if any(_series(rows, key)[0] for _, rows, _ in runs)]
    if not panels:
        raise DataError("no step has reward, loss, KL or completion length: nothing to plot",
                        source=str(run_dirs[0]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels) + 0.4), squeeze=False,
                             constrained_layout=True, sharex=True)
    for ax, (key, title) in zip(axes[:, 0], panels, strict=True):
        for label, rows, weights in runs:
            line, = ax.plot(*_series(rows, key), label=label if key != "reward" else f"{label}: total")
            if key == "reward":
                names = sorted({k for r in rows for k in r if k.startswith("rewards/")})
                for name, style in zip(names, _STYLES * len(names), strict=False):
                    part = _reward_label(name.removeprefix("rewards/"), weights)
                    ax.plot(*_series(rows, name), linestyle=style, color=line.get_color(), alpha=0.6,
                            label=f"{label}: {part}")
                if any("eval/reward" in r for r in rows):  # held-out prompts (data.eval_path): one dot per eval
                    ax.plot(*_series(rows, "eval/reward"), marker="o", linestyle="-", color=line.get_color(),
                            linewidth=0.8, label=f"{label}: eval")
        has_eval = key == "reward" and any("eval/reward" in r for _, rows, _ in runs for r in rows)
        ax.set_title(title + EVAL_NOTE * has_eval, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes[-1, 0].set_xlabel("step")
    unknown = [f"{label}: {w}" for label, _, w in runs if isinstance(w, str)]
    if unknown:
        fig.suptitle("reward weights unknown (x?) for " + "; ".join(unknown), fontsize=8)
    return fig


def plot_runs(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Save `draw_runs(run_dirs)`; `output` defaults to `curves.png` in the first run directory."""
    import matplotlib.pyplot as plt

    from prefill_kit.data.io import atomic_output

    fig = draw_runs(run_dirs)
    output = Path(output) if output is not None else Path(run_dirs[0]) / "curves.png"
    with atomic_output(output, "wb") as f:
        fig.savefig(f, format=output.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return output
