"""Both backends from one config: same metrics, one BOS, the prefix in the prompt and in the rewards' view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefill_kit.backends import builtin, trl
from prefill_kit.config import config_from_dict
from prefill_kit.errors import ConfigError
from prefill_kit.rewards import format_reward
from tests import recording_reward
from tests.conftest import REPO, free_port

BACKENDS = {"builtin": builtin.train, "trl": trl.train}
PREFIX = "<think>\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, bos_template):
    """A tiny model whose tokenizer adds BOS by default and whose template writes `{{ bos_token }}` too."""
    from prefill_kit.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("bos_model"), chat_template=bos_template, add_bos=True)


def tiny_raw(model_dir, out_dir, **sections) -> dict:
    raw = {"model": {"path": str(model_dir)},
           "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": PREFIX},
           "rewards": [{"name": "format", "weight": 1.0}, {"name": "tests.recording_reward:record", "weight": 0.5}],
           "grpo": {"num_generations": 2, "max_completion_length": 8},
           "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 2, "seed": 0},
           "output": {"dir": str(out_dir), "save_steps": 0}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and key != "trl" else value
    return raw


@pytest.fixture
def record_prompt_ids(monkeypatch):
    """Every input_ids tensor the policy's forward sees (generation included), captured by a pre-hook."""
    seen: list[torch.Tensor] = []
    original = AutoModelForCausalLM.from_pretrained

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:  # a whole prompt, not one decode step
            seen.append(ids.detach().clone())

    def loading(*args, **kwargs):
        model = original(*args, **kwargs)
        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loading)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_feeds_one_bos_and_gives_rewards_the_prefix(backend, bos_model_dir, tmp_path, record_prompt_ids):
    recording_reward.CALLS.clear()
    config = config_from_dict(tiny_raw(bos_model_dir, tmp_path / backend, backend=backend))
    BACKENDS[backend](config)

    tokenizer = AutoTokenizer.from_pretrained(bos_model_dir)
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    assert record_prompt_ids, "the model was never called"
    for batch in record_prompt_ids:
        for row in batch.tolist():
            tokens = [t for t in row if t != pad]  # prompts are left-padded
            assert tokens[0] == bos and tokens[1] != bos, f"{backend}: prompt starts {tokens[:4]}"

    prefix_ids = tokenizer(PREFIX, add_special_tokens=False).input_ids
    assert len(prefix_ids) > 1  # the prefix spans several tokens with this tokenizer
    calls = recording_reward.CALLS
    assert calls, "the reward was never called"
    for call in calls:
        assert call["prefix"] == [PREFIX] * len(call["completions"])
        assert all(p.endswith(PREFIX) for p in call["prompts"])
        assert all(list(ids[: len(prefix_ids)]) != prefix_ids for ids in call["completion_ids"])
        assert all(not c.startswith(PREFIX) for c in call["completions"])
    # What a completion that closes the prefilled thought scores, given the prefix the backend passed:
    closing = "2 and 2 make 4.</think>\n<answer>4</answer>"
    assert format_reward([closing], prefix=calls[0]["prefix"][:1]) == [1.0]
    assert format_reward([closing]) == [0.0]  # without the prefix it would look malformed


def test_both_backends_write_the_same_metric_keys(tiny_model_dir, tmp_path):
    keys = {}
    for backend, train in BACKENDS.items():
        out = tmp_path / backend
        train(config_from_dict(tiny_raw(tiny_model_dir, out, backend=backend)))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
        assert not (out / ".final-model.tmp").exists()  # saved in a staging dir, moved in when complete
        keys[backend] = set(rows[0])
    assert keys["builtin"] == keys["trl"]
    assert {"step", "loss", "reward", "reward_std", "rewards/format", "rewards/tests.recording_reward:record",
            "completion_length", "kl", "clip_ratio", "learning_rate", "step_time"} <= keys["trl"]


def test_builtin_rejects_a_trl_only_option(tiny_model_dir, tmp_path):
    config = config_from_dict(tiny_raw(tiny_model_dir, tmp_path, trl={"use_vllm": True}))
    with pytest.raises(ConfigError, match=r"trl\.use_vllm: .*builtin backend does not support it"):
        builtin.train(config)


@pytest.mark.parametrize(("extra", "message"), [
    ({"no_such_option": 1}, r"trl\.no_such_option: not an option of TRL's GRPOConfig"),
    ({"learning_rate": 0.5}, r"trl\.learning_rate: prefill-kit sets this from its own config"),
])
def test_trl_rejects_bad_extra_options_before_loading(extra, message, tmp_path):
    config = config_from_dict(tiny_raw(tmp_path / "no-model", tmp_path, backend="trl", trl=extra))
    with pytest.raises(ConfigError, match=message):
        trl.train(config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerate_launch_cpu_with_two_processes(backend, tiny_model_dir, tmp_path):
    raw = tiny_raw(tiny_model_dir, tmp_path / "run", rewards=[{"name": "format"}])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", free_port(),
                           "-m", "prefill_kit", "train", str(tmp_path / "cfg.yaml"), "--backend", backend],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer: the two processes trained together
    assert f"{backend} backend: 2 steps" in proc.stderr
    assert "started one process of 2; relaunching" in proc.stderr


def test_launcher_num_processes_reads_the_accelerate_command_line():
    from prefill_kit.cli.train import launcher_num_processes

    for args, expected in ((["launch", "--num_processes", "3", "--cpu"], 3), (["launch", "--num_processes=4"], 4),
                           (["launch", "--num_processes", "1"], None), (["run", "--num_processes", "2"], None),
                           (["accelerate.commands.launch", "--num_processes", "2"], 2)):
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *args])
        try:
            deadline = time.monotonic() + 10
            while not Path(f"/proc/{sleeper.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)  # the new process's command line appears once it has started
            assert launcher_num_processes(sleeper.pid) == expected, args
        finally:
            sleeper.kill()
            sleeper.wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_and_final_model_hold_the_users_tokenizer(backend, bos_model_dir, tmp_path):
    """TRL tokenizes with an exact-ids copy that adds no BOS; what is saved must encode like the original."""
    out = tmp_path / "run"
    BACKENDS[backend](config_from_dict(tiny_raw(bos_model_dir, out, backend=backend, output={"save_steps": 1},
                                                 rewards=[{"name": "format"}])))
    original = AutoTokenizer.from_pretrained(bos_model_dir)
    expected = original("What is 2+2?").input_ids
    assert expected[0] == original.bos_token_id
    saved = [out / "checkpoint-1", out]
    assert all((d / "tokenizer.json").is_file() for d in saved)
    for directory in saved:
        assert AutoTokenizer.from_pretrained(directory)("What is 2+2?").input_ids == expected, directory
