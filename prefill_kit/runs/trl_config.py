"""The config under TRL's names: the `GRPOConfig` arguments, the checked `trl:` section, and TRL's prompt ids.

Pure (TRL is imported only to read `GRPOConfig`'s fields), so that preflight checks a config for the TRL
backend exactly as that backend will build it, without importing the backend.
"""

from __future__ import annotations

from typing import Any

from prefill_kit.config import TrainingConfig
from prefill_kit.errors import ConfigError, PrefillKitError
from prefill_kit.runs.trackers import run_name


def grpo_config_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """The config, under TRL's `GRPOConfig` names. Pure, so the mapping is testable on its own."""
    g, t, o = config.grpo, config.train, config.output
    return {
        "output_dir": o.dir,
        "num_generations": g.num_generations,
        "max_completion_length": g.max_completion_length,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "top_k": g.top_k,
        "beta": g.beta,
        "loss_type": g.loss_type,
        "importance_sampling_level": g.importance_sampling_level,
        "epsilon": g.epsilon,
        "epsilon_high": g.epsilon_high if g.epsilon_high is not None else g.epsilon,
        "sapo_temperature_pos": g.sapo_temperature_pos,
        "sapo_temperature_neg": g.sapo_temperature_neg,
        "scale_rewards": g.scale_rewards,
        "num_iterations": g.num_iterations,
        "mask_truncated_completions": g.mask_truncated_completions,
        "learning_rate": t.learning_rate,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "max_steps": t.max_steps,
        "warmup_steps": t.warmup_steps,
        "lr_scheduler_type": t.lr_scheduler_type,
        "weight_decay": t.weight_decay,
        "adam_beta1": t.adam_beta1,
        "adam_beta2": t.adam_beta2,
        "adam_epsilon": t.adam_epsilon,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "data_seed": t.seed,
        "bf16": t.bf16,
        "activation_checkpointing": t.gradient_checkpointing,  # transformers 5.24's name; the old one warns
        "shuffle_dataset": config.data.shuffle,
        "logging_steps": o.logging_steps,
        "save_strategy": "steps" if o.save_steps else "no",
        "save_steps": o.save_steps or 500,
        "run_name": run_name(o),
        # prefill-kit's trackers get the metrics rows; transformers' callbacks would log them renamed (module doc)
        "report_to": "none",
        **_eval_kwargs(config),
        **_multi_turn_kwargs(config),
        # Without a GPU, say so: that is what makes the processes `accelerate launch` starts join over gloo
        # instead of each training alone.
        "use_cpu": not _has_accelerator(),
        "disable_tqdm": False,
        "remove_unused_columns": False,
    }


def _eval_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """TRL's evaluation settings: every `eval_steps` steps (and after the last, see `FinalEval` in backends/trl.py)."""
    g, t = config.grpo, config.train
    if not config.data.eval_path:
        return {"eval_strategy": "no"}
    prompts_per_batch = max(1, t.per_device_train_batch_size // g.eval_num_generations)
    return {"eval_strategy": "steps", "eval_steps": t.eval_steps, "num_generations_eval": g.eval_num_generations,
            "per_device_eval_batch_size": prompts_per_batch * g.eval_num_generations}


def _multi_turn_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """`rollout.max_turns` under TRL's name: `max_tool_calling_iterations` counts the turns after the first (TRL
    samples one turn, then up to that many more after tool results), so it is `max_turns - 1`. The TRL backend runs
    prefill-kit's own rollout loop (backends/trl.py), which enforces `max_turns`; the value is mapped so that TRL's
    saved arguments say the same. Options TRL's one-sample-per-completion layout cannot carry are refused here."""
    r = config.rollout
    if not r.multi_turn:
        return {}
    if r.thinking_history == "split":
        raise ConfigError("rollout.thinking_history: split makes several samples of one rollout, which TRL's "
                          "GRPOTrainer (one sample per completion) cannot train; use keep, or run with "
                          "--backend builtin")
    return {"max_tool_calling_iterations": r.max_turns - 1}


def eval_temperature(config: TrainingConfig) -> float | None:
    """The temperature eval sampling must switch to, or None when it is the training one."""
    g = config.grpo
    return g.eval_temperature if g.eval_temperature not in (None, g.temperature) else None


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


def trl_extra_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """The `trl:` section, checked: each key must be a `GRPOConfig` field that prefill-kit does not set itself."""
    import dataclasses

    from trl import GRPOConfig

    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    mapped = grpo_config_kwargs(config)
    owned = {"reward_weights", "model_init_kwargs"}  # set from `rewards:` and `model:`
    instead = {"report_to": "output.report_to", "run_name": "output.run_name", "eval_steps": "train.eval_steps",
               "eval_strategy": "train.eval_steps", "num_generations_eval": "grpo.eval_num_generations",
               "per_device_eval_batch_size": "train.per_device_train_batch_size",
               "max_tool_calling_iterations": "rollout.max_turns"}
    for key in config.trl:
        if key not in known:
            raise ConfigError(f"trl.{key}: not an option of TRL's GRPOConfig")
        if key in instead:
            raise ConfigError(f"trl.{key}: prefill-kit sets this from its own config; set {instead[key]} instead")
        if key in mapped or key in owned:
            raise ConfigError(f"trl.{key}: prefill-kit sets this from its own config; set it there instead")
    if config.trl.get("use_vllm") and eval_temperature(config) is not None:
        raise ConfigError("grpo.eval_temperature: with trl.use_vllm the TRL backend samples eval completions at "
                          "grpo.temperature; remove grpo.eval_temperature or set it equal")
    return dict(config.trl)


def check_prompt_ids(tokenizer, dataset, *, rows: int = 16) -> None:
    """Tokenize a sample of prompts the way TRL will; they must equal the rendered `prompt_ids`."""
    sample = dataset.select(range(min(rows, len(dataset))))
    made = tokenizer(text=list(sample["prompt"]))["input_ids"]
    for i, (ids, expected) in enumerate(zip(made, sample["prompt_ids"], strict=True)):
        if list(ids) != list(expected):
            raise PrefillKitError(f"row {i + 1}: TRL would feed the model {len(ids)} prompt tokens {list(ids)[:8]}..., "
                                  f"not the {len(expected)} rendered ones {list(expected)[:8]}...")
