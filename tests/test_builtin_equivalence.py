"""Equivalences of the built-in loop that catch whole classes of mistakes at once.

- Distributed: on the same fixed rollouts, one step in two processes (each holding half the prompts) has the
  loss and the gradients of one step in one process over the whole batch, for every loss type, with and
  without gradient accumulation. A rank using another rank's advantages or rewards, a token count not divided
  by the number of processes, a normalizer counting the wrong window or gradients not synchronised all break it.
- Step order: backward for every micro-batch, then clip, optimizer step, scheduler step, zero grad.
- Data order and checkpoints: each epoch its own order; resume picks the highest step, not the last name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from prefill_kit.backends.builtin import loop as loop_module
from prefill_kit.grpo.prompt_order import prompt_indices
from prefill_kit.rewards import WeightedReward
from prefill_kit.runs.session import find_checkpoint, last_checkpoint
from tests import fixed_rollouts
from tests.conftest import free_port
from tests.test_builtin_train import brevity, data_file, make_config  # noqa: F401 - data_file is a fixture

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (loss type, gradient accumulation steps in each of two processes, other grpo settings)
CASES = [
    ("dapo", 2, {}), ("grpo", 2, {"beta": 0.04}), ("bnpo", 2, {"scale_rewards": "batch"}), ("dr_grpo", 2, {}),
    ("cispo", 2, {}), ("sapo", 2, {}), ("luspo", 2, {}), ("dapo", 1, {}), ("grpo", 1, {}),
]


def case_name(case) -> str:
    loss_type, accumulation, extra = case
    return f"{loss_type}-ga{accumulation}" + "".join(f"-{k}={v}" for k, v in extra.items())


def case_config(model_dir, data, out_dir, case, processes: int):
    """One step; 4 completions per micro-batch (one prompt's group); the one process runs the two processes'
    micro-batches one after the other, so both see the same micro-batches in the same order."""
    loss_type, accumulation, extra = case
    return make_config(model_dir, data, out_dir,
                       grpo={"loss_type": loss_type, "num_generations": 4, "max_completion_length": 8, **extra},
                       train={"max_steps": 1, "per_device_train_batch_size": 4, "max_grad_norm": 1e9,
                              "gradient_accumulation_steps": accumulation * (2 // processes)})


DRIVER = """
import json, sys, torch
sys.path.append({repo!r})
from accelerate import PartialState
from prefill_kit.backends.builtin import loop
from prefill_kit.config import load_config
from prefill_kit.rewards import WeightedReward
from tests import fixed_rollouts

torch.set_num_threads(1)
torch.optim.AdamW = fixed_rollouts.RecordingAdamW
load_models = loop.load_models
def fixed(config):
    tokenizer, model, ref = load_models(config)
    fixed_rollouts.fix_sampling(model, tokenizer)
    return tokenizer, model, ref
loop.load_models = fixed

out = {{}}
for name, path in json.loads(sys.argv[1]).items():
    fixed_rollouts.RecordingAdamW.grads.clear()
    result = loop.train(load_config(path), progress=False,
                        reward_funcs=[WeightedReward("spread", fixed_rollouts.spread, 1.0)])
    out[name] = {{"loss": result.history[0]["loss"], "grads": fixed_rollouts.RecordingAdamW.grads[0]}}
torch.save(out, f"{{sys.argv[2]}}/rank{{PartialState().process_index}}.pt")
"""


def one_process_step(model_dir, data, out_dir, case, monkeypatch) -> tuple[float, list[torch.Tensor]]:
    load_models = loop_module.load_models

    def fixed(config):
        tokenizer, model, ref = load_models(config)
        fixed_rollouts.fix_sampling(model, tokenizer)
        return tokenizer, model, ref

    monkeypatch.setattr(loop_module, "load_models", fixed)
    monkeypatch.setattr(torch.optim, "AdamW", fixed_rollouts.RecordingAdamW)
    fixed_rollouts.RecordingAdamW.grads.clear()
    result = loop_module.train(case_config(model_dir, data, out_dir, case, processes=1), progress=False,
                               reward_funcs=[WeightedReward("spread", fixed_rollouts.spread, 1.0)])
    return result.history[0]["loss"], fixed_rollouts.RecordingAdamW.grads[0]


def test_two_processes_step_as_one_process_on_the_whole_batch(tiny_model_dir, data_file, tmp_path, monkeypatch):  # noqa: F811
    import yaml

    configs = {}
    for case in CASES:
        path = tmp_path / f"{case_name(case)}.yaml"
        path.write_text(yaml.safe_dump(case_config(tiny_model_dir, data_file, tmp_path / "two" / case_name(case), case,
                                                   processes=2).to_dict()))
        configs[case_name(case)] = str(path)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER.format(repo=str(REPO))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    # Started first: the two processes run while this one computes the one-process steps.
    launch = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "--main_process_port", free_port(), str(driver), json.dumps(configs), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        expected = {case_name(case): one_process_step(tiny_model_dir, data_file, tmp_path / "one" / case_name(case),
                                                      case, monkeypatch) for case in CASES}
        _, stderr = launch.communicate(timeout=300)
    finally:
        launch.kill()
    assert launch.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, (loss, grads) in expected.items():
        flat = torch.cat([g.flatten() for g in grads])
        assert flat.norm() > 0, name
        for rank in ranks:
            got = rank[name]
            assert got["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6), name
            assert len(got["grads"]) == len(grads), name
            got_flat = torch.cat([g.flatten() for g in got["grads"]])
            assert (got_flat - flat).norm() <= 1e-4 * flat.norm(), (name, float((got_flat - flat).norm() / flat.norm()))


def test_one_step_is_backward_then_clip_step_schedule_zero(tiny_model_dir, data_file, tmp_path, monkeypatch):  # noqa: F811
    import accelerate
    import transformers

    events = fixed_rollouts.RecordingAdamW.events
    events.clear()
    backward, clip, get_scheduler = (accelerate.Accelerator.backward, accelerate.Accelerator.clip_grad_norm_,
                                     transformers.get_scheduler)

    def recorded(name, fn):
        def call(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return call

    def scheduler(*args, **kwargs):
        made = get_scheduler(*args, **kwargs)
        made.step = recorded("scheduler.step", made.step)
        return made

    monkeypatch.setattr(accelerate.Accelerator, "backward", recorded("backward", backward))
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recorded("clip", clip))
    monkeypatch.setattr(transformers, "get_scheduler", scheduler)
    monkeypatch.setattr(torch.optim, "AdamW", fixed_rollouts.RecordingAdamW)
    config = make_config(tiny_model_dir, data_file, tmp_path / "run", grpo={"max_completion_length": 8},
                         train={"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})
    loop_module.train(config, reward_funcs=[WeightedReward("brevity", brevity, 1.0)], progress=False)
    one_step = ["backward", "backward", "clip", "optimizer.step", "scheduler.step", "zero_grad"]
    assert events == one_step * 2


def test_each_epoch_has_its_own_order():
    def epoch(e: int) -> list[int]:
        return [i for generation in range(4 * e, 4 * e + 4) for rank in range(2)
                for i in prompt_indices(generation, num_prompts=16, prompts_per_process=2, process_index=rank,
                                        num_processes=2, seed=3)]

    epochs = [epoch(e) for e in range(3)]
    assert all(sorted(e) == list(range(16)) for e in epochs)  # each a permutation of the data
    assert len({tuple(e) for e in epochs}) == 3
    assert epochs[0] == epoch(0)  # and fixed by the seed


@pytest.mark.parametrize("steps", [(9, 10), (2, 10, 100), (99, 100, 1000), (8, 9, 10, 11)])
def test_resume_picks_the_highest_step_among_mixed_digit_counts(tmp_path, steps):
    for step in steps:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "checkpoint.json").write_text(json.dumps({"step": step}))
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path, "checkpoint.json") == tmp_path / f"checkpoint-{max(steps)}"  # built-in resume
    assert find_checkpoint(tmp_path, "trainer_state.json") == tmp_path / f"checkpoint-{max(steps)}"  # TRL resume
    assert last_checkpoint(tmp_path) == tmp_path / f"checkpoint-{max(steps)}"
