"""Checkpoints: `accelerate`'s save_state (model, optimizer, RNG of every process) plus the loop's own state.

A checkpoint is a directory `checkpoint-<step>` in the run directory, written under a temporary name and
renamed when complete, so a crash never leaves a checkpoint that looks whole but is not.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "checkpoint-"


@dataclass
class LoopState:
    """What the loop needs beyond model, optimizer, scheduler and RNG to continue exactly.

    `step` fixes the data position (see `data.prompt_indices`); `rollout` is the batch being reused when
    a checkpoint falls between the `num_iterations` passes over one generation.
    """

    step: int = 0
    rollout: dict[str, Any] | None = None
    rollout_stats: dict[str, Any] | None = None  # the reused batch's reward and length statistics, for logging

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rollout": self.rollout, "rollout_stats": self.rollout_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.rollout = state.get("rollout")
        self.rollout_stats = state.get("rollout_stats")


def save_checkpoint(accelerator, run_dir: Path, step: int, tokenizer=None) -> Path:
    """Write `run_dir/checkpoint-<step>`; every process must call it (each saves its own RNG state).

    The tokenizer goes in too, so that a checkpoint can be evaluated or served as it is.
    """
    final = run_dir / f"{PREFIX}{step}"
    tmp = run_dir / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "checkpoint.json").write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final
