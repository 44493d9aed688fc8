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

Multi-turn tool rollouts (`rollout.tools`, `rollout.environment`). TRL 1.16's own tool loop builds the ids after a
tool result from a dummy conversation (`_get_tool_suffix_ids`) without the response prefix, so every assistant turn
after the first starts without it; it also parses calls only through a response parser TRL knows for the template,
drops a malformed call silently, and has no tool timeout. So the tools are not handed to TRL's `tools` /
`environment_factory`: the trainer gets `ToolRollouts` as its `rollout_func` (TRL's hook for custom rollouts), which
runs the built-in backend's rollout loop (`prefill_kit.grpo.multiturn.run_rollouts`) on TRL's batch and samples
every turn with TRL's own generation (`_generate_single_turn`: transformers, continuous batching or vLLM). The
conventions are TRL's (and the built-in backend's): one environment instance per rollout, pooled; `reset(**row)`
with the data row; its public methods are tools; `get_reward()` is one more reward named after the class, weight 1;
rewards get `environments=`. So both backends build the same trajectories, token for token
(tests/test_backends_multiturn.py):

- ids: the prompt ids (prefix included), then each turn's sampled ids as sampled, each followed by prefill-kit's
  bridge (the stop token's tail, the tool results, the next assistant opening and the prefix, once);
- the loss mask: TRL's `env_mask` (its tool mask), 1 exactly on sampled ids, so no prompt, prefix, bridge or tool
  result is trained on; TRL's attention mask still covers the bridges;
- rewards: `completions` as message lists whose assistant contents start with their prefix, the prompts as the
  conversations after `reset`, `prefix` the first turn's (TRL's `_calculate_rewards` is given these);
- `rollout.max_turns` is enforced by the loop; it is mapped to TRL's `max_tool_calling_iterations` as
  `max_turns - 1` (TRL counts the turns after the first), for the record;
- `grpo.max_completion_length` bounds sampled ids and bridges together; a tool result that would pass it ends the
  rollout. Such a rollout ends on a stop token, so TRL does not count it in `truncated_ratio`; completions.jsonl
  marks it truncated, and with `grpo.mask_truncated_completions` its mask is zeroed, as in the built-in backend;
