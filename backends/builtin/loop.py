"""The built-in GRPO loop: one function, read top to bottom.

Each optimizer step runs these phases:
  1. rollout (every `num_iterations` steps): pick this process's prompts, sample `num_generations`
     completions each, score them with the rewards, gather every process's scores, turn them into
     group-relative advantages, keep this process's slice; old log-probs (num_iterations > 1) and reference
     log-probs (beta > 0) are computed here, once per batch.
  2. optimize: `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` completions,
     each a forward over prompt + completion, the GRPO loss on completion tokens, backward.
  3. clip, step the optimizer and the learning-rate schedule.
  4. log a metrics row to metrics.jsonl and the trackers (the rollout's completions went to completions.jsonl,
     every `log_completions_steps`, in phase 1); warn when truncation or zero reward spread persists.
  5. evaluate every `eval_steps` (and after the last step); checkpoint every `save_steps`.
Everything around the loop (the run directory, config.yaml, metrics and trackers, resume, the final save) is
`prefill_kit.runs.session.RunSession`; sampling and scoring is `prefill_kit.grpo.rollout.sample_and_score`.
Distributed concerns shrink to `accelerator`: is_main_process, num_processes, gather, unwrap_model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prefill_kit.backends.builtin.checkpoint import LoopState, save_checkpoint
from prefill_kit.backends.builtin.evaluation import eval_rollouts, eval_seed, evaluate
from prefill_kit.backends.lora import check_resume_kind, register_adapter_checkpointing
from prefill_kit.config import TrainingConfig
from prefill_kit.errors import ConfigError
from prefill_kit.grpo.advantages import combine_rewards, compute_advantages, nanstd
from prefill_kit.grpo.loss import WINDOW_NORMALIZED, grpo_loss, loss_warnings
from prefill_kit.grpo.multiturn import (
    MultiTurnRollouts,
    MultiTurnScored,
    metrics_of_all_processes,
    sample_advantages,
    turn_log,
)
from prefill_kit.grpo.policy import load_model, load_reference, load_tokenizer
from prefill_kit.grpo.prompt_order import prompt_indices
from prefill_kit.grpo.rollout import (
    Rollout,
    ScoredRollout,
    completion_logps,
    eos_token_ids,
    make_generation_config,
    sample_and_score,
)
from prefill_kit.grpo.scoring import WeightedRewardLike, none_if_nan, nullable, reward_weights
from prefill_kit.prompts.training_data import load_eval_data, load_training_data
from prefill_kit.runs.checks import check_paths, run_rewards, run_tools
from prefill_kit.runs.completion_log import completion_rows, gather_rows
from prefill_kit.runs.run_health import zero_spread_share
from prefill_kit.runs.session import RunSession, TrainResult

# Loss metrics that only some loss types have: None in the rows of the others (TRL's metrics.jsonl does the same).
LOSS_METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio")
logger = logging.getLogger(__name__)


@dataclass
class RolloutRecord:
    """One process's completions of one rollout, for `on_rollout` hooks (e.g. completion logs).

    Lists have one entry per completion of this process; `rewards` maps each reward name to its scores
    (None where the reward returned None).
    """

    step: int
    process_index: int
    prompt_indices: list[int]
    prefixes: list[str]
    completions: list[str]
    completion_lengths: list[int]
    truncated: list[bool]
    rewards: dict[str, list[float | None]]
    reward: list[float | None]
    advantages: list[float]
    questions: list[str | None] | None = None  # the data's `question` and `solution` columns, when it has them
    solutions: list[Any] | None = None
    turns: list[list[dict[str, Any]]] | None = None  # multi-turn rollouts: each one's turns (grpo.multiturn.turn_log)

    def rows(self) -> list[dict[str, Any]]:
        """The completions.jsonl rows of this rollout (see `prefill_kit.runs.completion_log`)."""
        return completion_rows(step=self.step, prompt_indices=self.prompt_indices, prefixes=self.prefixes,
                               completions=self.completions, completion_lengths=self.completion_lengths,
                               truncated=self.truncated, rewards=self.rewards, reward=self.reward,
                               advantages=self.advantages, questions=self.questions, solutions=self.solutions,
                               turns=self.turns)


def load_models(config: TrainingConfig):
    """Tokenizer, policy (dropout off; with `model.lora` a peft model whose adapter alone trains), and a frozen
    reference model only when beta > 0 without LoRA (else None: the reference is the policy, adapter off)."""
    return load_tokenizer(config), load_model(config, training=True), load_reference(config)


def train(config: TrainingConfig, *, reward_funcs: Sequence[WeightedRewardLike] | None = None,
          progress: bool = True, on_rollout: Callable[[RolloutRecord], None] | None = None) -> TrainResult:
    """Train with GRPO as `config` says; returns the run directory, final step and the logged rows.

    `reward_funcs` (objects with `name`, `fn`, `weight`) replace `config.rewards` when given.
    `on_rollout` is called on every process after each rollout with that process's completions.
    Runs unchanged in one process or under `accelerate launch`.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    _check_builtin_options(config)
    g, t, out = config.grpo, config.train, config.output
    # Without a GPU, ask for CPU explicitly: that is what makes accelerate use gloo across the processes
    # torchrun (`accelerate launch --multi_gpu`) starts; otherwise each would train alone.
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    session = RunSession(config, is_main=accelerator.is_main_process, checkpoint_marker="checkpoint.json")
    # bf16 is our own autocast, not accelerate's mixed_precision: accelerate's is a per-process singleton
    # that a second run in the same process (a notebook, the tests) could not change.
    autocast = functools.partial(torch.autocast, accelerator.device.type, dtype=torch.bfloat16, enabled=t.bf16)
    set_seed(t.seed, device_specific=True)  # each process samples differently
    for message in loss_warnings(g.loss_type, g.importance_sampling_level) if accelerator.is_main_process else ():
        logger.warning(message)

    # ---- setup: check what can be checked before loading anything; then models, data, optimizer
    check_paths(config)
    tools, rewards = run_tools(config, run_rewards(config, reward_funcs))
    session.claim()
    accelerator.wait_for_everyone()
    tokenizer, model, ref_model = load_models(config)
    dataset = load_training_data(config.data, tokenizer)
    eval_dataset = load_eval_data(config.data, tokenizer)
    multi_turn = MultiTurnRollouts(config, tokenizer, tools) if tools is not None else None
    eos_ids = eos_token_ids(tokenizer, model)
    weights = reward_weights(rewards)
    sampling = dict(tokenizer=tokenizer, rewards=rewards, eos_ids=eos_ids, autocast=autocast,
                    generation_config=make_generation_config(g, tokenizer, eos_ids))
    eval_sampling = make_generation_config(dataclasses.replace(g, temperature=g.eval_temperature or g.temperature),
                                           tokenizer, eos_ids)
    evaluate_policy = functools.partial(
        evaluate, dataset=eval_dataset, rewards=rewards, tokenizer=tokenizer, generation_config=eval_sampling,
        eos_ids=eos_ids, autocast=autocast, num_generations=g.eval_num_generations, accelerator=accelerator,
        prompts_per_batch=max(1, t.per_device_train_batch_size // g.eval_num_generations),
        multi_turn=eval_rollouts(config, tokenizer, tools))

    model, optimizer, scheduler, trainable, state = _prepare(accelerator, model, ref_model, config, session)
    session.start(state.step, [r.name for r in rewards])
    accelerator.wait_for_everyone()

    rank, world = accelerator.process_index, accelerator.num_processes
    local_rows = t.per_device_train_batch_size * t.gradient_accumulation_steps  # completions per process per step
    history: list[dict[str, Any]] = []
    eval_history: list[dict[str, Any]] = []
    bar = tqdm(total=t.max_steps, initial=state.step, desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process))

    while state.step < t.max_steps:
        step_start = time.perf_counter()
        generation, iteration = divmod(state.step, g.num_iterations)
        policy = accelerator.unwrap_model(model)

        # ---- 1. rollout: generate, score, normalize (once per `num_iterations` steps)
        if iteration == 0 or state.rollout is None:
            policy.eval()  # no dropout while sampling and scoring (only LoRA's can be non-zero)
            indices = prompt_indices(generation, num_prompts=len(dataset),
                                     prompts_per_process=config.prompts_per_device_step,
                                     process_index=rank, num_processes=world, seed=t.seed,
                                     shuffle=config.data.shuffle)
            if multi_turn is None:
                scored = sample_and_score(policy, dataset[indices], num_generations=g.num_generations,
                                          mask_truncated_completions=g.mask_truncated_completions, **sampling)
            else:
                scored = multi_turn(policy, dataset[indices], indices, rewards=rewards,
                                    num_generations=g.num_generations, generation_config=sampling["generation_config"],
                                    eos_ids=eos_ids, autocast=autocast)
            # Group statistics need every completion of a prompt; all of a prompt's completions are on one
            # process, but the "batch" scaling and the logged stats need all processes: gather first.
            scores = accelerator.gather(scored.scores.to(accelerator.device)).cpu()  # (B*world, K)
            totals = combine_rewards(scores, weights)  # (B*world,)
            batch, advantages = _with_advantages_and_logps(accelerator, scored, totals, policy, ref_model, config,
                                                           autocast)
            state.rollout = batch.state_dict()
            state.rollout_stats = _rollout_stats(accelerator, rewards, scores, totals, scored, g.num_generations)
            record = _record(scored, indices, advantages, rewards, step=state.step + 1, rank=rank,
                             num_generations=g.num_generations)
            if session.completion_log.due(record.step, span=g.num_iterations):  # the same answer on every process
                session.completion_log.write(gather_rows(record.rows()))
            if on_rollout is not None:
                on_rollout(record)
        batch = Rollout(**state.rollout)

        # ---- 2. optimize over micro-batches
        step_loss, loss_metrics = _optimize(accelerator, model, batch, config, local_rows, autocast)

        # ---- 3. clip, step
        grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm > 0 else None
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        stats = state.rollout_stats
        if iteration == g.num_iterations - 1:
            state.rollout = state.rollout_stats = None  # the next step generates afresh: nothing to carry

        # ---- 4. log
        row = _metrics_row(accelerator, state.step, step_loss, loss_metrics, stats, learning_rate=learning_rate,
                           grad_norm=grad_norm, step_time=time.perf_counter() - step_start)
        history.append(row)
        if accelerator.is_main_process:
            session.health.update(state.step, stats["truncated_ratio"], stats["zero_std_ratio"])
        if state.step % out.logging_steps == 0 or state.step == t.max_steps:
            session.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", reward=row["reward"] and f"{row['reward']:.3f}")
        bar.update(1)

        # ---- 5. evaluate, checkpoint (after evaluating: the eval row is then part of the checkpoint's past)
        if eval_dataset is not None and (state.step % t.eval_steps == 0 or state.step == t.max_steps):
            eval_row = {"step": state.step, **evaluate_policy(policy, seed=eval_seed(t.seed, state.step, rank))}
            eval_history.append(eval_row)
            session.log(eval_row)
        if out.save_steps and state.step % out.save_steps == 0 and state.step < t.max_steps:
            save_checkpoint(accelerator, session.dir, state.step, tokenizer)
    bar.close()

    # ---- final model
    _save_final_model(accelerator, session, model, tokenizer)
    session.finish()
    return TrainResult(session.dir, state.step, history, eval_history)


