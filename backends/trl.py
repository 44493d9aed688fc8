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

Like the built-in backend, it writes completions.jsonl (`prefill_kit.runs.completion_log`) and warns when truncation
or zero reward spread persists (`prefill_kit.runs.run_health`); see `CompletionRecorder` for how. Metrics go to
metrics.jsonl and to prefill-kit's trackers (`prefill_kit.runs.trackers`) under the built-in backend's names, so
TRL's own `report_to` stays "none". Evaluation is TRL's (`eval_dataset`, `eval_steps`, `num_generations_eval`);
its logged means are per batch, so `eval/reward` and `eval/rewards/<name>` are computed here over every eval
completion, from what the rewards returned.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from prefill_kit.config import TrainingConfig
from prefill_kit.data.io import keep_rows_through_step
from prefill_kit.errors import ConfigError, PrefillKitError
from prefill_kit.prompts.prompt_tokens import exact_ids_tokenizer
from prefill_kit.runs.trackers import run_name

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
    "cispo_clip_ratio": "cispo_clip_ratio",
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
        # Without a GPU, say so: that is what makes the processes `accelerate launch` starts join over gloo
        # instead of each training alone.
        "use_cpu": not _has_accelerator(),
        "disable_tqdm": False,
        "remove_unused_columns": False,
    }


def _eval_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """TRL's evaluation settings: every `eval_steps` steps (and after the last, see `_final_eval_callback`)."""
    g, t = config.grpo, config.train
    if not config.data.eval_path:
        return {"eval_strategy": "no"}
    prompts_per_batch = max(1, t.per_device_train_batch_size // g.eval_num_generations)
    return {"eval_strategy": "steps", "eval_steps": t.eval_steps, "num_generations_eval": g.eval_num_generations,
            "per_device_eval_batch_size": prompts_per_batch * g.eval_num_generations}


def _eval_temperature(config: TrainingConfig) -> float | None:
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
               "per_device_eval_batch_size": "train.per_device_train_batch_size"}
    for key in config.trl:
        if key not in known:
            raise ConfigError(f"trl.{key}: not an option of TRL's GRPOConfig")
        if key in instead:
            raise ConfigError(f"trl.{key}: prefill-kit sets this from its own config; set {instead[key]} instead")
        if key in mapped or key in owned:
            raise ConfigError(f"trl.{key}: prefill-kit sets this from its own config; set it there instead")
    if config.trl.get("use_vllm") and _eval_temperature(config) is not None:
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


# A column added to the training data so that each completion can be traced to its data row: TRL passes every
# dataset column to the reward functions, and so to `CompletionRecorder`.
PROMPT_INDEX_COLUMN = "_prefill_kit_prompt_index"


class CompletionRecorder:
    """What TRL gave the reward functions on this process in the latest rollout, and what each returned.

    How the TRL backend gets per-completion rows for completions.jsonl, and why this way: TRL 1.16 keeps its
    own per-completion record in `GRPOTrainer._logs`, a private structure (renamed before and gathered
    without prompt rows or token ids), and returns from `_generate_and_score_completions` only tensors
    (ids, masks, advantages), no texts or per-reward scores. The reward-function call is TRL's public,
    stable contract: each process calls every reward once per rollout with its own completions, their
    `completion_ids` (cut after EOS) and every dataset column, in the order of the batch. So each reward
    is wrapped to record that call and its scores; the one private hook left is reading `advantages` from
    `_generate_and_score_completions`'s result, the dict `compute_loss` consumes (same order as the batch).
    """

    def __init__(self) -> None:
        self.call: dict[str, Any] = {}
        self.scores: dict[str, list] = {}

    def wrap(self, name: str, fn):
        """`fn` under the name TRL shows (its config name), recording its call and scores."""

        @functools.wraps(fn)
        def reward(*args, **kwargs):
            values = list(fn(*args, **kwargs))
            self.call, self.scores[name] = kwargs, values
            return values

        reward.__name__ = reward.__qualname__ = name
        return reward

    def eval_records(self) -> list[tuple[int, list[float | None]]]:
        """(prompt index, each reward's score) for every completion of the latest call."""
        names = list(self.scores)
        return [(int(index), [_score(self.scores[name][j]) for name in names])
                for j, index in enumerate(self.call[PROMPT_INDEX_COLUMN])]

    def rows(self, *, step: int, advantages: list[float], weights: list[float], eos_ids: set[int]) -> list[dict]:
        """The completions.jsonl rows of the latest rollout on this process."""
        from prefill_kit.runs.completion_log import completion_rows, weighted_total

        call, names = self.call, list(self.scores)
        ids = [list(i) for i in call["completion_ids"]]
        n = len(ids)
        return completion_rows(
            step=step, prompt_indices=call[PROMPT_INDEX_COLUMN], prefixes=call.get("prefix") or [""] * n,
            completions=call["completions"], completion_lengths=[len(i) for i in ids],
            truncated=[not eos_ids.intersection(i) for i in ids], rewards=self.scores,
            reward=[weighted_total([self.scores[k][j] for k in names], weights) for j in range(n)],
            advantages=advantages, questions=call.get("question"), solutions=call.get("solution"))


