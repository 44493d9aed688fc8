"""A run fails before loading anything on what can be checked first, and one run directory holds one run."""

from __future__ import annotations

import json
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefill_kit.backends import builtin, trl
from prefill_kit.config import config_from_dict
from prefill_kit.errors import ConfigError
from prefill_kit.runs.checks import check_model_source
from prefill_kit.runs.session import check_run_dir, last_checkpoint
from tests.conftest import REPO

BACKENDS = {"builtin": builtin.train, "trl": trl.train}
DATA = str(REPO / "examples" / "math_tiny.jsonl")


def raw_config(model_path, out_dir, **sections) -> dict:
    raw = {"model": {"path": str(model_path)}, "data": {"path": DATA, "prefix": "<think>\n"},
           "rewards": [{"name": "format"}],
           "grpo": {"num_generations": 2, "max_completion_length": 4},
           "train": {"per_device_train_batch_size": 4, "max_steps": 1, "seed": 0},
           "output": {"dir": str(out_dir), "save_steps": 0}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or tokenizer fails the test: the error must come first."""
    def tripwire(*args, **kwargs):
        raise AssertionError(f"loaded {args[0]!r} before the config error")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", tripwire)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tripwire)


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """A Hub that refuses connections at once, and an empty cache: like a machine with no network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hub-cache"


# ------------------------------------------------------------------------------------- fail before loading


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize(("sections", "message"), [
    ({"model": {"path": "./no-such-model"}}, "model.path: ./no-such-model: no such directory"),
    ({"model": {"tokenizer": "/no/such/tokenizer"}}, "model.tokenizer: /no/such/tokenizer: no such directory"),
    ({"data": {"path": "no-such-data.jsonl"}}, "data.path: no-such-data.jsonl: no such file or directory"),
    ({"data": {"path": "no-such-shards/*.parquet"}}, "data.path: no-such-shards/*.parquet: no file matches"),
    ({"data": {"few_shot": {"path": "no-shots.jsonl"}}}, "data.few_shot.path: no-shots.jsonl: no such file or"),
    ({"data": {"eval_path": "no-eval.jsonl"}, "train": {"eval_steps": 1}},
     "data.eval_path: no-eval.jsonl: no such file or directory"),
    ({"data": {"eval_path": DATA}, "train": {"eval_steps": 1}},
     f"data.eval_path: {DATA} is the training data; eval rows must be held out"),
    ({"rewards": [{"name": "format"}, {"name": "fromat"}]}, "rewards[1]: unknown reward 'fromat'"),
    ({"rewards": "format:2,fromat"}, "rewards: unknown reward 'fromat'"),
    ({"rewards": [{"name": "no_such_module_xyz:reward"}]},
     "rewards[0]: reward 'no_such_module_xyz:reward': cannot import it (ModuleNotFoundError"),
    ({"rewards": [{"name": "tests.recording_reward:no_such_function"}]},
     "rewards[0]: reward 'tests.recording_reward:no_such_function': cannot import it (AttributeError"),
])
def test_bad_paths_and_rewards_fail_before_anything_loads(backend, sections, message, tiny_model_dir, tmp_path,
                                                          nothing_loads):
    config = config_from_dict(raw_config(tiny_model_dir, tmp_path / "run", **sections))
    with pytest.raises(ConfigError) as exc:
        BACKENDS[backend](config)
    assert message in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_a_reward_module_that_fails_to_import_is_a_config_error(tmp_path, monkeypatch, tiny_model_dir,
                                                                  nothing_loads):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    (tmp_path / "broken_rewards.py").write_text("def brevity(completions, **kwargs)\n    return []\n")
    config = config_from_dict(raw_config(tiny_model_dir, tmp_path / "run",
                                         rewards=[{"name": "broken_rewards:brevity"}]))
    with pytest.raises(ConfigError, match=r"rewards\[0\]: reward 'broken_rewards:brevity': cannot import it "
                                          r"\(SyntaxError"):
        builtin.train(config)


def test_a_hub_id_with_no_network_is_one_line_at_once(tiny_model_dir, tmp_path, no_hub, nothing_loads, capfd):
    from prefill_kit.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(raw_config("someorg/some-model", tmp_path / "run")))
    assert main(["train", str(cfg)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Retrying" not in err and "Traceback" not in err
    assert err.startswith("prefill-kit train: error: ")
    assert "model.path: someorg/some-model is not a local directory, and the Hugging Face Hub is unreachable" in err


def test_a_hub_id_offline_is_looked_up_in_the_cache_only(no_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://asking-the-hub-is-a-bug.invalid")
    with pytest.raises(ConfigError, match=r"model.path: someorg/some-model is neither a local directory nor in "
                                          r"the Hugging Face cache \(HF_HUB_OFFLINE is set"):
        check_model_source("model.path", "someorg/some-model")
    snapshot = no_hub / "models--someorg--some-model"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc123")
    (snapshot / "snapshots" / "abc123").mkdir(parents=True)
    (snapshot / "snapshots" / "abc123" / "config.json").write_text("{}")
    check_model_source("model.path", "someorg/some-model")  # cached: no error, no request
    with pytest.raises(ConfigError, match="model.tokenizer: someorg/some-model is neither"):
        check_model_source("model.tokenizer", "someorg/some-model")  # a model's config is not a tokenizer


def test_a_path_that_cannot_be_a_hub_id_is_never_looked_up(no_hub, monkeypatch, tmp_path):
    for name in ("../models/x", "/abs/model", "a/b/c", "~/model", "models/"):
        with pytest.raises(ConfigError, match=f"model.path: {name}: no such directory"):
            check_model_source("model.path", name)
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ConfigError, match="is a file; expected a model directory"):
        check_model_source("model.path", str(tmp_path / "weights.bin"))


# --------------------------------------------------------------------------------- one directory, one run


def _old_run(run_dir):
    (run_dir / "checkpoint-10").mkdir(parents=True)
    (run_dir / "checkpoint-10" / "checkpoint.json").write_text('{"step": 10}\n')
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "reward": 0.5}\n')


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_new_run_refuses_a_directory_with_another_run(backend, tiny_model_dir, tmp_path, nothing_loads):
    _old_run(tmp_path / "run")
    config = config_from_dict(raw_config(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(ConfigError) as exc:
        BACKENDS[backend](config)
    message = str(exc.value)
    assert message.startswith(f"output.dir: {tmp_path / 'run'} already holds a run (checkpoint-10, metrics.jsonl)")
    assert "--overwrite" in message and "output.resume_from" in message
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was touched


def test_what_counts_as_another_run(tiny_model_dir, tmp_path):
    run = tmp_path / "run"

    def check(**output):
        return check_run_dir(config_from_dict(raw_config(tiny_model_dir, run, output=output)))

    assert check() is False  # no directory yet
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert check() is False  # files no run writes are no other run
    (run / ".checkpoint-5.tmp").mkdir()  # a run interrupted while checkpointing
    with pytest.raises(ConfigError, match=r"already holds a run \(.checkpoint-5.tmp\)"):
        check()
    assert check(overwrite=True) is True
    assert check(resume_from=str(run)) is False  # continuing the run that is there
    with pytest.raises(ConfigError, match="already holds a run"):
        check(resume_from=str(tmp_path / "other-run"))  # another run's checkpoint continued here would mix them
    with pytest.raises(ConfigError, match="output.overwrite: it deletes the run directory, and output.resume_from"):
        check(resume_from=str(run), overwrite=True)


def test_overwrite_never_deletes_the_inputs(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _old_run(run)
    (run / "data.jsonl").write_text("")
    raw = raw_config(tiny_model_dir, run, output={"overwrite": True})
    with pytest.raises(ConfigError, match=f"output.overwrite: {run} holds data.path"):
        check_run_dir(config_from_dict({**raw, "data": {"path": str(run / "data.jsonl")}}))
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match="holds the working directory"):
        check_run_dir(config_from_dict(raw))


def test_cli_overwrite_starts_the_run_afresh(tiny_model_dir, tmp_path, capsys):
    from prefill_kit.cli import main

    run = tmp_path / "run"
    _old_run(run)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(raw_config(tiny_model_dir, run)))
    assert main(["train", str(cfg)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", str(cfg), "--overwrite"]) == 0
    assert not (run / "checkpoint-10").exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


# ------------------------------------------------------------------------------------------ interrupts


def test_last_checkpoint_is_the_highest_whole_one(tmp_path):
    assert last_checkpoint(tmp_path / "absent") is None
    for step, marker in ((2, "checkpoint.json"), (10, "trainer_state.json"), (30, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if marker:
            (tmp_path / f"checkpoint-{step}" / marker).write_text("{}")
    (tmp_path / ".checkpoint-40.tmp").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # 10 > 2 as numbers; 30 is not whole


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_an_interrupted_train_says_where_the_last_checkpoint_is(backend, tiny_model_dir, tmp_path, monkeypatch,
                                                                capfd):
    from prefill_kit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    module = f"ctrl_c_{backend}"  # a fresh module per test: its call count starts at 0
    (tmp_path / f"{module}.py").write_text(  # Ctrl-C during step 3's rollout, after checkpoints at steps 1 and 2
        "calls = []\n"
        "def reward(completions, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        raise KeyboardInterrupt\n"
        "    return [float(i % 2) for i in range(len(completions))]\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(raw_config(tiny_model_dir, "run", rewards=[{"name": f"{module}:reward"}],
                                         train={"max_steps": 5}, output={"save_steps": 1})))
    assert main(["train", str(cfg), "--backend", backend]) == 130
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err == ("prefill-kit train: interrupted; the last checkpoint is run/checkpoint-2; "
                   "continue with --set output.resume_from=run")