def _prepare(accelerator, model, ref_model, config: TrainingConfig, session: RunSession):
    """The model and optimizer prepared by accelerate, the scheduler, the trainable parameters (all, or the LoRA
    adapter's) and the loop state, resumed from `session.checkpoint` when there is one."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer_and_schedule(trainable, config.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    if ref_model is not None:
        ref_model.to(accelerator.device)
    state = LoopState()
    # The scheduler is registered, not prepared: a prepared scheduler steps once per process.
    accelerator.register_for_checkpointing(scheduler, state)
    if config.model.lora is not None:
        register_adapter_checkpointing(accelerator)
    if session.checkpoint is not None:
        check_resume_kind(session.checkpoint, config.model.lora)
        accelerator.load_state(str(session.checkpoint))
    return model, optimizer, scheduler, trainable, state


def _check_builtin_options(config: TrainingConfig) -> None:
    if config.trl:
        raise ConfigError(f"trl.{next(iter(config.trl))}: an option of the trl backend; the builtin backend does "
                          "not support it (remove it, or run with --backend trl)")


def _save_final_model(accelerator, session: RunSession, model, tokenizer) -> None:
    """The trained model (with LoRA: the adapter, for PeftModel.from_pretrained; merged too if asked) and the
    user's tokenizer, moved into the run directory only once whole."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with session.final_model_dir() as staging:
            final = accelerator.unwrap_model(model)
            final.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            session.save_merged(final, tokenizer, staging)
    accelerator.wait_for_everyone()


