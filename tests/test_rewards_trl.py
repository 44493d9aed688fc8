"""TRL's GRPOTrainer accepts our rewards as they are: one step on a tiny local model."""

from __future__ import annotations

import datasets


def test_grpo_trainer_runs_one_step_with_our_rewards(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from prefill_kit.rewards import parse_reward_spec

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = datasets.Dataset.from_list([{"prompt": "What is 2+2?<think>\n", "prefix": "<think>\n", "solution": "4"},
                                       {"prompt": "What is 3+3?<think>\n", "prefix": "<think>\n", "solution": "6"}])
    spec = parse_reward_spec("format,think_format,accuracy:2.0,tag_count,repetition_penalty")
    spec += parse_reward_spec([{"name": "cosine_length", "max_len": 8}, {"name": "soft_overlong",
                               "max_completion_len": 8, "soft_punish_cache": 4}])
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                      reward_weights=[w.weight for w in spec])
    trainer = GRPOTrainer(model=model, reward_funcs=[w.fn for w in spec], args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    for name in ("format_reward", "accuracy_reward", "cosine_length_reward", "soft_overlong_reward"):
        assert f"rewards/{name}/mean" in logged, sorted(logged)


def test_vanilla_grpo_trainer_gets_one_bos_with_the_exact_ids_tokenizer(tmp_path, bos_template, one_torch_thread):
    """README recipe: `render_dataset` output + `prefill_kit.exact_ids_tokenizer` as `processing_class`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import prefill_kit
    from prefill_kit.rewards import format_reward
    from prefill_kit.tiny_model import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", chat_template=bos_template, add_bos=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(2)]
    data = prefill_kit.render_dataset(datasets.Dataset.from_list(rows), tokenizer=tokenizer, prefix="<think>\n")
    assert all(ids.count(tokenizer.bos_token_id) == 1 for ids in data["prompt_ids"])

    def first_forward_ids(processing_class) -> list[list[int]]:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        seen = []
        model.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["input_ids"].tolist())
                                        if not seen else None, with_kwargs=True)
        args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                          num_generations=2, max_completion_length=4, report_to=[], use_cpu=True,
                          save_strategy="no")
        GRPOTrainer(model=model, reward_funcs=[format_reward], args=args, train_dataset=data,
                    processing_class=processing_class).train()
        return seen[0]

    bos = tokenizer.bos_token_id
    assert all(row.count(bos) == 1 for row in first_forward_ids(prefill_kit.exact_ids_tokenizer(tokenizer)))
    assert all(row.count(bos) == 2 for row in first_forward_ids(tokenizer))  # the trap the recipe avoids
