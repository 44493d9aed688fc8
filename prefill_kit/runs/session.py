"""One run directory, one run: a fresh run refuses a directory that holds another run's files.

Two runs in one directory overwrite each other's `metrics.jsonl` and mix their checkpoints, so a fresh run
starts only in a directory with no run files in it. `output.overwrite` (`prefill-kit train --overwrite`)
deletes the old run first; `output.resume_from` continues it. Both backends write the same kinds of files and
checkpoint directories (`checkpoint-<step>`), so one rule serves both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefill_kit.config import TrainingConfig
from prefill_kit.errors import ConfigError

# What a run (of either backend) leaves in its directory, completed or interrupted.
RUN_FILES = ("metrics.jsonl", "completions.jsonl", ".final-model.tmp")
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKERS = ("checkpoint.json", "trainer_state.json")  # builtin, TRL: written when a checkpoint is whole


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


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step whole checkpoint in `run_dir` (either backend's), or None."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
             and any((p / marker).is_file() for marker in CHECKPOINT_MARKERS)]
    return max(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)
