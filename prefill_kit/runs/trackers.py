"""Experiment trackers (`output.report_to`): TensorBoard, Weights & Biases, MLflow, trackio, for both backends.

Each tracker is accelerate's (`accelerate.tracking`), and each gets exactly the rows metrics.jsonl gets, under
the same names (`reward`, `rewards/<name>`, `loss`, `eval/reward`, ...) at the same `step`. The TRL backend
feeds them too, instead of transformers' `report_to` callbacks: those rename every key (`train/reward`,
`train/rewards/format/mean`, `eval/reward`) and MLflow's keeps TRL's raw names, so the same run would show
different curves per backend and per tracker.

Where each writes: TensorBoard to `OUTPUT_DIR/tensorboard`; wandb to `OUTPUT_DIR/wandb` (online, or offline with
`WANDB_MODE=offline`) in project `output.project`; MLflow to its tracking URI (`MLFLOW_TRACKING_URI`, a database
or server: the file store cannot hold both `clip_ratio` and `clip_ratio/low_mean`), experiment
`output.project`; trackio to its local store, project `output.project`. `output.run_name` names the run in
wandb, MLflow and trackio (default: the last part of `output.dir`).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

from prefill_kit.config import OutputSection
from prefill_kit.errors import ConfigError

# tracker name -> the package it imports (and that `pip install` takes)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(report_to: list[str]) -> None:
    """ConfigError, before any model is loaded, for a tracker whose package is not installed.

    accelerate itself only logs a debug line and drops such a tracker, so a run would go untracked unnoticed.
    """
    for name in report_to:
        if name not in PACKAGES:
            raise ConfigError(f"output.report_to: unknown tracker {name!r}; known: {', '.join(PACKAGES)}")
        package = PACKAGES[name]
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise ConfigError(f"output.report_to: {name} needs the `{package}` package, which cannot be imported "
                              f"({exc}); install it (pip install {package}) or remove {name}") from None


def run_name(output: OutputSection) -> str:
    return output.run_name or Path(output.dir).resolve().name


def make_trackers(output: OutputSection, *, resume_step: int = 0) -> list:
    """accelerate tracker objects for `output.report_to`, not started yet (`start()` opens the run).

    A run resumed at `resume_step` keeps TensorBoard's events up to that step and drops the later ones of the
    stopped run (`purge_step`), as metrics.jsonl keeps its rows; wandb, MLflow and trackio start a new run.
    """
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    check_trackers(output.report_to)
    name = run_name(output)
    made = {
        # writes to output.dir/tensorboard
        "tensorboard": lambda: TensorBoardTracker("tensorboard", output.dir, purge_step=resume_step + 1),
        "wandb": lambda: WandBTracker(output.project, name=name, dir=output.dir),
        "mlflow": lambda: MLflowTracker(experiment_name=output.project, run_name=name),
        "trackio": lambda: TrackioTracker(output.project, name=name),
    }
    return [made[tracker]() for tracker in output.report_to]


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl row, as trackers take them: no `step` (it is the x axis), no None."""
    return {k: v for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The run's config as `section.key: value` pairs of plain scalars, which every tracker's hparams take."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[prefix + key] = value
        else:  # None, lists, empty mappings: TensorBoard's hparams take only scalars
            out[prefix + key] = json.dumps(value)
    return out
