"""The training config: the issue's example loads as written, bad values are named by key, --set overrides."""

from __future__ import annotations

import pytest

from prefill_kit.config import apply_overrides, config_from_dict, load_config
from prefill_kit.errors import ConfigError

ISSUE_EXAMPLE = """\
backend: builtin            # the TRL issue adds: trl
model: {path: ./my-model, dtype: float32}
data: {path: data.jsonl, prefix: "<think>\\n"}   # raw data is rendered first (render options allowed here)
rewards:
  - {name: format, weight: 1.0}
  - {name: accuracy, weight: 2.0}
  - {name: "my_rewards:brevity", weight: 0.5}   # module:function on the Python path
grpo: {num_generations: 4, max_completion_length: 32, temperature: 1.0, top_p: 1.0, beta: 0.0, loss_type: dapo,
       epsilon: 0.2, epsilon_high: null, scale_rewards: group, num_iterations: 1, mask_truncated_completions: false}
train: {learning_rate: 0.01, per_device_train_batch_size: 16, gradient_accumulation_steps: 1, max_steps: 30,
        warmup_steps: 0, max_grad_norm: 1.0, seed: 0, bf16: false, gradient_checkpointing: false}
output: {dir: runs/tiny, logging_steps: 1, save_steps: 1000, resume_from: null}
"""

MINIMAL = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "output": {"dir": "o"}}


def _with(**sections):
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def test_issue_example_loads(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE)
    config = load_config(path)
    assert config.backend == "builtin"
    assert config.data.prefix == "<think>\n"
    assert config.grpo.num_generations == 4 and config.grpo.epsilon_high is None
    assert config.train.learning_rate == 0.01 and isinstance(config.train.max_grad_norm, float)
    assert config.rewards[2] == {"name": "my_rewards:brevity", "weight": 0.5}
    assert config.prompts_per_device_step == 4  # 16 completions / 4 generations


def test_defaults_follow_trl():
    config = config_from_dict(MINIMAL)
    assert (config.grpo.loss_type, config.grpo.scale_rewards, config.grpo.epsilon, config.grpo.beta) == (
        "dapo", "group", 0.2, 0.0)
    assert config.train.per_device_train_batch_size % config.grpo.num_generations == 0


@pytest.mark.parametrize(("sections", "message"), [
    ({"grpo": {"num_generations": "x"}}, "grpo.num_generations: expected an integer >= 2, got 'x'"),
    ({"grpo": {"num_generations": 1}}, "grpo.num_generations: expected an integer >= 2, got 1"),
    ({"grpo": {"max_completion_length": 0}}, "grpo.max_completion_length: expected a positive integer, got 0"),
    ({"grpo": {"loss_type": "ppo"}},
     "grpo.loss_type: expected one of dapo, grpo, bnpo, dr_grpo, cispo, sapo, luspo, got 'ppo'"),
    ({"grpo": {"top_p": 1.5}}, "grpo.top_p: expected a number in (0.0, 1.0], got 1.5"),
    ({"grpo": {"temperature": 0}}, "grpo.temperature: expected a number > 0.0, got 0"),
    ({"grpo": {"epsilon_high": "wide"}}, "grpo.epsilon_high: expected a number >= 0.0, got 'wide'"),
    ({"grpo": {"num_generatoins": 4}}, "grpo.num_generatoins: unknown key"),
    ({"train": {"bf16": "yes"}}, "train.bf16: expected true or false, got 'yes'"),
    ({"train": {"max_steps": True}}, "train.max_steps: expected a positive integer, got True"),
    ({"train": {"per_device_train_batch_size": 6}},
     "train.per_device_train_batch_size: 6 completions is not a multiple of grpo.num_generations (8)"),
    ({"backend": "vllm"}, "backend: expected one of builtin, trl, got 'vllm'"),
    ({"rewards": [{"weight": 2.0}]}, "rewards[0].name: expected a reward name, got null"),
    ({"rewards": [{"name": "format", "weight": "heavy"}]}, "rewards[0].weight: expected a number, got 'heavy'"),
    ({"grpo": 4}, "grpo: expected a mapping, got 4"),
])
def test_bad_values_name_the_key(sections, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(_with(**sections))
    assert message in str(exc.value)


def test_required_keys():
    with pytest.raises(ConfigError, match=r"^model: required"):
        config_from_dict({"data": {"path": "d"}, "output": {"dir": "o"}})
    with pytest.raises(ConfigError, match=r"^output.dir: required"):
        config_from_dict({**MINIMAL, "output": {}})


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE)
    config = load_config(path, ["grpo.beta=0.04", "train.bf16=true", "grpo.epsilon_high=null",
                                "data.prefix=", "output.resume_from=runs/tiny", "rewards=format,accuracy:2"])
    assert config.grpo.beta == 0.04 and config.train.bf16 is True and config.grpo.epsilon_high is None
    assert config.data.prefix == "" and config.output.resume_from == "runs/tiny"
    assert config.rewards == "format,accuracy:2"


