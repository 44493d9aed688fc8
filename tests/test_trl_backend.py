"""TRL backend: the config maps to GRPOConfig, and TRL's own prompt tokenization gives the rendered ids."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoTokenizer

from prefill_kit.config import config_from_dict
from prefill_kit.errors import PrefillKitError
from prefill_kit.prompts.render import render_prompt
from prefill_kit.prompts.tokens import exact_ids_tokenizer
from prefill_kit.runs.trl_config import check_prompt_ids, grpo_config_kwargs
from prefill_kit.templates import load_template

USER = [{"role": "user", "content": "What is 2+2?"}]


def tiny_config(**sections):
    raw = {"model": {"path": "m"}, "data": {"path": "d.jsonl", "prefix": "<think>\n"}, "output": {"dir": "out"},
           "rewards": [{"name": "format", "weight": 1.0}],
           "grpo": {"num_generations": 4, "max_completion_length": 16, "epsilon": 0.2},
           "train": {"per_device_train_batch_size": 8, "max_steps": 3, "seed": 7}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config_from_dict(raw)


def test_config_maps_to_grpo_config_names():
    from trl import GRPOConfig

    kwargs = grpo_config_kwargs(tiny_config(output={"save_steps": 0}))
    args = GRPOConfig(**kwargs)
    assert (args.num_generations, args.max_completion_length, args.per_device_train_batch_size) == (4, 16, 8)
    assert args.epsilon_high == 0.2  # null means "same as epsilon", as in the built-in backend
    assert args.seed == 7 and args.max_steps == 3 and args.report_to == []
    assert args.save_strategy == "no"


def test_loss_family_options_map_to_grpo_config():
    from trl import GRPOConfig

    config = tiny_config(grpo={"loss_type": "sapo", "importance_sampling_level": "sequence", "epsilon_high": 5.0,
                               "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.3})
    args = GRPOConfig(**grpo_config_kwargs(config))
    assert (args.loss_type, args.importance_sampling_level, args.epsilon_high) == ("sapo", "sequence", 5.0)
    assert (args.sapo_temperature_pos, args.sapo_temperature_neg) == (0.7, 1.3)
    import dataclasses

    defaults = grpo_config_kwargs(tiny_config())  # prefill-kit's defaults are TRL's
    trl_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name in ("loss_type", "importance_sampling_level", "sapo_temperature_pos", "sapo_temperature_neg"):
        assert defaults[name] == trl_defaults[name], name


@pytest.mark.parametrize("loss_type", ["cispo", "luspo"])
def test_every_loss_type_is_a_grpo_config_loss_type(loss_type):
    from trl import GRPOConfig

    assert GRPOConfig(**grpo_config_kwargs(tiny_config(grpo={"loss_type": loss_type}))).loss_type == loss_type


def test_trl_tokenization_of_a_rendered_prompt_has_one_bos(bos_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    prompt = render_prompt(USER, load_template(bos_tokenizer_dir), "<think>\n").prompt
    rendered_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    exact = exact_ids_tokenizer(tokenizer)
    # exactly TRL 1.16's call for plain-text prompts: processing_class(text=prompts)["input_ids"]
    assert exact(text=[prompt])["input_ids"][0] == rendered_ids
    assert rendered_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer(text=[prompt])["input_ids"][0][:2] == [tokenizer.bos_token_id] * 2  # the trap it avoids
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id  # the original is left as it was


def test_check_prompt_ids_refuses_a_tokenizer_that_changes_the_ids(bos_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    prompt = render_prompt(USER, load_template(bos_tokenizer_dir)).prompt
    data = datasets.Dataset.from_list([{"prompt": prompt,
                                        "prompt_ids": tokenizer(prompt, add_special_tokens=False).input_ids}])
    check_prompt_ids(exact_ids_tokenizer(tokenizer), data)
    with pytest.raises(PrefillKitError, match="row 1: TRL would feed the model"):
        check_prompt_ids(tokenizer, data)
