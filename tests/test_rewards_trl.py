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
