"""completions.jsonl: one schema from both backends, bounded, prefix apart from completion; run-health warnings."""

from __future__ import annotations

import json
import logging

import pytest

from prefill_kit.config import config_from_dict
from prefill_kit.errors import ConfigError
from prefill_kit.runs.completion_log import (
    COMPLETIONS_FILE,
    CompletionLog,
    bounded,
    check_reward_names,
    completion_rows,
    is_due,
)
from prefill_kit.runs.run_health import HealthMonitor, zero_spread_share
from tests.conftest import REPO

PREFIX = "<think>\n"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("step", "every", "span", "due"), [
    (1, 10, 1, True),     # the first rollout is always logged
    (10, 10, 1, True), (20, 10, 1, True), (5, 10, 1, False), (11, 10, 1, False),
    (9, 10, 2, True),     # a rollout reused for steps 9 and 10 covers step 10
    (7, 10, 2, False),
    (1, 0, 1, False),     # 0 turns logging off
])
def test_which_steps_are_logged(step, every, span, due):
    assert is_due(step, every, span) is due


def test_bounded_keeps_whole_prompt_groups_first():
    rows = [{"prompt_index": p} for p in (4, 4, 9, 9, 2, 2)]
    assert [r["prompt_index"] for r in bounded(rows, 5)] == [4, 4, 9, 9]  # group 2 would make 6
    assert [r["prompt_index"] for r in bounded(rows, 6)] == [4, 4, 9, 9, 2, 2]
    assert bounded(rows, 1) == rows[:1]  # a group larger than the bound: its first rows


def test_total_reward_skips_none_and_is_none_when_nothing_scored():
    from prefill_kit.grpo.scoring import weighted_totals

    assert weighted_totals([[1.0, None, 0.5], [None, float("nan"), None]], [1.0, 3.0, 2.0]) == [2.0, None]


def test_logged_totals_are_the_rollouts_totals_to_the_last_bit():
    """One rule and one arithmetic: the totals TRL's completions.jsonl and both evals log are combine_rewards'."""
    import torch

    from prefill_kit.grpo.advantages import combine_rewards
    from prefill_kit.grpo.scoring import nullable, weighted_totals

    scores = torch.rand(64, 3, generator=torch.Generator().manual_seed(0))
    scores[::5, 1] = float("nan")
    scores[7] = float("nan")
    weights = [0.1, 2.0, 0.3]
    listed = [[None if v != v else v for v in row] for row in scores.tolist()]
    expected = nullable(combine_rewards(scores, torch.tensor(weights)))
    assert weighted_totals(listed, weights) == expected and expected[7] is None


def test_a_reward_named_like_a_fixed_column_is_refused():
    with pytest.raises(ConfigError, match="'advantage' column"):
        check_reward_names(["format", "advantage"])


def test_rows_are_json_safe_and_in_schema_order():
    rows = completion_rows(step=3, prompt_indices=[7], prefixes=[PREFIX], completions=["x"], completion_lengths=[2],
                           truncated=[False], rewards={"format": [float("nan")]}, reward=[None], advantages=[0.0])
    assert list(rows[0]) == ["step", "prompt_index", "prefix", "completion", "completion_length", "truncated",
                             "format", "reward", "advantage"]
    assert rows[0]["format"] is None  # NaN is not JSON


def test_a_resumed_run_drops_the_rows_it_will_log_again(tmp_path):
    log = CompletionLog(tmp_path, every=1, max_rows=4, reward_names=["format"])
    for step in (1, 2, 3):
        log.write([{"step": step, "prompt_index": 0}])
    CompletionLog(tmp_path, every=1, max_rows=4, reward_names=["format"], resume_step=2)
    assert [json.loads(line)["step"] for line in (tmp_path / COMPLETIONS_FILE).read_text().splitlines()] == [1, 2]
    CompletionLog(tmp_path, every=1, max_rows=4, reward_names=["format"], resume_step=0)
    assert not (tmp_path / COMPLETIONS_FILE).exists()  # a fresh run starts afresh


def test_zero_spread_share_counts_groups_whose_totals_do_not_vary():
    # groups of 2: (1, 1) flat, (0, 1) spread, (None, 3) one scorable value -> flat, (None, None) flat
    assert zero_spread_share([1.0, 1.0, 0.0, 1.0, None, 3.0, None, None], 2) == 0.75