def _optimizer_and_schedule(trainable, t):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_epsilon, weight_decay=t.weight_decay)
    return optimizer, get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=t.warmup_steps,
                                    num_training_steps=t.max_steps)


def _metrics_row(accelerator, step: int, step_loss: float, loss_metrics: dict[str, float], stats: dict[str, Any],
                 *, learning_rate: float, grad_norm, step_time: float) -> dict[str, Any]:
    """The metrics.jsonl row of one step: the loss and loss metrics averaged over processes, the rollout's stats."""
    reduced = accelerator.reduce(torch.tensor([step_loss, *loss_metrics.values()], device=accelerator.device),
                                 reduction="mean").tolist()
    row = {"step": step, "loss": reduced[0], **stats,
           **dict.fromkeys(LOSS_METRICS), **dict(zip(loss_metrics, reduced[1:], strict=True)),
           "learning_rate": learning_rate,
           "grad_norm": None if grad_norm is None else float(grad_norm),
           "step_time": step_time}
    row["clip_ratio"] = row.pop("clip_ratio/region_mean")
    return row


def _with_advantages_and_logps(accelerator, scored: ScoredRollout, totals: torch.Tensor, policy, ref_model,
                               config: TrainingConfig, autocast) -> tuple[Rollout, list[float]]:
    """This process's rollout with its advantages, and the old and reference log-probs the loss needs; and the
    advantage of each of its completions. Multi-turn: each sample takes its rollout's advantage (`owners`)."""
    g, chunk, rank = config.grpo, config.train.per_device_train_batch_size, accelerator.process_index
    batch, n = scored.batch, len(scored.completions)
    advantages = compute_advantages(totals, g.num_generations, g.scale_rewards)  # (B*world,)
    mine = advantages[rank * n:(rank + 1) * n]  # (B,)
    if isinstance(scored, MultiTurnScored):
        batch.advantages = sample_advantages(mine, scored.owners).to(accelerator.device)
    else:
        batch.advantages = mine.to(accelerator.device)
    with torch.no_grad(), autocast():
        if g.num_iterations > 1:
            batch.old_logps = _logps_in_chunks(policy, batch, g.temperature, chunk)
        if g.beta > 0:  # the frozen copy, or the LoRA policy with its adapter off
            reference = policy if ref_model is None else ref_model
            with policy.disable_adapter() if ref_model is None else contextlib.nullcontext():
                batch.ref_logps = _logps_in_chunks(reference, batch, g.temperature, chunk)
    return batch, mine.tolist()


