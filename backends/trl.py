"""TRL backend (`prefill_kit.backends.trl`): the same config, run by TRL's `GRPOTrainer`.

TRL 1.16 has three traps for prefilled prompts, each closed here:

- It tokenizes plain-text prompts with the tokenizer's default `add_special_tokens=True`, so a
  rendered Llama-style prompt that already starts with BOS reaches the model as `[BOS, BOS, ...]`.
  The trainer gets a copy of the tokenizer whose post-processor adds nothing, and before training
  the ids TRL will make are checked against the rendered `prompt_ids` (`exact_ids_tokenizer`).
- Conversational prompts would make TRL apply the chat template (again). The prompts given to it are
  the rendered strings, prefix included, so they are used exactly once, as rendered.
- It passes only the generated text to rewards. Every dataset column reaches them as a kwarg, so
  prefill-kit's rewards see `prefix` and score `prefix + completion`.

The loss mask is TRL's completion mask: generated tokens only. The prefix is part of the prompt ids,
never of `completion_ids`.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path
from typing import Any

from prefill_kit.config import TrainingConfig
from prefill_kit.errors import ConfigError, PrefillKitError

# TRL log key -> the metric name both backends write to metrics.jsonl.
METRIC_NAMES = {
    "loss": "loss",
    "reward": "reward",
    "reward_std": "reward_std",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "truncated_ratio",
    "frac_reward_zero_std": "zero_std_ratio",
    "kl": "kl",
    "clip_ratio/region_mean": "clip_ratio",
    "clip_ratio/low_mean": "clip_ratio/low_mean",
    "clip_ratio/high_mean": "clip_ratio/high_mean",
    "learning_rate": "learning_rate",
    "step_time": "step_time",
    "grad_norm": "grad_norm",
}


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
        "epsilon": g.epsilon,
        "epsilon_high": g.epsilon_high if g.epsilon_high is not None else g.epsilon,
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
        **({"gradient_checkpointing": True} if t.gradient_checkpointing else {}),
        "shuffle_dataset": config.data.shuffle,
        "logging_steps": o.logging_steps,
        "save_strategy": "steps" if o.save_steps else "no",
        "save_steps": o.save_steps or 500,
        "report_to": "none",
        # Without a GPU, say so: that is what makes the processes `accelerate launch` starts join over gloo
        # instead of each training alone.
        "use_cpu": not _has_accelerator(),
        "disable_tqdm": False,
        "remove_unused_columns": False,
    }


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
    for key in config.trl:
        if key not in known:
            raise ConfigError(f"trl.{key}: not an option of TRL's GRPOConfig")
        if key in mapped or key in owned:
            raise ConfigError(f"trl.{key}: prefill-kit sets this from its own config; set it there instead")
    return dict(config.trl)


def exact_ids_tokenizer(tokenizer):
    """A copy of `tokenizer` whose plain call adds no special tokens: `tok(text)` == the rendered ids.

    TRL calls `processing_class(text=prompts)` with the default `add_special_tokens=True`. Emptying the
    fast tokenizer's post-processor (the step that inserts BOS/EOS) makes that call exact, without
    patching TRL. The original tokenizer is what gets saved with the model.
    """
    from tokenizers import processors

    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model.tokenizer: the TRL backend needs a fast tokenizer (tokenizer.json) so that "
                          "prompts are not given a second BOS")
    exact = copy.deepcopy(tokenizer)
    exact.backend_tokenizer.post_processor = processors.Sequence([])
    return exact


def check_prompt_ids(tokenizer, dataset, *, rows: int = 16) -> None:
    """Tokenize a sample of prompts the way TRL will; they must equal the rendered `prompt_ids`."""
    sample = dataset.select(range(min(rows, len(dataset))))
    made = tokenizer(text=list(sample["prompt"]))["input_ids"]
    for i, (ids, expected) in enumerate(zip(made, sample["prompt_ids"], strict=True)):
        if list(ids) != list(expected):
            raise PrefillKitError(f"row {i}: TRL would feed the model {len(ids)} prompt tokens {list(ids)[:8]}..., "
                                  f"not the {len(expected)} rendered ones {list(expected)[:8]}...")


def _named(name: str, fn):
    """TRL names a reward by its function's `__name__`; a parametrised reward gets its config name."""

    @functools.wraps(fn)
    def reward(*args, **kwargs):
        return fn(*args, **kwargs)

    reward.__name__ = reward.__qualname__ = name
    return reward


def _metrics_callback(path: Path, reward_names: list[str]):
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        """Appends TRL's logs to metrics.jsonl under the names the built-in backend uses."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            row: dict[str, Any] = {"step": state.global_step}
            for trl_key, name in METRIC_NAMES.items():
                value = logs.get(trl_key)
                row[name] = float(value) if value is not None else None  # e.g. no KL is computed when beta == 0
            for name in reward_names:
                value = logs.get(f"rewards/{name}/mean")
                row[f"rewards/{name}"] = float(value) if value is not None else None
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return MetricsWriter()


def _resume_checkpoint(resume_from: str | None) -> str | None:
    if not resume_from:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    path = Path(resume_from)
    if not path.is_dir():
        raise ConfigError(f"output.resume_from: {resume_from}: no such directory")
    if (path / "trainer_state.json").is_file():
        return str(path)
    last = get_last_checkpoint(str(path))
    if last is None:
        raise ConfigError(f"output.resume_from: {resume_from}: holds no TRL checkpoint-N directory")
    return last


def train(config: TrainingConfig) -> dict[str, Any]:
    """Run GRPO with TRL's `GRPOTrainer`; returns a summary of the run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from prefill_kit.backends.builtin.data import load_training_data
    from prefill_kit.rewards import parse_reward_spec

    trl_extra_kwargs(config)  # fail on a bad `trl:` option before any model is loaded
    rewards = parse_reward_spec(config.rewards)
    if not rewards:
        raise ConfigError("rewards: at least one reward is needed")
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_training_data(config.data, tokenizer)
    exact = exact_ids_tokenizer(tokenizer)
    check_prompt_ids(exact, dataset)

    dtype = config.model.dtype if config.model.dtype == "auto" else getattr(torch, config.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype)
    args = GRPOConfig(**grpo_config_kwargs(config), **trl_extra_kwargs(config),
                      reward_weights=[r.weight for r in rewards])
    out_dir = Path(config.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    resume = _resume_checkpoint(config.output.resume_from)
    if resume is None:
        metrics_path.unlink(missing_ok=True)
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=exact,
        reward_funcs=[_named(r.name, r.fn) for r in rewards],
        callbacks=[_metrics_callback(metrics_path, [r.name for r in rewards])])
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out_dir))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(out_dir)
    return {"backend": "trl", "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "seconds": time.perf_counter() - start, "output_dir": str(out_dir), "metrics": str(metrics_path)}
