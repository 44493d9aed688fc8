"""Training curves from `metrics.jsonl`, the file both backends write with the same keys."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefill_kit.errors import DataError

PANELS = (("reward", "reward (total, per reward, eval)"), ("loss", "loss"), ("kl", "KL"),
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
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", source=str(path), line=line_no) from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError("expected an object with a `step`", source=str(path), line=line_no)
        rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and not math.isnan(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Draw reward, per-reward and eval scores, loss, KL and completion length over steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefill_kit.io import atomic_output

    runs = [(Path(d).name or str(d), read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for label, rows in runs:
            line, = ax.plot(*_series(rows, key), label=label if key != "reward" else f"{label}: total")
            if key == "reward":
                names = sorted({k for r in rows for k in r if k.startswith("rewards/")})
                for name, style in zip(names, _STYLES * len(names), strict=False):
                    ax.plot(*_series(rows, name), linestyle=style, color=line.get_color(), alpha=0.6,
                            label=f"{label}: {name.removeprefix('rewards/')}")
                if any("eval/reward" in r for r in rows):  # held-out prompts (data.eval_path): one dot per eval
                    ax.plot(*_series(rows, "eval/reward"), marker="o", linestyle="-", color=line.get_color(),
                            linewidth=0.8, label=f"{label}: eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    output = Path(output)
    with atomic_output(output, "wb") as f:
        fig.savefig(f, format=output.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return output
