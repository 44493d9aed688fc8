"""The built-in backend end to end on a tiny model: the mask, the reward call, learning, resume, two processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from prefill_kit.backends.builtin import completion_logps, completion_mask_from_eos, generate, grpo_loss
from prefill_kit.backends.builtin import loop as loop_module
from prefill_kit.config import DataSection, config_from_dict
from prefill_kit.prompts.training_data import load_training_data
from prefill_kit.rewards import WeightedReward
from tests.conftest import free_port

PREFIX = "<think>\n"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    rows = [{"question": f"what is {a} + {a * 3 % 7}?" + " then add one" * (a % 3), "answer": str(a + a * 3 % 7)}
            for a in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path




def brevity(completions, completion_ids, **kwargs):
    """A reward a tiny random model can learn: end early."""
    return [1.0 - len(ids) / 32 for ids in completion_ids]


def make_config(model_dir, data_file, out_dir, **sections):
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_file), "prefix": PREFIX},
        "grpo": {"num_generations": 4, "max_completion_length": 32},
        "train": {"learning_rate": 1e-2, "per_device_train_batch_size": 16, "max_steps": 30, "seed": 0,
                  "lr_scheduler_type": "constant"},
        "output": {"dir": str(out_dir), "save_steps": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)


# --------------------------------------------------------------------------------------------------- mask


class FixedSampler(torch.nn.Module):
    """A model whose samples the test chooses: `generate` appends the given completion rows."""

    def __init__(self, completions: list[list[int]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.completions = torch.tensor(completions)

    def generate(self, input_ids, attention_mask, generation_config):
        return torch.cat([input_ids, self.completions[:input_ids.size(0)]], dim=1)


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_generate_masks_up_to_the_first_eos_and_keeps_groups_together(mask_truncated):
    eos, pad = 2, 0
    sampler = FixedSampler([[3, 9, eos, 4], [3, 4, 4, 4], [eos, 4, 4, 4], [9, 9, 9, eos]])
    batch = generate(sampler, [[5, 6], [7]], num_generations=2, generation_config=None, eos_token_ids=[eos],
                     pad_token_id=pad, mask_truncated_completions=mask_truncated)
    assert batch.prompt_ids.tolist() == [[5, 6], [5, 6], [pad, 7], [pad, 7]]  # a prompt's rows are adjacent
    assert batch.prompt_mask.tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]
    truncated_row = [0, 0, 0, 0] if mask_truncated else [1, 1, 1, 1]
    assert batch.completion_mask.tolist() == [[1, 1, 1, 0], truncated_row, [1, 0, 0, 0], [1, 1, 1, 1]]
    assert batch.completion_ids.tolist() == [[3, 9, eos, pad], [3, 4, 4, 4], [eos, pad, pad, pad], [9, 9, 9, eos]]
    assert batch.is_truncated.tolist() == [False, True, False, False]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_prompt_sharding_is_disjoint_and_covers_each_epoch(world):
    from prefill_kit.grpo.prompt_order import prompt_indices

    n, per = 12, 2
    steps_per_epoch = n // (per * world)
    for epoch in range(2):
        seen = []
        for generation in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            shards = [prompt_indices(generation, num_prompts=n, prompts_per_process=per, process_index=rank,
                                     num_processes=world, seed=3) for rank in range(world)]
            assert all(len(s) == per for s in shards)
            step = [i for s in shards for i in s]
            assert len(set(step)) == len(step)  # no two ranks share a prompt in a step
            seen += step
        assert sorted(seen) == list(range(n))  # every prompt once per epoch


def test_prefix_is_in_the_prompt_and_only_completion_positions_get_gradient(tiny, data_file):
    from transformers import GenerationConfig

    tokenizer, model = tiny
    prefix_ids = tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
    assert len(prefix_ids) == 4  # the tiny tokenizer splits the prefix: a boundary bug would show

    dataset = load_training_data(DataSection(path=str(data_file), prefix=PREFIX), tokenizer)
    rows = dataset[[0, 2]]  # prompts of different lengths: the shorter one is left-padded
    assert len(rows["prompt_ids"][0]) != len(rows["prompt_ids"][1])
    for prompt, ids in zip(rows["prompt"], rows["prompt_ids"], strict=True):
        assert prompt.endswith(PREFIX) and ids[-4:] == prefix_ids
        assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(do_sample=True, max_new_tokens=6, eos_token_id=[eos], pad_token_id=tokenizer.pad_token_id)
    batch = generate(model, rows["prompt_ids"], num_generations=2, generation_config=config, eos_token_ids=[eos],
                     pad_token_id=tokenizer.pad_token_id)
    assert batch.prompt_ids[:, -4:].tolist() == [prefix_ids] * 4  # every row conditions on the whole prefix
    # Row 0 ends after two tokens: what follows its EOS is padding and must not be trained.
    batch.completion_ids[0, 1] = eos
    batch.completion_ids[0, 2:] = tokenizer.pad_token_id
    batch.completion_mask = completion_mask_from_eos(batch.completion_ids, [eos])
    assert batch.completion_mask[0].tolist() == [1, 1, 0, 0, 0, 0]

    # The final hidden state at position i feeds only the logits at i: its gradient is the logits' gradient
    # pulled back through the LM head, zero exactly where the logits' gradient is zero.
    captured = {}
    handle = model.model.norm.register_forward_hook(lambda m, i, out: captured.update(h=out) or out.retain_grad())
    try:
        logps = completion_logps(model, batch, temperature=1.0)
        loss, _ = grpo_loss(logps, None, None, torch.tensor([1.0, -1.0, 0.5, -0.5]), batch.completion_mask)
        loss.backward()
    finally:
        handle.remove()
    grad = captured["h"].grad.abs().sum(-1)  # (B, P+C)
    P = batch.prompt_ids.size(1)
    expected = torch.zeros_like(grad, dtype=torch.bool)
    for row in range(4):
        for j in range(batch.completion_ids.size(1)):
            if batch.completion_mask[row, j]:
                expected[row, P - 1 + j] = True  # position P-1+j predicts completion token j
    assert torch.all(grad[~expected] == 0)  # prompt, prefix, left padding, after EOS: exactly zero
    assert torch.all(grad[expected] > 0)


# --------------------------------------------------------------------------------------------- the rollout


def test_rewards_get_trls_call_and_none_rows_get_no_advantage(tiny_model_dir, data_file, tmp_path):
    calls, records = [], []

    def recorder(completions, **kwargs):
        calls.append({"completions": completions, **kwargs})
        return [None if i % 4 == 0 else float(i % 4) for i in range(len(completions))]  # spread within each group

    config = make_config(tiny_model_dir, data_file, tmp_path / "run", grpo={"max_completion_length": 8},
                         train={"max_steps": 1})
    result = loop_module.train(config, reward_funcs=[WeightedReward("recorder", recorder, 1.0)], progress=False,
                               on_rollout=records.append)
    call, record = calls[0], records[0]
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    assert {"prompts", "completions", "completion_ids", "prefix", "solution", "prompt_ids"} <= set(call)
    assert all(p == PREFIX for p in call["prefix"]) and all(p.endswith(PREFIX) for p in call["prompts"])
    assert len(call["completions"]) == 16 and call["prompts"][0] == call["prompts"][3]  # 4 prompts x 4
    for text, ids in zip(call["completions"], call["completion_ids"], strict=True):
        assert 1 <= len(ids) <= 8
        assert tokenizer.eos_token_id not in ids[:-1]  # cut at the first EOS, which is the last id if any
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert record.rewards["recorder"][0] is None and record.advantages[0] == 0.0
    assert [a for i, a in enumerate(record.advantages) if i % 4 == 0] == [0.0] * 4
    assert any(a != 0.0 for a in record.advantages)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert {"step", "loss", "reward", "reward_std", "rewards/recorder", "completion_length", "kl", "clip_ratio",
            "learning_rate", "step_time"} <= set(row)
    assert row["step"] == 1 and result.global_step == 1
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "tokenizer.json").exists()


# ------------------------------------------------------------------------------------------------ learning


def test_it_learns_and_a_flipped_advantage_does_not(tiny_model_dir, data_file, tmp_path, monkeypatch):
    config = make_config(tiny_model_dir, data_file, tmp_path / "good")
    good = loop_module.train(config, reward_funcs=[WeightedReward("brevity", brevity, 1.0)], progress=False).history
    rewards = [row["reward"] for row in good]
    assert rewards[0] < 0.3
    assert sum(rewards[-3:]) / 3 > 0.8

    original = loop_module.compute_advantages
    monkeypatch.setattr(loop_module, "compute_advantages", lambda *a, **k: -original(*a, **k))
    config = make_config(tiny_model_dir, data_file, tmp_path / "flipped", train={"max_steps": 15})
    flipped = loop_module.train(config, reward_funcs=[WeightedReward("brevity", brevity, 1.0)], progress=False).history
    assert max(row["reward"] for row in flipped[-5:]) < 0.3


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "dapo"])
def test_accumulation_gives_the_loss_and_gradient_of_one_big_batch(tiny_model_dir, data_file, tmp_path, loss_type):
    """16 completions in one micro-batch, or two of 8: the same rollout, so the same loss and gradient norm.

    Catches a normalizer that counts the wrong window (dapo/cispo span it; the others divide by it).
    """
    histories = []
    for batch, accumulation in ((16, 1), (8, 2)):
        config = make_config(tiny_model_dir, data_file, tmp_path / f"{batch}", grpo={"loss_type": loss_type},
                             train={"max_steps": 1, "per_device_train_batch_size": batch,
                                    "gradient_accumulation_steps": accumulation, "max_grad_norm": 1e9})
        histories.append(loop_module.train(config, reward_funcs=[WeightedReward("brevity", brevity, 1.0)],
                                           progress=False).history[0])
    one, two = histories
    assert one["reward"] == two["reward"]  # the same rollout
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert one["grad_norm"] > 0


def test_sequence_level_with_a_token_sum_loss_warns_as_trl_does(tiny_model_dir, data_file, tmp_path, caplog):
    config = make_config(tiny_model_dir, data_file, tmp_path / "run", grpo={"importance_sampling_level": "sequence"},
                         train={"max_steps": 1})
    with caplog.at_level("WARNING", logger="prefill_kit.backends.builtin.loop"):
        row = loop_module.train(config, reward_funcs=[WeightedReward("brevity", brevity, 1.0)],
                                progress=False).history[0]
    assert "weights each sequence by its completion length" in caplog.text
    assert row["clip_ratio"] is not None and row["cispo_clip_ratio"] is None


# -------------------------------------------------------------------------------------------------- resume


def test_resume_gives_the_same_weights(tiny_model_dir, data_file, tmp_path):
    import shutil

    from safetensors.torch import load_file

    # accumulation, a reused rollout (checkpoint 3 falls between its two iterations), a reference model
    sections = {"grpo": {"num_iterations": 2, "beta": 0.04, "max_completion_length": 12},
                "train": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 4,
                          "lr_scheduler_type": "linear", "warmup_steps": 1}}
    full = make_config(tiny_model_dir, data_file, tmp_path / "full", output={"save_steps": 3}, **sections)
    loop_module.train(full, reward_funcs=[WeightedReward("brevity", brevity, 1.0)], progress=False)
    assert (tmp_path / "full" / "checkpoint-3" / "checkpoint.json").exists()
    assert not (tmp_path / "full" / "checkpoint-4").exists()  # the final model is saved, not a checkpoint

    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "model.safetensors").unlink()  # the final model must come from the resumed run
    resumed = make_config(tiny_model_dir, data_file, tmp_path / "resumed",
                          output={"resume_from": str(tmp_path / "resumed")}, **sections)
    result = loop_module.train(resumed, reward_funcs=[WeightedReward("brevity", brevity, 1.0)], progress=False)
    assert [row["step"] for row in result.history] == [4]

    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "step_time"} for line in lines]

    assert rows("resumed") == rows("full")  # steps 1-3 kept, step 4 rewritten identically
    assert rows("full")[-1]["kl"] is not None


# ------------------------------------------------------------------------------------------- two processes

DRIVER = """
import hashlib, json, sys, torch
from accelerate import PartialState
from prefill_kit.backends.builtin import loop, train
from prefill_kit.config import load_config
from prefill_kit.rewards import WeightedReward