def _optimize(accelerator, model, batch: Rollout, config: TrainingConfig, local_rows: int,
              autocast) -> tuple[float, dict[str, float]]:
    """Forward and backward over `gradient_accumulation_steps` micro-batches; the summed loss and mean metrics."""
    g, t, world = config.grpo, config.train, accelerator.num_processes
    # dapo: tokens of the whole generation batch on all processes, per process (see loss.NORMALIZERS)
    num_items = accelerator.gather(batch.completion_mask.sum().to(accelerator.device)).sum().item() / world
    model.train()
    step_loss, loss_metrics = 0.0, {}
    # one row per completion: local_rows rows in per_device_train_batch_size micro-batches; multi-turn `split`
    # makes more rows (samples) than completions, spread over the same gradient_accumulation_steps micro-batches
    micro = -(-len(batch) // t.gradient_accumulation_steps)
    for m, start in enumerate(range(0, len(batch), micro)):
        mb = batch.rows(start, start + micro)
        last = m == t.gradient_accumulation_steps - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), autocast():
            logps = completion_logps(model, mb, g.temperature)  # (b, C)
            loss, metrics = grpo_loss(
                logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.completion_mask, loss_type=g.loss_type,
                epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
                importance_sampling_level=g.importance_sampling_level,
                sapo_temperature_pos=g.sapo_temperature_pos, sapo_temperature_neg=g.sapo_temperature_neg,
                max_completion_length=g.max_completion_length, num_items_in_batch=num_items)
            if g.loss_type not in WINDOW_NORMALIZED:  # dapo's, cispo's normalizer spans the window already
                loss = loss / t.gradient_accumulation_steps
            accelerator.backward(loss)
        step_loss += loss.item()
        for k, v in metrics.items():
            loss_metrics[k] = loss_metrics.get(k, 0.0) + v.item() / t.gradient_accumulation_steps
    return step_loss, loss_metrics


