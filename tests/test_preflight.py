"""Preflight on a tiny model finds planted problems: truncation, zero reward spread, config errors."""

from __future__ import annotations

import pytest
import yaml

from prefill_kit.cli import main
from prefill_kit.config import config_from_dict
from prefill_kit.errors import ConfigError
from prefill_kit.rewards import WeightedReward
from prefill_kit.runs.preflight import prefix_tokens, run_preflight
from tests.conftest import REPO

PREFIX = "<think>\n"
pytestmark = pytest.mark.usefixtures("one_torch_thread")




def always_zero(completions, **kwargs):
    return [0.0] * len(completions)


def character_variety(completions, **kwargs):
    """Differs between random completions: a reward with spread."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


def raw_config(model_dir, **sections) -> dict:
    raw = {"model": {"path": str(model_dir)},
           "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": PREFIX},
           "rewards": [{"name": "format", "weight": 1.0}],
           "grpo": {"num_generations": 4, "max_completion_length": 16},
           "train": {"per_device_train_batch_size": 8, "seed": 0},
           "output": {"dir": "unused"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and key != "trl" else value
    return raw


def write_config(tmp_path, raw) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def test_short_completions_give_a_truncation_warning_and_fail_strict(tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path, raw_config(tiny_model_dir, grpo={"max_completion_length": 4}))
    assert main(["preflight", config, "--prompts", "4", "--strict"]) == 1
    out = capsys.readouterr().out
    verdict = out[out.index("verdict:"):]
    assert verdict.startswith("verdict: NOT READY")
    # a random model over a 400-token vocabulary almost never says EOS within 4 tokens
    assert "% of completions truncated: raise grpo.max_completion_length (now 4)" in verdict
    # the prefix, as the tiny tokenizer splits it, and samples with the prefix kept out of the completion
    assert "'<think>\\n' as the model sees it: 4 token(s) '<' 'think' '>' '\\n'" in out
    assert "«<think>\n    »" in out
    assert main(["preflight", config, "--prompts", "4"]) == 0  # without --strict it only reports


def test_a_constant_reward_gives_the_zero_spread_warning(tiny_model_dir):
    config = config_from_dict(raw_config(tiny_model_dir))
    flat = run_preflight(config, num_prompts=4, progress=False, reward_funcs=[WeightedReward("flat", always_zero, 1.0)])
    assert flat.zero_spread_share == 1.0
    messages = [p.message for p in flat.blocking]
    assert any(m.startswith("100% of prompt groups have zero reward spread") for m in messages), messages
    assert flat.rewards[0].constant == 0.0 and flat.rewards[0].mean == 0.0 and flat.rewards[0].none_share == 0.0
    assert any(p.message.startswith("flat is 0.0 on every completion") for p in flat.problems)

    varied = run_preflight(config, num_prompts=4, progress=False,
                           reward_funcs=[WeightedReward("variety", character_variety, 1.0)])
    assert varied.zero_spread_share == 0.0
    assert not any("zero reward spread" in p.message for p in varied.problems)
    assert varied.rewards[0].std > 0


def test_format_reward_that_never_fires_says_why(tiny_model_dir):
    report = run_preflight(config_from_dict(raw_config(tiny_model_dir)), num_prompts=2, progress=False)
    assert report.rewards[0].name == "format" and report.rewards[0].constant == 0.0
    assert any(p.message == "format is 0.0 on every completion: the completions do not close </think>"
               for p in report.problems)
    assert len(report.samples) == 4 and all(s["prefix"] == PREFIX for s in report.samples)
    assert report.num_rows == 32 and report.prompt_tokens[0] <= report.prompt_tokens[2]
    assert report.over_long == [] and report.context_length == 512


def test_over_long_prompts_are_reported(tiny_model_dir):
    # the tiny model's context is 512 tokens and its prompts are 112-174 tokens long
    config = config_from_dict(raw_config(tiny_model_dir, grpo={"max_completion_length": 400}))
    report = run_preflight(config, num_prompts=1, progress=False,
                           reward_funcs=[WeightedReward("variety", character_variety, 1.0)])
    over = [i for i, n in enumerate(_prompt_lengths(tiny_model_dir)) if n + 400 > 512]
    assert over and report.over_long == over
    assert any(p.severity == "blocking" and "exceed the model's context of 512 tokens" in p.message
               for p in report.problems)


def _prompt_lengths(model_dir):
    from transformers import AutoTokenizer

    from prefill_kit.config import DataSection
    from prefill_kit.prompts.training_data import load_training_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_training_data(DataSection(path=str(REPO / "examples" / "math_tiny.jsonl"), prefix=PREFIX), tokenizer)
    return [len(ids) for ids in data["prompt_ids"]]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a tokenizer or a model fails the test."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


def test_a_batch_that_does_not_divide_is_a_config_error_before_any_model(tmp_path, capsys, no_model_loading):
    raw = raw_config(tmp_path / "no-model", train={"per_device_train_batch_size": 6})
    assert main(["preflight", write_config(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert "train.per_device_train_batch_size: 6 completions is not a multiple of grpo.num_generations (4)" in err


@pytest.mark.parametrize(("backend", "trl_section", "message"), [
    ("builtin", {"use_vllm": True}, r"trl\.use_vllm: .*builtin backend does not support it"),
    ("trl", {"no_such_option": 1}, r"trl\.no_such_option: not an option of TRL's GRPOConfig"),
])
def test_options_the_backend_does_not_support_are_errors(tmp_path, no_model_loading, backend, trl_section, message):
    config = config_from_dict(raw_config(tmp_path / "no-model", trl=trl_section))
    with pytest.raises(ConfigError, match=message):
        run_preflight(config, backend=backend, progress=False)


def test_trl_backend_preflight_checks_the_prompt_ids_trl_will_make(bos_tokenizer_dir, tiny_model_dir, monkeypatch):
    # the tiny model with a tokenizer that adds BOS and a template that writes it: TRL's path must stay exact
    config = config_from_dict(raw_config(tiny_model_dir, model={"tokenizer": str(bos_tokenizer_dir)}))
    reward = [WeightedReward("variety", character_variety, 1.0)]
    report = run_preflight(config, backend="trl", num_prompts=1, progress=False, reward_funcs=reward)
    assert report.backend == "trl" and not any("TRL backend" in p.message for p in report.problems)

    from prefill_kit.runs import preflight

    monkeypatch.setattr(preflight, "exact_ids_tokenizer", lambda tokenizer: tokenizer)  # TRL's default: a second BOS
    report = run_preflight(config, backend="trl", num_prompts=1, progress=False, reward_funcs=reward)
    trl_problems = [p.message for p in report.blocking if p.message.startswith("TRL backend")]
    assert len(trl_problems) == 1 and trl_problems[0].startswith("TRL backend: row 1: TRL would feed the model")


def test_prefix_tokens_are_the_prompt_tail_that_holds_the_prefix(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("<|im_start|>assistant\n" + PREFIX, add_special_tokens=False).input_ids
    pieces = prefix_tokens(tokenizer, ids, PREFIX)
    assert "".join(pieces) == PREFIX and len(pieces) == 4
    assert prefix_tokens(tokenizer, ids, "") == []


def test_a_prefix_that_merges_with_the_header_is_reported(tiny_model_dir, tmp_path):
    # The header ends in a space and the prefix starts a word: the tiny BPE writes " answer" as one token
    # (Ġanswer), so the prompt's tokens differ from header tokens + prefix tokens at the boundary.
    template = tmp_path / "space_header.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}", encoding="utf-8")
    config = config_from_dict(raw_config(tiny_model_dir, data={"template": str(template), "prefix": "answer is"}))
    report = run_preflight(config, num_prompts=1, progress=False,
                           reward_funcs=[WeightedReward("variety", character_variety, 1.0)])
    assert len(report.boundary_merges) == report.boundary_rows_checked == 32
    assert report.prefix_tokens[0] == " answer"  # the model sees the header's space fused with the prefix
    assert any(p.message.startswith("the prefix merges with the text before it in 32 of 32 rows")
               for p in report.problems)
    clean = run_preflight(config_from_dict(raw_config(tiny_model_dir)), num_prompts=1, progress=False,
                          reward_funcs=[WeightedReward("variety", character_variety, 1.0)])
    assert clean.boundary_merges == [] and not any("merges" in p.message for p in clean.problems)


def test_truncation_does_not_block_when_a_length_reward_tells_the_completions_apart(tiny_model_dir):
    brevity = {"name": "soft_overlong", "max_completion_len": 64, "soft_punish_cache": 64, "unit": "chars"}
    config = config_from_dict(raw_config(tiny_model_dir, rewards=[brevity], grpo={"max_completion_length": 4}))
    report = run_preflight(config, num_prompts=2, progress=False)
    assert report.truncation_rate > 0.5 and report.ready, [p.message for p in report.problems]
    (warning,) = [p for p in report.problems if "of completions truncated" in p.message]
    assert warning.severity == "warning"
    assert warning.message.endswith("; not blocking: soft_overlong scores length and tells these completions "
                                    "apart, so the run can learn to finish sooner (expected early in the run)")
    # a length reward that scores every completion the same tells nothing apart: truncation blocks again
    flat = run_preflight(config, num_prompts=2, progress=False,
                         reward_funcs=[WeightedReward("soft_overlong", always_zero, 1.0)])
    assert any("of completions truncated" in p.message for p in flat.blocking)


def test_preflight_refuses_eval_data_that_is_the_training_data_as_train_does(tiny_model_dir, no_model_loading):
    """Issue 18: preflight said ready, then train stopped ("eval rows must be held out"). Both call one check."""
    raw = raw_config(tiny_model_dir)
    raw["data"]["eval_path"] = raw["data"]["path"]
    raw["train"] = {**raw.get("train", {}), "eval_steps": 1}
    with pytest.raises(ConfigError, match="data.eval_path: .* is the training data; eval rows must be held out"):
        run_preflight(config_from_dict(raw), progress=False)