def parity(completions, completion_ids, **kwargs):  # random spread within groups: every step updates
    return [float(ids[0] % 2) for ids in completion_ids]

def digest(model):
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()

models, initial, prompts = [], [], []
load_models = loop.load_models
def keep_model(config):  # this process's policy, to compare the weights the ranks end with
    tokenizer, model, ref = load_models(config)
    models.append(model)
    initial.append(digest(model))
    return tokenizer, model, ref
loop.load_models = keep_model

torch.set_num_threads(1)
result = train(load_config(sys.argv[1]), reward_funcs=[WeightedReward("parity", parity, 1.0)], progress=False,
               on_rollout=lambda record: prompts.append(sorted(set(record.prompt_indices))))
rank = PartialState().process_index
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump({"loss": [r["loss"] for r in result.history], "reward": [r["reward"] for r in result.history],
               "prompts": prompts, "initial": initial[0], "final": digest(models[0])}, f)
"""


def test_two_cpu_processes(tiny_model_dir, data_file, tmp_path):
    import yaml

    out = tmp_path / "run"
    config = make_config(tiny_model_dir, data_file, out, grpo={"num_generations": 2, "max_completion_length": 8},
                         train={"per_device_train_batch_size": 4, "max_steps": 2}, output={"save_steps": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    # accelerate 1.15's `--cpu` launcher starts several processes only through mpirun; `--multi_gpu` starts
    # them with torchrun, and on a machine without GPUs the loop joins them over gloo on CPU.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", free_port(),
                           str(tmp_path / "driver.py"), str(tmp_path / "cfg.yaml"), str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("loss", "reward"):  # both ranks log the same, global, values
        assert ranks[0][key] == ranks[1][key] and len(ranks[0][key]) == 2
    for mine, theirs in zip(ranks[0]["prompts"], ranks[1]["prompts"], strict=True):
        assert mine and theirs and not set(mine) & set(theirs)  # each rank trains on its own prompts
    assert ranks[0]["initial"] == ranks[1]["initial"]
    assert ranks[0]["final"] == ranks[1]["final"] != ranks[0]["initial"]  # gradients synchronised: same weights
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # written once, by the main process
    assert [m["loss"] for m in metrics] == ranks[0]["loss"]
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-")))
    assert checkpoints == ["checkpoint-1"]
    assert sorted(p.name for p in (out / "checkpoint-1").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # each process's RNG, in the one checkpoint


# ------------------------------------------------------------------------------------------------- the CLI

ISSUE_EXAMPLE = """\
backend: builtin
model: {{path: {model}, dtype: float32}}
data: {{path: {data}, prefix: "<think>\\n"}}
rewards:
  - {{name: format, weight: 1.0}}
  - {{name: accuracy, weight: 2.0}}
  - {{name: "my_rewards:brevity", weight: 0.5}}
