"""One run and its directory, the same for both backends (`RunSession`).

A fresh run refuses a directory that holds another run's files.

Two runs in one directory overwrite each other's `metrics.jsonl` and mix their checkpoints, so a fresh run
starts only in a directory with no run files in it. `output.overwrite` (`prefill-kit train --overwrite`)
deletes the old run first; `output.resume_from` continues it. Both backends write the same kinds of files and
checkpoint directories (`checkpoint-<step>`), so one rule serves both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefill_kit.config import TrainingConfig
from prefill_kit.data.io import atomic_output, keep_rows_through_step
from prefill_kit.errors import ConfigError
from prefill_kit.runs.completion_log import CompletionLog
from prefill_kit.runs.run_health import HealthMonitor
from prefill_kit.runs.trackers import flat_config, make_trackers, tracker_values

# What a run (of either backend) leaves in its directory, completed or interrupted.
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (METRICS_FILE, "completions.jsonl", ".final-model.tmp")
MERGED_DIR = "merged"  # <output.dir>/merged: base + LoRA adapter, a plain transformers model
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKERS = ("checkpoint.json", "trainer_state.json")  # builtin, TRL: written when a checkpoint is whole



@dataclass
class TrainResult:
    """What `train(config)` of either backend returns."""

    output_dir: Path
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # builtin: the metrics rows, on every process
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # builtin: the eval rows (`eval/...`)
    train_loss: float | None = None  # trl: TRL's mean training loss
    seconds: float | None = None  # trl: wall time of training


def run_files(run_dir: str | Path) -> list[str]:
    """The names in `run_dir` that a run wrote (metrics, completion logs, checkpoints, staging directories)."""
    path = Path(run_dir)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir()
                  if p.name in RUN_FILES or p.name.startswith((CHECKPOINT_PREFIX, "." + CHECKPOINT_PREFIX)))


def check_run_dir(config: TrainingConfig) -> bool:
    """Whether `output.dir` must be cleared before this run starts; ConfigError when the run may not start there.

    Read-only, so every process of a distributed run can call it and reach the same answer.
    """
    out = config.output
    if out.resume_from is not None and out.overwrite:
        raise ConfigError("output.overwrite: it deletes the run directory, and output.resume_from continues a run; "
                          "use one or the other")
    run_dir = Path(out.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir: {out.dir} is a file, not a directory")
    found = run_files(run_dir)
    if not found or out.resume_from is not None and _inside(Path(out.resume_from), run_dir):
        return False  # nothing there, or the run that is there continues
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    if not out.overwrite:
        raise ConfigError(f"output.dir: {out.dir} already holds a run ({shown}); give this run its own output.dir, "
                          "delete the old run first with --overwrite (output.overwrite: true), or continue it with "
                          f"--set output.resume_from={out.dir}")
    for key, value in (("model.path", config.model.path), ("model.tokenizer", config.model.tokenizer),
                       ("data.path", config.data.path), ("the working directory", ".")):
        if value and _inside(Path(value), run_dir):
            raise ConfigError(f"output.overwrite: {out.dir} holds {key} ({value}); refusing to delete it")
    return True


def claim_run_dir(config: TrainingConfig, *, is_main: bool) -> None:
    """Check `output.dir` (see `check_run_dir`) and, under `output.overwrite`, delete the old run on the main
    process. Every process calls it before any of them writes; the caller waits for all of them after it."""
    if check_run_dir(config) and is_main:
        shutil.rmtree(config.output.dir)


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def last_checkpoint(run_dir: str | Path, markers: tuple[str, ...] = CHECKPOINT_MARKERS) -> Path | None:
    """The highest-step whole checkpoint in `run_dir` (either backend's, or the one whose marker is given), or None."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
             and any((p / marker).is_file() for marker in markers)]
    return max(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def find_checkpoint(resume_from: str | Path, marker: str) -> Path:
    """`resume_from` itself when it is a checkpoint (it holds `marker`), else the latest checkpoint inside it."""
    path = Path(resume_from)
    if (path / marker).is_file():
        return path
    found = last_checkpoint(path, (marker,)) if path.is_dir() else None
    if found is not None:
        return found
    if marker == "trainer_state.json":  # TRL's wording
        if not path.is_dir():
            raise ConfigError(f"output.resume_from: {resume_from}: no such directory")
        raise ConfigError(f"output.resume_from: {resume_from}: holds no TRL checkpoint-N directory")
    raise ConfigError(f"output.resume_from: {path} is neither a checkpoint nor a run directory with one")


def checkpoint_step(checkpoint: Path | None) -> int:
    """The optimizer step a checkpoint (of either backend) was saved at, known before its state loads; 0: none."""
    if checkpoint is None:
        return 0
    if (checkpoint / "checkpoint.json").is_file():
        return int(json.loads((checkpoint / "checkpoint.json").read_text(encoding="utf-8"))["step"])
    state = checkpoint / "trainer_state.json"
    return int(json.loads(state.read_text(encoding="utf-8")).get("global_step", 0)) if state.is_file() else 0


def write_run_config(run_dir: str | Path, config) -> None:
    """`RUN_DIR/config.yaml`: the config the run used, so a run can be read later (`plot` shows reward weights)."""
    import yaml


    with atomic_output(Path(run_dir) / "config.yaml") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False, allow_unicode=True)