def _score(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def one_record_set(records: list[tuple[int, list[float | None]]], *, num_prompts: int,
                   num_generations: int) -> list[list[float | None]]:
    """The scores of exactly `num_generations` completions of every eval prompt, from all processes' records.

    Under several processes accelerate pads the last eval batches with repeats of the first prompts (so every
    process gets a full batch); those extra completions are dropped, so each prompt counts equally. A
    prompt with fewer completions than asked is an error, never a silently smaller eval set.
    """
    seen = [0] * num_prompts
    kept = []
    for index, scores in records:
        if seen[index] < num_generations:
            seen[index] += 1
            kept.append(scores)
    short = [i for i, n in enumerate(seen) if n < num_generations]
    if short:
        raise PrefillKitError(f"evaluation: eval row {short[0]} got {seen[short[0]]} completions, not "
                              f"{num_generations} ({len(short)} rows short): TRL did not evaluate every row")
    return kept


def _trainer_class():
    """TRL's GRPOTrainer, plus completions.jsonl and run-health warnings after each rollout."""
    from accelerate.utils import gather_object
    from transformers.trainer_callback import ProgressCallback
    from trl import GRPOTrainer

    from prefill_kit.backends.common import eval_metrics
    from prefill_kit.runs.completion_log import gather_rows
    from prefill_kit.runs.run_health import zero_spread_share

    class _BarOnly(ProgressCallback):
        """TRL's progress bar without its `on_log`, which prints every step's metrics dict on stdout; they are in
        metrics.jsonl, and run-health warnings print above the bar."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    class PrefillKitGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, recorder: CompletionRecorder, completion_log, health, weights: list[float],
                     eos_ids: list[int], user_tokenizer, eval_temperature: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            if self.pop_callback(ProgressCallback) is not None:  # the bar, without a printed dict per step
                self.add_callback(_BarOnly)
            self.recorder, self.completion_log, self.health = recorder, completion_log, health
            self.user_tokenizer = user_tokenizer
            self.weights, self.eos_ids = weights, set(eos_ids)
            self.eval_temperature = eval_temperature
            self.eval_records: list[tuple[int, list[float | None]]] = []  # (prompt index, scores) per completion
            # optimizer steps one rollout serves: TRL generates every steps_per_generation * num_iterations
            # micro-steps, and an optimizer step takes gradient_accumulation_steps of them
            self.steps_per_rollout = max(1, self.args.steps_per_generation * self.num_iterations
                                         // self.args.gradient_accumulation_steps)

        def _save(self, output_dir: str | None = None, state_dict=None):
            # Checkpoints and the final model get the user's tokenizer, not the exact-ids copy TRL tokenizes
            # with: loaded for evaluation or serving, that copy would give prompts without BOS.
            super()._save(output_dir, state_dict=state_dict)
            self.user_tokenizer.save_pretrained(output_dir or self.args.output_dir)

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self._after_rollout(output["advantages"].tolist())
            else:
                self.eval_records += self.recorder.eval_records()
            return output

        def evaluation_loop(self, *args, **kwargs):
            """TRL's evaluation, sampled at `eval_temperature`, plus the whole-set means (`eval/...` keys)."""
            self.eval_records = []
            with self._eval_sampling():
                output = super().evaluation_loop(*args, **kwargs)
            records = gather_object(self.eval_records) if self.accelerator.num_processes > 1 else self.eval_records
            scores = one_record_set(records, num_prompts=len(self.eval_dataset),
                                    num_generations=self.num_generations_eval)
            output.metrics.update(eval_metrics(scores, list(self.recorder.scores), self.weights))
            return output

        @contextlib.contextmanager
        def _eval_sampling(self):
            """TRL samples eval completions with the training temperature; swap in `eval_temperature`.

            Only transformers' sampling reads these two (`trl_extra_kwargs` refuses a differing eval
            temperature with vLLM, where neither exists).
            """
            if self.eval_temperature is None:
                yield
                return
            saved = self.generation_config, self.generation_kwargs
            self.generation_config = copy.deepcopy(self.generation_config)
            self.generation_config.temperature = self.eval_temperature
            self.generation_kwargs = {**self.generation_kwargs, "temperature": self.eval_temperature}
            try:
                yield
            finally:
                self.generation_config, self.generation_kwargs = saved

        def _after_rollout(self, advantages: list[float]) -> None:
            step = self.state.global_step + 1  # the optimizer step this rollout is for
            # every process, every rollout: a prompt's group may span processes, so the zero-spread share
            # needs all rows (TRL gathers its prompts and completions each rollout the same way)
            rows = gather_rows(self.recorder.rows(step=step, advantages=advantages, weights=self.weights,
                                                  eos_ids=self.eos_ids))
            if not self.accelerator.is_main_process:
                return
            truncated = sum(r["truncated"] for r in rows) / len(rows)
            zero_spread = zero_spread_share([r["reward"] for r in rows], self.num_generations)
            self.health.update(step, truncated, zero_spread, steps=self.steps_per_rollout)
            if self.completion_log.due(step, span=self.steps_per_rollout):
                self.completion_log.write(rows)

    return PrefillKitGRPOTrainer


def _resume_step(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text(encoding="utf-8")).get("global_step", 0)) if state.is_file() else 0