def _record(scored: ScoredRollout, indices: list[int], advantages: list[float], rewards, *, step: int, rank: int,
            num_generations: int) -> RolloutRecord:
    columns = scored.columns
    return RolloutRecord(
        step=step, process_index=rank, prompt_indices=[i for i in indices for _ in range(num_generations)],
        prefixes=columns.get("prefix", [""] * len(scored.completions)), completions=scored.completions,
        completion_lengths=scored.lengths, truncated=scored.truncated,
        rewards={r.name: nullable(scored.scores[:, k]) for k, r in enumerate(rewards)},
        reward=nullable(scored.totals), advantages=advantages,
        questions=columns.get("question"), solutions=columns.get("solution"),
        turns=[turn_log(r) for r in scored.results] if isinstance(scored, MultiTurnScored) else None)


@torch.no_grad()
def _logps_in_chunks(model, batch: Rollout, temperature: float, chunk: int) -> torch.Tensor:
    return torch.cat([completion_logps(model, batch.rows(s, s + chunk), temperature)
                      for s in range(0, len(batch), chunk)])


def _rollout_stats(accelerator, rewards, scores: torch.Tensor, totals: torch.Tensor, scored: ScoredRollout,
                   num_generations: int) -> dict[str, float | None]:
    """Reward and length statistics over every process's completions (as TRL logs them)."""
    all_lengths = accelerator.gather(torch.tensor(scored.lengths, device=accelerator.device)).float().cpu()
    truncated = accelerator.gather(torch.tensor(scored.truncated, device=accelerator.device)).float().cpu()
    stats = {"reward": none_if_nan(torch.nanmean(totals).item()),
             "reward_std": none_if_nan(nanstd(totals).item())}
    for k, r in enumerate(rewards):
        stats[f"rewards/{r.name}"] = none_if_nan(torch.nanmean(scores[:, k]).item())
    stats["zero_std_ratio"] = zero_spread_share(nullable(totals), num_generations)
    stats["completion_length"] = all_lengths.mean().item()
    stats["truncated_ratio"] = truncated.mean().item()
    if isinstance(scored, MultiTurnScored):  # turns/mean over rollouts, tool calls and failures summed
        stats.update(metrics_of_all_processes(scored.results, accelerator))
    return stats