@contextlib.contextmanager
def final_model_dir(run_dir: str | Path, *, is_main: bool):
    """A fresh directory to save the final model into; its files move into `run_dir` only when saving finished.

    Each file lands by `os.replace`, so an interrupted save leaves no half-written weights in the run
    directory. Only the main process moves files; the others may write to the directory too (distributed
    saves) but leave the moving to it.
    """
    run_dir = Path(run_dir)
    staging = run_dir / ".final-model.tmp"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    try:
        yield staging
        if is_main:
            for item in staging.iterdir():
                target = run_dir / item.name
                if item.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                os.replace(item, target)
    finally:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)


class RunSession:
    """What a run does around training, the same for both backends: the resume lookup, claiming `output.dir`,
    config.yaml, metrics.jsonl and the trackers, the completion log, run health, and the final save.

    `checkpoint_marker` is the file that makes a backend's checkpoint whole (`checkpoint.json`,
    `trainer_state.json`). Every process makes one; only the main process writes.
    """

    def __init__(self, config: TrainingConfig, *, is_main: bool, checkpoint_marker: str):
        out = config.output
        self.config, self.is_main, self.dir = config, is_main, Path(out.dir)
        self.checkpoint = find_checkpoint(out.resume_from, checkpoint_marker) if out.resume_from else None
        self.resume_step = checkpoint_step(self.checkpoint)
        self.trackers = make_trackers(out, resume_step=self.resume_step)
        self.completion_log: CompletionLog | None = None
        self.health: HealthMonitor | None = None

    def claim(self) -> None:
        """Check `output.dir` and, with `output.overwrite`, delete the old run (see `claim_run_dir`); every
        process calls it, and waits for all of them after it."""
        claim_run_dir(self.config, is_main=self.is_main)

    def start(self, step: int, reward_names: list[str]) -> None:
        """Open the run at `step` (0, or the resumed step): config.yaml, metrics rows up to `step`, the trackers,
        the completion log, run health (which knows the rewards: a length reward makes truncation expected)."""
        out = self.config.output
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_run_config(self.dir, self.config)
            keep_rows_through_step(self.dir / METRICS_FILE, step)
            for tracker in self.trackers:
                tracker.start()
                tracker.store_init_configuration(flat_config(self.config.to_dict()))
        self.completion_log = CompletionLog(self.dir, every=out.log_completions_steps, max_rows=out.log_completions_max,
                                            reward_names=reward_names, resume_step=step, is_main=self.is_main)
        self.health = HealthMonitor(window=out.logging_steps,
                                    max_completion_length=self.config.grpo.max_completion_length,
                                    reward_names=reward_names)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row to metrics.jsonl and to every tracker, under the same names and step (main process)."""
        if not self.is_main:
            return
        with open(self.dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(tracker_values(row), step=row["step"])

    def final_model_dir(self, *, is_main: bool | None = None):
        """A staging directory for the final model (see `final_model_dir`)."""
        return final_model_dir(self.dir, is_main=self.is_main if is_main is None else is_main)

    def save_merged(self, peft_model, tokenizer, staging: Path) -> None:
        """With `model.lora.merge`: base + adapter as one plain model (and the tokenizer) in `staging/merged`
        (main process). Merges in place: call it last, after the adapter itself was saved."""
        lora = self.config.model.lora
        if self.is_main and lora is not None and lora.merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(staging / MERGED_DIR)
            tokenizer.save_pretrained(staging / MERGED_DIR)

    def finish(self) -> None:
        if self.is_main:
            for tracker in self.trackers:
                tracker.finish()