def test_health_monitor_warns_once_after_the_window(caplog):
    monitor = HealthMonitor(window=2, max_completion_length=16)
    issued = []
    with caplog.at_level(logging.WARNING, logger="prefill_kit.runs.run_health"):
        for step, truncated in enumerate([0.9, 0.1, 0.9, 0.9, 0.9, 1.0], start=1):
            issued += monitor.update(step, truncated, 0.0)
    assert len(issued) == 1 and issued[0].startswith("step 4: 90% of completions truncated: raise "
                                                     "grpo.max_completion_length (now 16)")
    assert [r.getMessage() for r in caplog.records] == issued
    # the other signal has its own run and its own single warning; 2 rollout steps fill a window of 2
    assert len(monitor.update(7, 0.0, 0.8, steps=2)) == 1 and not monitor.update(8, 0.0, 0.8)
    assert issued[0].endswith("(above 50% for 2 steps in a row)")
    assert HealthMonitor(window=1, max_completion_length=16).update(3, 0.9, 0.0)[0].endswith(
        "(above 50% for 1 step in a row)")


def test_cli_prints_library_warnings_with_tqdm_write_above_the_bar(monkeypatch):
    from tqdm import tqdm

    from prefill_kit.cli import _warnings_above_progress_bars

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    with _warnings_above_progress_bars():
        logging.getLogger("prefill_kit.runs.run_health").warning("step 3: 90% of completions truncated")
    assert written == ["step 3: 90% of completions truncated"]


# --------------------------------------------------------------------------------------------------- both backends


def tiny_config(model_dir, out_dir, backend):
    return config_from_dict({
        "backend": backend, "model": {"path": str(model_dir)},
        "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": PREFIX},
        "rewards": [{"name": "format", "weight": 1.0}, {"name": "tests.recording_reward:record", "weight": 0.5}],
        # 4 tokens: a random model almost never ends that soon, so both backends should warn about truncation
        "grpo": {"num_generations": 2, "max_completion_length": 4},
        "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 3, "seed": 0},
        "output": {"dir": str(out_dir), "save_steps": 0, "logging_steps": 2,
                   "log_completions_steps": 2, "log_completions_max": 3}})


@pytest.fixture(scope="module")
def logged_runs(tiny_model_dir, tmp_path_factory):
    """Each backend's completions.jsonl rows and the run-health warnings it logged."""
    from prefill_kit.backends import builtin, trl

    out = {}
    for backend, train in (("builtin", builtin.train), ("trl", trl.train)):
        run_dir = tmp_path_factory.mktemp(backend)
        handler = _Collect()
        logging.getLogger("prefill_kit.runs.run_health").addHandler(handler)
        try:
            train(tiny_config(tiny_model_dir, run_dir, backend))
        finally:
            logging.getLogger("prefill_kit.runs.run_health").removeHandler(handler)
        rows = [json.loads(line) for line in (run_dir / COMPLETIONS_FILE).read_text().splitlines()]
        out[backend] = rows, handler.messages
    return out


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_both_backends_log_completions_with_the_same_keys(logged_runs):
    keys = {backend: [list(r) for r in rows] for backend, (rows, _) in logged_runs.items()}
    expected = ["step", "prompt_index", "question", "solution", "prefix", "completion", "completion_length",
                "truncated", "format", "tests.recording_reward:record", "reward", "advantage"]
    for backend in keys:
        assert all(k == expected for k in keys[backend]), backend


@pytest.mark.parametrize("backend", ["builtin", "trl"])
def test_logged_rows_carry_the_question_and_solution_of_their_data_row(logged_runs, backend):
    rows, _ = logged_runs[backend]
    data = [json.loads(line) for line in (REPO / "examples" / "math_tiny.jsonl").read_text().splitlines()]
    for row in rows:
        source = data[row["prompt_index"]]
        assert row["question"] == source["messages"][-1]["content"] and source["messages"][-1]["role"] == "user"
        assert row["solution"] == source["solution"]


def test_question_and_solution_are_logged_only_when_the_data_has_them():
    common = dict(step=1, prompt_indices=[0], prefixes=[""], completions=["x"], completion_lengths=[1],
                  truncated=[False], rewards={"r": [1.0]}, reward=[1.0], advantages=[0.0])
    assert list(completion_rows(**common)[0]) == ["step", "prompt_index", "prefix", "completion",
                                                  "completion_length", "truncated", "r", "reward", "advantage"]
    row = completion_rows(**common, questions=["2+2?"], solutions=[4])[0]
    assert list(row)[:4] == ["step", "prompt_index", "question", "solution"]
    assert (row["question"], row["solution"]) == ("2+2?", "4")
    for name in ("question", "solution"):
        with pytest.raises(ConfigError, match=f"would clash with the '{name}' column"):
            check_reward_names([name])