grpo: {{num_generations: 4, max_completion_length: 32, temperature: 1.0, top_p: 1.0, beta: 0.0, loss_type: dapo,
       epsilon: 0.2, epsilon_high: null, scale_rewards: group, num_iterations: 1, mask_truncated_completions: false}}
train: {{learning_rate: 0.01, per_device_train_batch_size: 16, gradient_accumulation_steps: 1, max_steps: 30,
        warmup_steps: 0, max_grad_norm: 1.0, seed: 0, bf16: false, gradient_checkpointing: false}}
output: {{dir: runs/tiny, logging_steps: 1, save_steps: 1000, resume_from: null}}
"""


def test_cli_runs_the_issue_example(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    from prefill_kit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completions, completion_ids, **kwargs):\n"
        "    return [1.0 - len(ids) / 32 for ids in completion_ids]\n")
    (tmp_path / "cfg.yaml").write_text(ISSUE_EXAMPLE.format(model=tiny_model_dir, data=data_file))
    assert main(["train", "cfg.yaml", "--backend", "builtin", "--set", "train.max_steps=2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert len([k for k in rows[0] if k.startswith("rewards/")]) == 3
    assert rows[0]["reward"] > 0  # brevity scores every completion; format and accuracy add 0 here
    assert "builtin backend: 2 steps" in capsys.readouterr().err
    assert (tmp_path / "runs/tiny/config.yaml").exists() and (tmp_path / "runs/tiny/model.safetensors").exists()


def test_cli_reports_config_errors(tmp_path, capsys):
    from prefill_kit.cli import main

    (tmp_path / "cfg.yaml").write_text("model: {path: m}\ndata: {path: d}\noutput: {dir: o}\n")
    assert main(["train", str(tmp_path / "cfg.yaml"), "--set", "grpo.num_generations=x"]) == 2
    assert "grpo.num_generations: expected an integer >= 2, got 'x'" in capsys.readouterr().err


def test_bf16_and_gradient_checkpointing_run(tiny_model_dir, data_file, tmp_path):
    config = make_config(tiny_model_dir, data_file, tmp_path / "run",
                         grpo={"max_completion_length": 8, "loss_type": "bnpo", "top_k": 20, "top_p": 0.9},
                         train={"max_steps": 1, "bf16": True, "gradient_checkpointing": True})
    spread = WeightedReward("spread", lambda completions, **kw: [float(i % 4) for i in range(len(completions))], 1.0)
    row = loop_module.train(config, reward_funcs=[spread], progress=False).history[0]
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0


def test_masked_truncation_takes_truncated_completions_out_of_the_loss(tiny):
    from transformers import GenerationConfig

    tokenizer, model = tiny
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt = tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" + PREFIX,
                       add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    config = GenerationConfig(do_sample=True, max_new_tokens=3, eos_token_id=[eos], pad_token_id=pad)
    batch = generate(model, [prompt], num_generations=8, generation_config=config, eos_token_ids=[eos],
                     pad_token_id=pad, mask_truncated_completions=True)
    assert batch.is_truncated.any()  # 3 tokens rarely reach EOS
    for ids, mask, truncated in zip(batch.completion_ids, batch.completion_mask, batch.is_truncated, strict=True):
        assert truncated == (eos not in ids.tolist())
        assert mask.tolist() == ([0] * 3 if truncated else completion_mask_from_eos(ids[None], [eos])[0].tolist())