def test_override_errors_name_file_and_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE)
    with pytest.raises(ConfigError, match=r"--set 'grpo.num_generations=x' \(over .*cfg.yaml\): "
                                          r"grpo.num_generations: expected an integer >= 2, got 'x'"):
        load_config(path, ["grpo.num_generations=x"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["grpo.beta"])
    with pytest.raises(ConfigError, match="backend is not a section"):
        apply_overrides({"backend": "builtin"}, ["backend.x=1"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {path: m}\ngrpo: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize(("spelling", "value"), [
    ("1e-5", 1e-5), ("1E-5", 1e-5), ("+1e-5", 1e-5), ("1.0e-5", 1e-5), ("5.e-3", 5e-3), (".5e-2", 5e-3),
    ("3e2", 300.0), ("0.00001", 1e-5), (".5", 0.5), ("1", 1.0),
])
def test_every_float_spelling_is_a_number_in_the_file_and_in_set(tmp_path, spelling, value):
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("learning_rate: 0.01", f"learning_rate: {spelling}"))
    assert load_config(path).train.learning_rate == value
    assert load_config(path, [f"train.learning_rate={spelling}"]).train.learning_rate == value
    assert load_config(path, [f"grpo.beta={spelling}"]).grpo.beta == value


def test_text_that_only_resembles_a_float_stays_text(tmp_path):
    config = config_from_dict(apply_overrides(MINIMAL, ["data.prefix=1e-5x", "model.path=e5", "output.dir=1e"]))
    assert (config.data.prefix, config.model.path, config.output.dir) == ("1e-5x", "e5", "1e")
    with pytest.raises(ConfigError, match=r"train.max_steps: expected a positive integer, got 100000.0"):
        config_from_dict(apply_overrides(MINIMAL, ["train.max_steps=1e5"]))


def test_the_schema_docstring_lists_every_key_under_its_section():
    """The docstring of prefill_kit/config.py is the schema users read: no key may be missing from it."""
    import dataclasses
    import re
    import typing

    from prefill_kit import config as config_module

    doc = config_module.__doc__
    start = doc.index("```yaml")
    schema = doc[start:doc.index("```", start + 3)].splitlines()[1:]
    documented: dict[str, set[str]] = {"": set()}
    section = ""
    for line in schema:
        if top := re.match(r"([a-z_]+):", line):
            section = top.group(1)
            documented[""].add(section)
            documented[section] = set()
        elif nested := re.match(r"  ([a-z_0-9]+):", line):
            documented[section].add(nested.group(1))
    hints = typing.get_type_hints(config_module.TrainingConfig)
    assert documented[""] == set(hints)
    for name, tp in hints.items():
        if dataclasses.is_dataclass(tp):
            assert documented[name] == {f.name for f in dataclasses.fields(tp)}, name
