"""The shipped tiny example shows learning, not only plumbing: its reward rises within its first steps."""

from __future__ import annotations

from prefill_kit.config import load_config
from tests.conftest import REPO


def test_the_tiny_example_learns_to_finish_sooner(tiny_model_dir, tmp_path, monkeypatch, one_torch_thread):
    from prefill_kit.backends import builtin

    monkeypatch.chdir(REPO)  # the example's data path is relative to the repository, as in the README
    config = load_config(REPO / "examples" / "grpo_tiny.yaml",
                         [f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.max_steps=15",
                          "train.lr_scheduler_type=constant", "output.save_steps=0"])  # half the run, at full LR
    history = builtin.train(config, progress=False).history
    first, last = history[:3], history[-3:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    # a random model starts near -0.45 (about 56 of 128 characters) and learns to end sooner; format stays 0
    assert mean(first, "reward") < -0.3
    assert mean(last, "reward") > mean(first, "reward") + 0.2
    assert mean(last, "completion_length") < mean(first, "completion_length") - 10
    assert all(r["rewards/format"] == 0.0 for r in history)
    assert {r["rewards/soft_overlong"] for r in history} != {None}


LIBRARY_CHATTER = ("Generating train split", "Map", "Loading weights", "Writing model shards", "Removed shared tensor")


def test_the_quick_start_shows_no_library_chatter(tmp_path, monkeypatch, capsys, caplog, one_torch_thread):
    """README's quick start (make-tiny-model, preflight, train with a checkpoint) prints prefill-kit's own bars and
    warnings only: no datasets or transformers progress bars, no tied-embedding notice from accelerate."""
    from datasets.utils.tqdm import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    from prefill_kit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    short = ["--set", "train.max_steps=2", "--set", "output.save_steps=1"]  # a checkpoint saves tied weights
    assert main(["make-tiny-model", "runs/tiny-model"]) == 0
    assert main(["preflight", "examples/grpo_tiny.yaml", "--prompts", "2"]) == 0
    assert main(["train", "examples/grpo_tiny.yaml", *short]) == 0
    assert (tmp_path / "runs/grpo-tiny/checkpoint-1").is_dir()
    err = capsys.readouterr().err
    shown = err + "\n".join(caplog.messages)
    assert [line for line in shown.replace("\r", "\n").splitlines() if line.strip().startswith(LIBRARY_CHATTER)
            or "Removed shared tensor" in line] == []
    assert "preflight: generating" in err and "train:" in err  # prefill-kit's own bars stay
    assert any("completions truncated" in m for m in caplog.messages)  # and its warnings
    # the libraries' settings are back as they were once a command ends
    assert not are_progress_bars_disabled() and transformers_logging.is_progress_bar_enabled()
