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