- metrics `turns/mean`, `tools/calls`, `tools/failures`; completions.jsonl rows carry each rollout's `turns`;
- evaluation (`data.eval_path`, TRL's `evaluation_loop`, the model in eval mode) runs the same loop over the eval
  rows (`eval_rollouts`, the built-in backend's: same tools, template, prefix and bridge; `reset` with the eval row),
  and adds `eval/turns/mean`, `eval/tools/calls`, `eval/tools/failures` over every eval rollout.

Not on this backend: `rollout.thinking_history: split` (several samples per rollout; TRL trains one per
completion), refused before any model loads. Each turn is one generation call on every process, so processes whose
rollouts end early make fewer calls: as with TRL's own tool loop, setups where generation is a collective across
processes (vLLM server mode, ZeRO-3 gathering) are untested.

Like the built-in backend, it writes completions.jsonl (`prefill_kit.runs.completion_log`) and warns when truncation
or zero reward spread persists (`prefill_kit.runs.run_health`); see `CompletionRecorder` for how. Metrics go to
metrics.jsonl and to prefill-kit's trackers (`prefill_kit.runs.trackers`) under the built-in backend's names, so
TRL's own `report_to` stays "none". Evaluation is TRL's (`eval_dataset`, `eval_steps`, `num_generations_eval`);
its logged means are per batch, so `eval/reward` and `eval/rewards/<name>` are computed here over every eval
completion, from what the rewards returned (and with tools, the eval turn metrics from every eval rollout).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from prefill_kit.backends.builtin.evaluation import TurnCounts, eval_rollouts
from prefill_kit.config import TrainingConfig
from prefill_kit.errors import PrefillKitError
from prefill_kit.grpo.multiturn import (
    MultiTurnRollouts,
    RolloutResult,
    metrics_of_all_processes,
    run_rollouts,
    turn_log,
)
from prefill_kit.grpo.multiturn import metrics as turn_metrics
from prefill_kit.grpo.policy import load_model, load_tokenizer, lora_config
from prefill_kit.grpo.rollout import eos_token_ids
from prefill_kit.grpo.scoring import weighted_totals
from prefill_kit.prompts.tokens import exact_ids_tokenizer
from prefill_kit.prompts.training_data import load_eval_data, load_training_data
from prefill_kit.rewards.registry import none_if_nan
from prefill_kit.runs.checks import check_paths, run_rewards, run_tools
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


T = TypeVar("T")

# What multi-turn runs log besides (ToolRollouts), under the built-in backend's names.
TURN_METRICS = ("turns/mean", "tools/calls", "tools/failures")


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

    def rows(self, *, step: int, advantages: list[float], weights: list[float], eos_ids: set[int],
             turns: Sequence[RolloutResult] | None = None) -> list[dict]:
        """The completions.jsonl rows of the latest rollout on this process; with the multi-turn rollouts `turns`
        (the same order), as the built-in backend logs them: the text after the prompt, the sampled token count,
        prefill-kit's truncation rule, and each rollout's turns."""
        call, names = self.call, list(self.scores)
        ids = [list(i) for i in call["completion_ids"]]
        n = len(ids)
        if turns is None:
            completions, lengths = call["completions"], [len(i) for i in ids]
            truncated = [not eos_ids.intersection(i) for i in ids]
        else:
            completions = [r.trajectory.text[len(r.trajectory.turn_prompts[0]):] for r in turns]
            lengths, truncated = [r.sampled_tokens for r in turns], [r.truncated for r in turns]
        return completion_rows(
            step=step, prompt_indices=call[PROMPT_INDEX_COLUMN], prefixes=call.get("prefix") or [""] * n,
            completions=completions, completion_lengths=lengths, truncated=truncated, rewards=self.scores,
            reward=weighted_totals([[self.scores[k][j] for k in names] for j in range(n)], weights),
            advantages=advantages, questions=call.get("question"), solutions=call.get("solution"),
            turns=None if turns is None else [turn_log(r) for r in turns])


@dataclass
class ToolBatch:
    """The latest multi-turn rollout on this process: each rollout's prompt (its conversation after `reset`) and
    result, in the order of the batch."""

    prompts: list[list[dict[str, Any]]]
    results: list[RolloutResult]


class ToolRollouts:
    """Multi-turn tool rollouts for TRL's `GRPOTrainer`, given to it as its `rollout_func` (module docstring).

    Each call runs prefill-kit's rollout loop (`prefill_kit.grpo.multiturn.run_rollouts`, the built-in backend's)
    on the trainer's batch, sampling each turn with TRL's own generation, and returns the ids TRL trains on: the
    prompt ids (prefix included), then sampled ids and bridges as one completion, and `env_mask` (TRL's name for
    the tool mask) 1 exactly on sampled ids.
    """

    def __init__(self, rollouts: MultiTurnRollouts, *, eos_ids: Sequence[int], max_turns: int,
                 max_completion_length: int, mask_truncated_completions: bool,
                 eval_rollouts: MultiTurnRollouts | None = None):
        self.rollouts, self.eval_rollouts, self.eos_ids = rollouts, eval_rollouts, list(eos_ids)
        self.max_turns, self.max_completion_length = max_turns, max_completion_length
        self.mask_truncated_completions = mask_truncated_completions
        self.latest: ToolBatch | None = None

    def __call__(self, prompts: list, trainer) -> dict[str, Any]:
        # TRL passes the prompts only; which data row each completion is for comes from the batch it is scoring, and
        # in evaluation (`evaluation_loop`: the model in eval mode) that row is one of the eval data's
        rollouts = self.rollouts if trainer.model.training else self.eval_rollouts
        if rollouts is None:
            raise PrefillKitError("evaluation with tools: no eval rollouts were set up (data.eval_path)")
        row_indices = [int(x[PROMPT_INDEX_COLUMN]) for x in trainer.rollout_inputs]
        builders, schemas, conversations, environments = rollouts.start(row_indices)
        tools = rollouts.tools
        sampler = TrlSampler(trainer)
        results = run_rollouts(
            builders, sampler, tokenizer=rollouts.tokenizer, eos_ids=self.eos_ids,
            tables=[tools.tool_table(environments[i] if environments else None) for i in range(len(builders))],
            schemas=schemas, max_turns=self.max_turns, max_completion_length=self.max_completion_length,
            tool_timeout=tools.timeout)
        trainer.environments = environments  # TRL passes them to every reward function (`environments=`)
        self.latest = ToolBatch(conversations, results)
        self._log_metrics(trainer, results)
        masks = []
        for r in results:
            mask = r.trajectory.mask[r.prompt_length:]
            # TRL's `mask_truncated_completions` sees a rollout cut off only where its last id is no stop token; one
            # ended because a tool result would pass max_completion_length ends on one: masked here, as builtin does
            if self.mask_truncated_completions and r.truncated:
                mask = [0] * len(mask)
            masks.append(mask)
        return {"prompt_ids": [r.trajectory.ids[:r.prompt_length] for r in results],
                "completion_ids": [r.completion_ids for r in results],
                "logprobs": sampler.aligned_logprobs(results),
                "env_mask": masks,
                "prefix": [r.trajectory.prefix for r in results]}  # to the rewards, as every other column

    @staticmethod
    def _log_metrics(trainer, results: list[RolloutResult]) -> None:
        """`turns/mean` over every process's rollouts, `tools/calls` and `tools/failures` summed, in TRL's logs."""
        mode = "train" if trainer.model.training else "eval"
        for name, value in metrics_of_all_processes(results, trainer.accelerator).items():
            trainer._metrics[mode][name].append(value)


class TrlSampler:
    """A `prefill_kit.grpo.multiturn.Sampler` on TRL's own generation (`_generate_single_turn`: transformers,
    continuous batching or vLLM), one sample per prompt; it keeps each call's log-probs (vLLM returns them)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.calls: list[list[list[float]] | None] = []

    def __call__(self, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        ids, logprobs = self.trainer._generate_single_turn(prompts, None, {}, 1)
        self.calls.append(logprobs)
        return [list(i) for i in ids]

    def aligned_logprobs(self, results: list[RolloutResult]) -> list[list[float]] | None:
        """Each completion's sampling log-probs, 0.0 on bridge ids (TRL's rule for tool results); None when the
        generation gave none. Call `t` sampled the rollouts with more than `t` turns, in order (`run_rollouts`)."""
        if not self.calls or any(c is None for c in self.calls):
            return None
        ranks = [{i: k for k, i in enumerate(j for j, r in enumerate(results) if r.turns > t)}
                 for t in range(len(self.calls))]
        out = []
        for i, r in enumerate(results):
            traj, p = r.trajectory, r.prompt_length
            logprobs = [0.0] * (len(traj.ids) - p)
            ends = [*traj.turn_starts[1:], len(traj.ids)]
            for t, (start, end) in enumerate(zip(traj.turn_starts, ends, strict=True)):
                sampled = self.calls[t][ranks[t][i]]
                j = start
                while j < end and traj.mask[j]:
                    logprobs[j - p] = sampled[j - start]
                    j += 1
            out.append(logprobs)
        return out


def one_record_set(records: list[tuple[int, T]], *, num_prompts: int, num_generations: int) -> list[T]:
    """What was recorded (scores; with tools, also each rollout's `TurnCounts`) for exactly `num_generations`
    completions of every eval prompt, from all processes' `(prompt index, record)` pairs.

    Under several processes accelerate pads the last eval batches with repeats of the first prompts (so every
    process gets a full batch); those extra completions are dropped, so each prompt counts equally. A
    prompt with fewer completions than asked is an error, never a silently smaller eval set.
    """
    seen = [0] * num_prompts
    kept = []
    for index, record in records:
        if seen[index] < num_generations:
            seen[index] += 1
            kept.append(record)
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
                 eos_ids: list[int], user_tokenizer, eval_temperature: float | None = None,
                 tool_rollouts: ToolRollouts | None = None, **kwargs):
        with warnings.catch_warnings():  # TRL calls `rollout_func` experimental; it is how tools run here (module doc)
            warnings.filterwarnings("ignore", message=r"You are using 'rollout_func'", category=UserWarning)
            super().__init__(*args, rollout_func=tool_rollouts, **kwargs)
        self.tool_rollouts = tool_rollouts
        self.rollout_inputs: list[dict[str, Any]] = []  # the batch being rolled out (ToolRollouts reads its rows)
        if self.pop_callback(ProgressCallback) is not None:  # the bar, without a printed dict per step
            self.add_callback(_BarOnly)
        self.recorder, self.completion_log, self.health = recorder, completion_log, health
        self.user_tokenizer = user_tokenizer
        self.weights, self.eos_ids = weights, set(eos_ids)
        self.eval_temperature = eval_temperature
        # (prompt index, (scores, its rollout's TurnCounts or None)) per eval completion
        self.eval_records: list[tuple[int, tuple[list[float | None], TurnCounts | None]]] = []
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
        self.rollout_inputs = inputs
        # TRL resets `self.environments` with the batch's prompts wherever it is set; the environments are
        # ToolRollouts' (it sets them for the rewards), and it resets them itself with the data rows
        self.environments = None
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._after_rollout(output["advantages"].tolist())
        else:
            self.eval_records += self._eval_records()
        return output

    def _eval_records(self) -> list[tuple[int, tuple[list[float | None], TurnCounts | None]]]:
        """The latest eval batch's records; with tools, each completion's rollout counts go with its scores (the
        same batch order), so the padding repeats `one_record_set` drops are dropped from both."""
        records = self.recorder.eval_records()
        if self.tool_rollouts is None:
            return [(index, (scores, None)) for index, scores in records]
        results = self.tool_rollouts.latest.results
        return [(index, (scores, TurnCounts.of(r)))
                for (index, scores), r in zip(records, results, strict=True)]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Multi-turn: TRL decoded the whole completion as one text and has only the data's prompts; rewards get what
        # the built-in backend gives them instead: each rollout's conversation, and its completion as message lists
        # whose assistant contents start with their prefix.
        if self.tool_rollouts is not None:
            batch = self.tool_rollouts.latest
            prompts, completions = batch.prompts, [r.completion for r in batch.results]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def evaluation_loop(self, *args, **kwargs):
        """TRL's evaluation, sampled at `eval_temperature`, plus the whole-set figures (`eval/...` keys): reward
        means and, with tools, `eval/turns/mean`, `eval/tools/calls`, `eval/tools/failures` over every eval rollout
        (as the built-in backend's; TRL's own `eval_...` keys are means of per-batch figures)."""
        self.eval_records = []
        with self._eval_sampling():
            output = super().evaluation_loop(*args, **kwargs)
        records = gather_object(self.eval_records) if self.accelerator.num_processes > 1 else self.eval_records
        kept = one_record_set(records, num_prompts=len(self.eval_dataset), num_generations=self.num_generations_eval)
        output.metrics.update(eval_metrics([s for s, _ in kept], list(self.recorder.scores), self.weights))
        if self.tool_rollouts is not None:
            output.metrics.update({f"eval/{k}": v for k, v in turn_metrics([c for _, c in kept]).items()})
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
        turns = self.tool_rollouts.latest.results if self.tool_rollouts is not None else None
        rows = gather_rows(self.recorder.rows(step=step, advantages=advantages, weights=self.weights,
                                              eos_ids=self.eos_ids, turns=turns))
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

    def __init__(self, session: RunSession, reward_names: list[str], *, multi_turn: bool = False):
        self.session, self.reward_names = session, reward_names
        self.names = {**METRIC_NAMES, **({k: k for k in TURN_METRICS} if multi_turn else {})}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step}
        if "loss" in logs:
            for trl_key, name in self.names.items():
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
    tools, rewards = run_tools(config, run_rewards(config))  # + the environment's get_reward (its class, weight 1)
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
    eos_ids = eos_token_ids(tokenizer, model)
    tool_rollouts = None
    if tools is not None:
        g = config.grpo
        tool_rollouts = ToolRollouts(MultiTurnRollouts(config, tokenizer, tools), eos_ids=eos_ids,
                                     max_turns=config.rollout.max_turns, max_completion_length=g.max_completion_length,
                                     mask_truncated_completions=g.mask_truncated_completions,
                                     eval_rollouts=eval_rollouts(config, tokenizer, tools))
    session.dir.mkdir(parents=True, exist_ok=True)
    session.start(session.resume_step, [r.name for r in rewards])
    recorder = CompletionRecorder()
    lora = config.model.lora
    trainer = PrefillKitGRPOTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=exact,
        peft_config=lora_config(lora) if lora is not None else None,
        reward_funcs=[recorder.wrap(r.name, r.fn) for r in rewards],
        callbacks=[MetricsWriter(session, [r.name for r in rewards], multi_turn=tools is not None), FinalEval()],
        eval_temperature=eval_temperature(config),
        recorder=recorder, completion_log=session.completion_log, health=session.health,
        weights=[r.weight for r in rewards], eos_ids=eos_ids, user_tokenizer=tokenizer, tool_rollouts=tool_rollouts)
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