def test_the_question_is_the_last_user_message_in_every_format():
    from prefill_kit.data.formats import last_user_text

    assert last_user_text([{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                           {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"},
                           {"role": "assistant", "content": "reference"}]) == "second"
    assert last_user_text([{"role": "user", "content": [{"type": "text", "text": "look: "},
                                                         {"type": "image"}, {"type": "text", "text": "a cat"}]}]
                          ) == "look: a cat"
    assert last_user_text([{"role": "system", "content": "only a system prompt"}]) is None


def test_training_data_gets_a_question_column_from_any_conversation_format(tmp_path, tiny_tokenizer):
    from prefill_kit.config import DataSection
    from prefill_kit.prompts.training_data import load_training_data

    rows = [{"query": "2+2?", "response": "4", "history": [["hi", "hello"]]},
            {"query": "3+3?", "response": "6", "history": []}]
    path = tmp_path / "swift.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_training_data(DataSection(path=str(path), prefix=PREFIX), tiny_tokenizer)
    assert dataset["question"] == ["2+2?", "3+3?"] and dataset["solution"] == ["4", "6"]
    kept = tmp_path / "own.jsonl"  # a `question` column of the data's own is kept as it is
    kept.write_text(json.dumps({"messages": [{"role": "user", "content": "asked"}], "question": "mine"}) + "\n")
    assert load_training_data(DataSection(path=str(kept)), tiny_tokenizer)["question"] == ["mine"]


@pytest.mark.parametrize("backend", ["builtin", "trl"])
def test_logged_rows_are_bounded_and_hold_the_prefix_apart(logged_runs, backend):
    rows, _ = logged_runs[backend]
    data = [json.loads(line) for line in (REPO / "examples" / "math_tiny.jsonl").read_text().splitlines()]
    # step 1 and every 2nd step of 3: steps 1 and 2; at most 3 rows each, whole groups of 2 -> 2 rows
    assert [r["step"] for r in rows] == [1, 1, 2, 2]
    for row in rows:
        assert row["prefix"] == PREFIX and not row["completion"].startswith(PREFIX.strip())
        assert 0 <= row["prompt_index"] < len(data)
        assert 1 <= row["completion_length"] <= 4
        if row["truncated"]:  # no EOS within max_completion_length
            assert row["completion_length"] == 4
        # the recording reward scores len(completion) % 3 of the completion text alone (without the prefix)
        assert row["tests.recording_reward:record"] == float(len(row["completion"]) % 3)
        assert row["reward"] == pytest.approx(row["format"] + 0.5 * row["tests.recording_reward:record"])
    for a, b in zip(rows[::2], rows[1::2], strict=True):  # a group: same prompt, advantages centred on 0
        assert a["prompt_index"] == b["prompt_index"]
        assert a["advantage"] == pytest.approx(-b["advantage"], abs=1e-5)
        if a["reward"] == b["reward"]:
            assert a["advantage"] == b["advantage"] == 0.0
        else:
            assert (a["advantage"] > 0) == (a["reward"] > b["reward"])


@pytest.mark.parametrize("backend", ["builtin", "trl"])
def test_training_warns_once_about_persistent_truncation(logged_runs, backend):
    _, messages = logged_runs[backend]
    truncation = [m for m in messages if "of completions truncated: raise grpo.max_completion_length (now 4)" in m]
    assert len(truncation) == 1, messages  # 3 steps above 50%, window 2: warned at step 2 and never again
    assert truncation[0].startswith("step 2: ")


def test_the_truncation_warning_says_so_when_a_length_reward_makes_truncation_expected():
    """Issue 18: preflight called truncation not blocking (soft_overlong), then both backends warned "raise
    grpo.max_completion_length" with no word of it. One wording (run_health.truncation_expected) for all three."""
    from prefill_kit.runs.run_health import truncation_expected

    with_length = HealthMonitor(window=1, max_completion_length=16, reward_names=["format", "soft_overlong"])
    (message,) = with_length.update(1, 0.88, 0.0)
    assert truncation_expected(["soft_overlong"]) in message
    assert "not blocking: soft_overlong scores length" in message and "expected early in the run" in message
    (plain,) = HealthMonitor(window=1, max_completion_length=16, reward_names=["format"]).update(1, 0.88, 0.0)
    assert "not blocking" not in plain