def _metrics_callback(path: Path, reward_names: list[str], trackers: list, tracker_config: dict[str, Any]):
    from transformers import TrainerCallback

    from prefill_kit.runs.trackers import tracker_values

    class MetricsWriter(TrainerCallback):
        """Appends TRL's logs to metrics.jsonl under the names the built-in backend uses, and sends the same
        rows to the trackers (main process only)."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                for tracker in trackers:
                    tracker.start()
                    tracker.store_init_configuration(tracker_config)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row: dict[str, Any] = {"step": state.global_step}
            if "loss" in logs:
                for trl_key, name in METRIC_NAMES.items():
                    value = logs.get(trl_key)
                    row[name] = float(value) if value is not None else None  # e.g. no KL is computed when beta == 0
                for name in reward_names:
                    value = logs.get(f"rewards/{name}/mean")
                    row[f"rewards/{name}"] = float(value) if value is not None else None
            elif "eval/reward" in logs:  # added by PrefillKitGRPOTrainer.evaluation_loop
                row.update((k, v) for k, v in logs.items() if k.startswith("eval/"))
            else:
                return
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            for tracker in trackers:
                tracker.log(tracker_values(row), step=row["step"])

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                for tracker in trackers:
                    tracker.finish()

    return MetricsWriter()


def _final_eval_callback():
    """Evaluate after the last step too, as the built-in backend does (Trainer evaluates only every eval_steps)."""
    from transformers import TrainerCallback

    class FinalEval(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.eval_strategy != "no" and state.global_step >= state.max_steps:
                control.should_evaluate = True

    return FinalEval()


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
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from prefill_kit.backends.common import (
        eos_token_ids,
        final_model_dir,
        load_eval_data,
        load_training_data,
        write_run_config,
    )
    from prefill_kit.runs.completion_log import CompletionLog, check_reward_names
    from prefill_kit.runs.run_checks import check_paths, resolve_rewards
    from prefill_kit.runs.run_dir import claim_run_dir
    from prefill_kit.runs.run_health import HealthMonitor
    from prefill_kit.runs.trackers import check_trackers, flat_config, make_trackers

    # ---- fail on what can be checked before any model is loaded
    trl_extra_kwargs(config)
    check_trackers(config.output.report_to)  # a missing tracker package
    check_paths(config)
    rewards = resolve_rewards(config.rewards)
    check_reward_names([r.name for r in rewards])
    args = GRPOConfig(**grpo_config_kwargs(config), **trl_extra_kwargs(config),
                      reward_weights=[r.weight for r in rewards])
    claim_run_dir(config, is_main=args.process_index == 0)
    PartialState().wait_for_everyone()  # the old run is gone before any process writes

    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_training_data(config.data, tokenizer)
    exact = exact_ids_tokenizer(tokenizer)
    check_prompt_ids(exact, dataset)
    dataset = dataset.add_column(PROMPT_INDEX_COLUMN, list(range(len(dataset))))
    eval_dataset = load_eval_data(config.data, tokenizer)
    if eval_dataset is not None:
        check_prompt_ids(exact, eval_dataset)
        eval_dataset = eval_dataset.add_column(PROMPT_INDEX_COLUMN, list(range(len(eval_dataset))))

    dtype = config.model.dtype if config.model.dtype == "auto" else getattr(torch, config.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype)
    out_dir = Path(config.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.process_index == 0:
        write_run_config(out_dir, config)
    metrics_path = out_dir / "metrics.jsonl"
    resume = _resume_checkpoint(config.output.resume_from)
    keep_rows_through_step(metrics_path, _resume_step(resume))
    trackers = make_trackers(config.output, resume_step=_resume_step(resume))
    recorder = CompletionRecorder()
    o = config.output
    completion_log = CompletionLog(out_dir, every=o.log_completions_steps, max_rows=o.log_completions_max,
                                   reward_names=[r.name for r in rewards], resume_step=_resume_step(resume),
                                   is_main=args.process_index == 0)
    lora = config.model.lora
    peft_config = None
    if lora is not None:  # TRL wraps the model; with beta > 0 its reference is the model with the adapter off
        from prefill_kit.backends.lora import lora_config

        peft_config = lora_config(lora)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=exact,
        peft_config=peft_config,
        reward_funcs=[recorder.wrap(r.name, r.fn) for r in rewards],
        callbacks=[_metrics_callback(metrics_path, [r.name for r in rewards], trackers,
                                     flat_config(config.to_dict())),
                   _final_eval_callback()],
        eval_temperature=_eval_temperature(config),
        recorder=recorder, completion_log=completion_log,
        health=HealthMonitor(window=o.logging_steps, max_completion_length=config.grpo.max_completion_length,
                             reward_names=[r.name for r in rewards]),
        weights=[r.weight for r in rewards], eos_ids=eos_token_ids(tokenizer, model), user_tokenizer=tokenizer)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # TRL 1.16 toggles checkpointing around generation under the names transformers 5.24 deprecated
        # (13 FutureWarnings in a short run); the renamed methods do the same. Only those messages are hidden.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.modeling_utils",
                                message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable|"
                                        r"gradient_checkpointing_disable)` is deprecated")
        result = trainer.train(resume_from_checkpoint=resume)
    is_main = trainer.accelerator.is_main_process
    with final_model_dir(out_dir, is_main=is_main) as staging:
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(staging))  # every process: DeepSpeed/FSDP gather the weights here (and the tokenizer)
        if is_main and lora is not None and lora.merge:
            from prefill_kit.backends.lora import MERGED_DIR, save_merged

            save_merged(trainer.accelerator.unwrap_model(trainer.model), tokenizer, staging / MERGED_DIR)
        trainer.accelerator.wait_for_everyone()
    return {"backend": "trl", "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "seconds": time.perf_counter() - start, "output_dir": str(out_dir), "metrics": str(metrics_path)}
