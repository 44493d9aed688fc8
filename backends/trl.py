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
import time
import warnings
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from prefill_kit.config import TrainingConfig
from prefill_kit.errors import PrefillKitError
from prefill_kit.grpo.policy import load_model, load_tokenizer, lora_config
from prefill_kit.grpo.rollout import eos_token_ids
from prefill_kit.grpo.scoring import weighted_totals
from prefill_kit.prompts.tokens import exact_ids_tokenizer
from prefill_kit.prompts.training_data import load_eval_data, load_training_data
from prefill_kit.rewards.registry import none_if_nan
from prefill_kit.runs.checks import check_paths, run_rewards
from prefill_kit.runs.completion_log import check_reward_names, completion_rows, eval_metrics, gather_rows
from prefill_kit.runs.run_health import zero_spread_share
from prefill_kit.runs.session import RunSession, TrainResult
from prefill_kit.runs.trackers import check_trackers
from prefill_kit.runs.trl_config import check_prompt_ids, eval_temperature, grpo_config_kwargs, trl_extra_kwargs

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
        return [(int(index), [none_if_nan(self.scores[name][j]) for name in names])
                for j, index in enumerate(self.call[PROMPT_INDEX_COLUMN])]

    def rows(self, *, step: int, advantages: list[float], weights: list[float], eos_ids: set[int]) -> list[dict]:
        """The completions.jsonl rows of the latest rollout on this process."""
        call, names = self.call, list(self.scores)
        ids = [list(i) for i in call["completion_ids"]]
        n = len(ids)
        return completion_rows(
            step=step, prompt_indices=call[PROMPT_INDEX_COLUMN], prefixes=call.get("prefix") or [""] * n,
            completions=call["completions"], completion_lengths=[len(i) for i in ids],
            truncated=[not eos_ids.intersection(i) for i in ids], rewards=self.scores,
            reward=weighted_totals([[self.scores[k][j] for k in names] for j in range(n)], weights),
            advantages=advantages, questions=call.get("question"), solutions=call.get("solution"))


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


class _BarOnly(ProgressCallback):
    """TRL's progress bar without its `on_log`, which prints every step's metrics dict on stdout; they are in
    metrics.jsonl, and run-health warnings print above the bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class PrefillKitGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer, plus completions.jsonl and run-health warnings after each rollout."""

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


class MetricsWriter(TrainerCallback):
    """Hands TRL's logs to the session (metrics.jsonl and the trackers) under the names the built-in backend
    uses (main process only)."""

    def __init__(self, session: RunSession, reward_names: list[str]):
        self.session, self.reward_names = session, reward_names

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step}
        if "loss" in logs:
            for trl_key, name in METRIC_NAMES.items():
                value = logs.get(trl_key)
                row[name] = float(value) if value is not None else None  # e.g. no KL is computed when beta == 0
            for name in self.reward_names:
                value = logs.get(f"rewards/{name}/mean")
                row[f"rewards/{name}"] = float(value) if value is not None else None
        elif "eval/reward" in logs:  # added by PrefillKitGRPOTrainer.evaluation_loop
            row.update((k, v) for k, v in logs.items() if k.startswith("eval/"))
        else:
            return
        self.session.log(row)


class FinalEval(TrainerCallback):
    """Evaluate after the last step too, as the built-in backend does (Trainer evaluates only every eval_steps)."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy != "no" and state.global_step >= state.max_steps:
            control.should_evaluate = True


def train(config: TrainingConfig):
    """Run GRPO with TRL's `GRPOTrainer`; returns a `TrainResult`, as the built-in backend does."""
    # ---- fail on what can be checked before any model is loaded
    trl_extra_kwargs(config)
    check_trackers(config.output.report_to)  # a missing tracker package
    check_paths(config)
    rewards = run_rewards(config)
    check_reward_names([r.name for r in rewards])
    args = GRPOConfig(**grpo_config_kwargs(config), **trl_extra_kwargs(config),
                      reward_weights=[r.weight for r in rewards])
    session = RunSession(config, is_main=args.process_index == 0, checkpoint_marker="trainer_state.json")
    session.claim()
    PartialState().wait_for_everyone()  # the old run is gone before any process writes

    tokenizer = load_tokenizer(config)
    dataset = load_training_data(config.data, tokenizer)
    exact = exact_ids_tokenizer(tokenizer)
    check_prompt_ids(exact, dataset)
    dataset = dataset.add_column(PROMPT_INDEX_COLUMN, list(range(len(dataset))))
    eval_dataset = load_eval_data(config.data, tokenizer)
    if eval_dataset is not None:
        check_prompt_ids(exact, eval_dataset)
        eval_dataset = eval_dataset.add_column(PROMPT_INDEX_COLUMN, list(range(len(eval_dataset))))

    model = load_model(config, with_lora=False)  # TRL wraps it; with beta > 0 its reference is the adapter off
    session.dir.mkdir(parents=True, exist_ok=True)
    session.start(session.resume_step, [r.name for r in rewards])
    recorder = CompletionRecorder()
    lora = config.model.lora
    trainer = PrefillKitGRPOTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=exact,
        peft_config=lora_config(lora) if lora is not None else None,
        reward_funcs=[recorder.wrap(r.name, r.fn) for r in rewards],
        callbacks=[MetricsWriter(session, [r.name for r in rewards]), FinalEval()],
        eval_temperature=eval_temperature(config),
        recorder=recorder, completion_log=session.completion_log, health=session.health,
        weights=[r.weight for r in rewards], eos_ids=eos_token_ids(tokenizer, model), user_tokenizer=tokenizer)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # TRL 1.16 toggles checkpointing around generation under the names transformers 5.24 deprecated
        # (13 FutureWarnings in a short run); the renamed methods do the same. Only those messages are hidden.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.modeling_utils",
                                message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable|"
                                        r"gradient_checkpointing_disable)` is deprecated")
        result = trainer.train(resume_from_checkpoint=None if session.checkpoint is None else str(session.checkpoint))
    session.finish()
    with session.final_model_dir(is_main=trainer.accelerator.is_main_process) as staging:
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(staging))  # every process: DeepSpeed/FSDP gather the weights here (and the tokenizer)
        session.save_merged(trainer.accelerator.unwrap_model(trainer.model), tokenizer, staging)
        trainer.accelerator.wait_for_everyone()
    return TrainResult(session.dir, trainer.state.global_step, train_loss=result.training_loss,
                       seconds=time.perf_counter() - start)
