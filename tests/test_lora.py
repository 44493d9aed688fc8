"""LoRA through peft in both backends: only the adapter trains, the reference is the adapter switched off,
checkpoints hold the adapter and resume exactly, the final directory loads with PeftModel.from_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefill_kit.backends import trl as trl_backend
from prefill_kit.backends.builtin import loop as loop_module
from prefill_kit.config import config_from_dict
from prefill_kit.errors import ConfigError
from prefill_kit.grpo.policy import lora_config
from prefill_kit.rewards import WeightedReward

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def brevity(completions, completion_ids, **kwargs):
    """A reward a tiny random model can learn: end early."""
    return [1.0 - len(ids) / 32 for ids in completion_ids]


BREVITY = [WeightedReward("brevity", brevity, 1.0)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    rows = [{"question": f"what is {a} + {a * 3 % 7}?", "answer": str(a + a * 3 % 7)} for a in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(model_dir, data_file, out_dir, *, lora=None, **sections):
    raw = {
        "model": {"path": str(model_dir), "lora": {**LORA, **(lora or {})}},
        "data": {"path": str(data_file), "prefix": "<think>\n"},
        "grpo": {"num_generations": 4, "max_completion_length": 32, "beta": 0.1},
        "train": {"learning_rate": 3e-2, "per_device_train_batch_size": 16, "max_steps": 4, "seed": 0,
                  "lr_scheduler_type": "constant"},
        "output": {"dir": str(out_dir), "save_steps": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config_from_dict(raw)


def base_weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(model_dir) / "model.safetensors")


def check_final_dir(run_dir: Path, model_dir: Path) -> None:
    """The adapter loads onto the base with PeftModel.from_pretrained; base unchanged, adapter trained; merged."""
    from peft import PeftModel

    assert (run_dir / "adapter_config.json").is_file() and (run_dir / "adapter_model.safetensors").is_file()
    assert not (run_dir / "model.safetensors").exists()  # the adapter, not a copy of the base
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run_dir).eval()
    original = base_weights(model_dir)
    state = peft_model.state_dict()
    base_keys = [k for k in state if "lora_" not in k]
    for key in base_keys:  # base_model.model.<name>, with `.base_layer` where an adapter wraps the module
        name = key.removeprefix("base_model.model.").replace(".base_layer", "")
        if name in original:
            assert torch.equal(state[key], original[name]), key
    assert any(torch.count_nonzero(v) for k, v in state.items() if "lora_B" in k)  # B starts at 0: it trained

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-5)
    assert (run_dir / "merged" / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------------------------ config


def test_lora_section_maps_every_option_to_peft():
    config = config_from_dict({"model": {"path": "m", "lora": {
        "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "modules_to_save": ["lm_head"],
        "bias": "lora_only", "use_rslora": True, "use_dora": True}}, "data": {"path": "d"}, "output": {"dir": "o"}})
    c = lora_config(config.model.lora)
    assert (c.r, c.lora_alpha, c.lora_dropout, c.target_modules) == (16, 32.0, 0.05, "all-linear")
    assert (c.modules_to_save, c.bias, c.use_rslora, c.use_dora) == (["lm_head"], "lora_only", True, True)
    assert c.task_type == "CAUSAL_LM"


def test_empty_lora_section_takes_peft_defaults_and_null_turns_it_off():
    from peft import LoraConfig

    raw = {"data": {"path": "d"}, "output": {"dir": "o"}}
    c = lora_config(config_from_dict({"model": {"path": "m", "lora": {}}, **raw}).model.lora)
    peft_default = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.target_modules, c.bias) == (
        peft_default.r, peft_default.lora_alpha, peft_default.lora_dropout, peft_default.target_modules,
        peft_default.bias)
    assert config_from_dict({"model": {"path": "m", "lora": None}, **raw}).model.lora is None
    assert config_from_dict({"model": {"path": "m"}, **raw}).model.lora is None


@pytest.mark.parametrize(("lora", "message"), [
    ({"r": 0}, "model.lora.r: expected a positive integer, got 0"),
    ({"target_modules": [1]}, "model.lora.target_modules: expected a list of module names, got [1]"),
    ({"rank": 8}, "model.lora.rank: unknown key"),
    ("yes", "model.lora: expected a mapping, got 'yes'"),
])
def test_bad_lora_options_name_the_key(lora, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"model": {"path": "m", "lora": lora}, "data": {"path": "d"}, "output": {"dir": "o"}})
    assert message in str(exc.value)


def test_target_modules_that_match_nothing_is_a_config_error(tiny_model_dir, data_file, tmp_path):
    config = make_config(tiny_model_dir, data_file, tmp_path / "run", lora={"target_modules": ["no_such_proj"]})
    with pytest.raises(ConfigError, match="model.lora: peft cannot add an adapter"):
        loop_module.load_models(config)


def test_load_models_keeps_the_lora_dropout_and_loads_no_reference_copy(tiny_model_dir, data_file, tmp_path,
                                                                          monkeypatch):
    loads = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or original(*a, **k))
    config = make_config(tiny_model_dir, data_file, tmp_path / "run", lora={"dropout": 0.25})
    _, model, ref_model = loop_module.load_models(config)
    assert ref_model is None and len(loads) == 1  # beta > 0, yet one copy of the weights
    dropouts = [m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    lora_dropouts = [m.p for name, m in model.named_modules() if "lora_dropout" in name and
                     isinstance(m, torch.nn.Dropout)]
    assert lora_dropouts and all(p == 0.25 for p in lora_dropouts)
    assert len(dropouts) == len(lora_dropouts)  # any dropout of the base model is off
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


# ------------------------------------------------------------------------------------------------ built-in


def test_builtin_trains_the_adapter_against_the_base_as_reference(tiny_model_dir, data_file, tmp_path):
    config = make_config(tiny_model_dir, data_file, tmp_path / "run", lora={"merge": True})
    history = loop_module.train(config, reward_funcs=BREVITY, progress=False).history
    # step 1: the adapter is still zero, so policy == reference exactly; later the adapter moved away from
    # the base (a reference computed with the adapter on would give KL 0 at every step)
    assert history[0]["kl"] == 0.0
    assert history[-1]["kl"] > 0.0
    check_final_dir(tmp_path / "run", tiny_model_dir)


def test_builtin_resume_with_lora_is_exact(tiny_model_dir, data_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from prefill_kit.grpo import rollout

    sampled_in_training_mode = []
    original = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda model, *a, **k: sampled_in_training_mode.append(
        model.training) or original(model, *a, **k))

    # a reused rollout (checkpoint 3 falls between its two iterations), accumulation, LoRA dropout (RNG)
    sections = {"grpo": {"num_iterations": 2},
                "train": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 4,
                          "lr_scheduler_type": "linear", "warmup_steps": 1}}
    full = make_config(tiny_model_dir, data_file, tmp_path / "full", lora={"dropout": 0.1},
                       output={"save_steps": 3}, **sections)
    loop_module.train(full, reward_funcs=BREVITY, progress=False)
    assert sampled_in_training_mode == [False, False]  # LoRA's dropout acts in the training forward only
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the adapter only, not the base again

    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "adapter_model.safetensors").unlink()  # must come from the resumed run
    resumed = make_config(tiny_model_dir, data_file, tmp_path / "resumed", lora={"dropout": 0.1},
                          output={"resume_from": str(tmp_path / "resumed")}, **sections)
    result = loop_module.train(resumed, reward_funcs=BREVITY, progress=False)
    assert [row["step"] for row in result.history] == [4]
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    at_3 = load_file(checkpoint / "adapter_model.safetensors")
    assert not all(torch.equal(a[k], at_3[k]) for k in a)  # step 4 changed the adapter: the resume did work

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "step_time"} for line in lines]

    assert rows("resumed") == rows("full")


def test_resume_refuses_a_checkpoint_of_the_other_kind(tiny_model_dir, data_file, tmp_path):
    lora = make_config(tiny_model_dir, data_file, tmp_path / "lora", output={"save_steps": 1}, train={"max_steps": 2})
    loop_module.train(lora, reward_funcs=BREVITY, progress=False)
    full = lora.to_dict()
    full["model"]["lora"] = None
    full["output"]["dir"] = str(tmp_path / "full")
    loop_module.train(config_from_dict(full), reward_funcs=BREVITY, progress=False)

    full["output"]["dir"] = full["output"]["resume_from"] = str(tmp_path / "lora")  # resume runs in their own dir
    with pytest.raises(ConfigError, match="holds a LoRA adapter, and model.lora is not set"):
        loop_module.train(config_from_dict(full), reward_funcs=BREVITY, progress=False)
    resumed = make_config(tiny_model_dir, data_file, tmp_path / "full", output={"resume_from": str(tmp_path / "full")},
                          train={"max_steps": 2})
    with pytest.raises(ConfigError, match="not a checkpoint of a LoRA run"):
        loop_module.train(resumed, reward_funcs=BREVITY, progress=False)


def test_preflight_samples_with_the_lora_model(tiny_model_dir, data_file, tmp_path, monkeypatch):
    from peft import PeftModel

    from prefill_kit.runs import preflight

    seen = []
    original = preflight.sample_and_score
    monkeypatch.setattr(preflight, "sample_and_score",
                        lambda model, *a, **k: seen.append(model) or original(model, *a, **k))
    config = make_config(tiny_model_dir, data_file, tmp_path / "run")
    preflight.run_preflight(config, num_prompts=2, progress=False, reward_funcs=BREVITY)
    assert isinstance(seen[0], PeftModel) and seen[0].peft_config["default"].r == LORA["r"]


# ------------------------------------------------------------------------------------------------ TRL


def test_trl_backend_passes_the_lora_config_and_saves_the_adapter(tiny_model_dir, tmp_path):
    raw = {"model": {"path": str(tiny_model_dir), "lora": {**LORA, "merge": True}},
           "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": "<think>\n"},
           "rewards": [{"name": "tests.test_lora:brevity", "weight": 1.0}],
           "grpo": {"num_generations": 4, "max_completion_length": 32, "beta": 0.1},
           "train": {"learning_rate": 3e-2, "per_device_train_batch_size": 8, "max_steps": 3, "seed": 0,
                     "lr_scheduler_type": "constant"},
           "output": {"dir": str(tmp_path / "run"), "save_steps": 0}}
    trl_backend.train(config_from_dict(raw))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0  # TRL's reference: the adapter switched off
    check_final_dir(tmp_path / "run", tiny_model_dir)


def test_trl_checkpoints_hold_the_adapter_and_resume_exactly(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    def raw(run, **output):
        return {"model": {"path": str(tiny_model_dir), "lora": LORA},
                "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": "<think>\n"},
                "rewards": [{"name": "tests.test_lora:brevity", "weight": 1.0}],
                "grpo": {"num_generations": 4, "max_completion_length": 12, "beta": 0.1},
                "train": {"learning_rate": 3e-2, "per_device_train_batch_size": 8, "max_steps": 3, "seed": 0},
                "output": {"dir": str(tmp_path / run), "save_steps": 2, **output}}

    trl_backend.train(config_from_dict(raw("full")))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "adapter_model.safetensors").unlink()
    trl_backend.train(config_from_dict(raw("resumed", resume_from=str(tmp_path / "resumed"))))
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    at_2 = load_file(checkpoint / "adapter_model.safetensors")
    assert not all(torch.equal(a[k], at_2[k]) for k in a)  # step 3 changed the adapter: the resume did work
