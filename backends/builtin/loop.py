"""The built-in GRPO loop: one function, read top to bottom.

Each optimizer step runs these phases:
  1. rollout (every `num_iterations` steps): pick this process's prompts, sample `num_generations`
     completions each, score them with the rewards, gather every process's scores, turn them into
     group-relative advantages, keep this process's slice; old log-probs (num_iterations > 1) and reference
     log-probs (beta > 0) are computed here, once per batch.
  2. optimize: `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` completions,
     each a forward over prompt + completion, the GRPO loss on completion tokens, backward.
  3. clip, step the optimizer and the learning-rate schedule.
  4. log a metrics row to metrics.jsonl and the trackers (and, every `log_completions_steps`, the rollout's
     completions to completions.jsonl); warn when truncation or zero reward spread persists.
  5. evaluate every `eval_steps` (and after the last step); checkpoint every `save_steps`.
Distributed concerns shrink to `accelerator`: is_main_process, num_processes, gather, unwrap_model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefill_kit.backends.builtin.advantages import combine_rewards, compute_advantages, nanstd
from prefill_kit.backends.builtin.checkpoint import LoopState, checkpoint_step, find_checkpoint, save_checkpoint
from prefill_kit.backends.builtin.data import prompt_indices
from prefill_kit.backends.builtin.evaluation import eval_seed, evaluate
from prefill_kit.backends.builtin.loss import WINDOW_NORMALIZED, grpo_loss, loss_warnings
from prefill_kit.backends.builtin.rollout import Rollout, completion_logps, generate
from prefill_kit.backends.builtin.scoring import WeightedRewardLike, reward_weights, score_completions
from prefill_kit.backends.common import (
    eos_token_ids,
    final_model_dir,
    load_eval_data,
    load_training_data,
    write_run_config,
)
from prefill_kit.config import GRPOSection, TrainingConfig
from prefill_kit.data.io import keep_rows_through_step
from prefill_kit.runs.completion_log import CompletionLog, completion_rows, gather_rows
from prefill_kit.runs.run_checks import check_paths, resolve_rewards
from prefill_kit.runs.run_dir import claim_run_dir
from prefill_kit.runs.run_health import HealthMonitor
from prefill_kit.runs.trackers import flat_config, make_trackers, tracker_values

METRICS_FILE = "metrics.jsonl"
# Loss metrics that only some loss types have: None in the rows of the others (TRL's metrics.jsonl does the same).
LOSS_METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio")
logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


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

    def rows(self) -> list[dict[str, Any]]:
        """The completions.jsonl rows of this rollout (see `prefill_kit.runs.completion_log`)."""
        return completion_rows(step=self.step, prompt_indices=self.prompt_indices, prefixes=self.prefixes,
                               completions=self.completions, completion_lengths=self.completion_lengths,
                               truncated=self.truncated, rewards=self.rewards, reward=self.reward,
                               advantages=self.advantages, questions=self.questions, solutions=self.solutions)


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows, on every process
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # the eval rows (`eval/...`), on every process


def load_models(config: TrainingConfig):
    """Tokenizer, policy, and a frozen reference model only when beta > 0 without LoRA (else None).

    With `model.lora` the policy is a peft model whose adapter alone trains, and the reference is the same
    model with the adapter switched off, so no second copy is loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = DTYPES[config.model.dtype]
    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype)
    ref_model = None
    if config.grpo.beta > 0 and config.model.lora is None:
        ref_model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype).eval()
        ref_model.requires_grad_(False)
    for module in model.modules():  # sampling and scoring must see the same distribution
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if config.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.model.lora is not None:  # after the dropout reset: lora.dropout is the user's, kept for training
        from prefill_kit.backends.lora import apply_lora

        model = apply_lora(model, config.model.lora)
    return tokenizer, model, ref_model


def make_generation_config(grpo: GRPOSection, tokenizer, eos_ids: list[int]):
    """The sampling settings of a rollout.

    Every sampling knob is explicit: a None would be filled from transformers' defaults (top_k=50), and
    sampling from a truncated distribution while scoring the full one is off-policy. top_k=0 disables it.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, max_new_tokens=grpo.max_completion_length, temperature=grpo.temperature, top_p=grpo.top_p,
        top_k=grpo.top_k, repetition_penalty=1.0, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, disable_compile=True)


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
    from transformers import get_scheduler

    if config.trl:
        from prefill_kit.errors import ConfigError

        raise ConfigError(f"trl.{next(iter(config.trl))}: an option of the trl backend; the builtin backend does "
                          "not support it (remove it, or run with --backend trl)")
    g, t, out = config.grpo, config.train, config.output
    # Without a GPU, ask for CPU explicitly: that is what makes accelerate use gloo across the processes
    # torchrun (`accelerate launch --multi_gpu`) starts; otherwise each would train alone.
    checkpoint = find_checkpoint(out.resume_from) if out.resume_from else None
    trackers = make_trackers(out, resume_step=checkpoint_step(checkpoint) if checkpoint is not None else 0)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), log_with=trackers or None)
    # bf16 is our own autocast, not accelerate's mixed_precision: accelerate's is a per-process singleton
    # that a second run in the same process (a notebook, the tests) could not change.
    autocast = functools.partial(torch.autocast, accelerator.device.type, dtype=torch.bfloat16, enabled=t.bf16)
    set_seed(t.seed, device_specific=True)  # each process samples differently
    run_dir = Path(out.dir)
    if accelerator.is_main_process:
        for message in loss_warnings(g.loss_type, g.importance_sampling_level):
            logger.warning(message)

    # ---- setup: check what can be checked before loading anything; then models, data, optimizer
    check_paths(config)
    rewards = list(reward_funcs) if reward_funcs is not None else resolve_rewards(config.rewards)
    if not rewards:
        from prefill_kit.errors import ConfigError

        raise ConfigError("rewards: at least one reward is needed")
    claim_run_dir(config, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    tokenizer, model, ref_model = load_models(config)
    dataset = load_training_data(config.data, tokenizer)
    eval_dataset = load_eval_data(config.data, tokenizer)
    weights = reward_weights(rewards)
    eos_ids = eos_token_ids(tokenizer, model)
    generation_config = make_generation_config(g, tokenizer, eos_ids)
    eval_generation_config = make_generation_config(
        dataclasses.replace(g, temperature=g.eval_temperature or g.temperature), tokenizer, eos_ids)

    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, or the LoRA adapter's
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_epsilon, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if ref_model is not None:
        ref_model.to(accelerator.device)
    state = LoopState()
    # The scheduler is registered, not prepared: a prepared scheduler steps once per process.
    accelerator.register_for_checkpointing(scheduler, state)
    if config.model.lora is not None:
        from prefill_kit.backends.lora import register_adapter_checkpointing

        register_adapter_checkpointing(accelerator)

    if checkpoint is not None:
        from prefill_kit.backends.lora import check_resume_kind

        check_resume_kind(checkpoint, config.model.lora)
        accelerator.load_state(str(checkpoint))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, config)
        keep_rows_through_step(run_dir / METRICS_FILE, state.step)
    accelerator.init_trackers(out.project, config=flat_config(config.to_dict()))  # main process only
    completion_log = CompletionLog(run_dir, every=out.log_completions_steps, max_rows=out.log_completions_max,
                                   reward_names=[r.name for r in rewards], resume_step=state.step,
                                   is_main=accelerator.is_main_process)
    health = HealthMonitor(window=out.logging_steps, max_completion_length=g.max_completion_length,
                           reward_names=[r.name for r in rewards])
    accelerator.wait_for_everyone()

    rank, world = accelerator.process_index, accelerator.num_processes
    prompts_per_process = config.prompts_per_device_step
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
            indices = prompt_indices(generation, num_prompts=len(dataset), prompts_per_process=prompts_per_process,
                                     process_index=rank, num_processes=world, seed=t.seed,
                                     shuffle=config.data.shuffle)
            rows = dataset[indices]  # column -> list, one entry per prompt
            with autocast():
                batch = generate(policy, rows["prompt_ids"], num_generations=g.num_generations,
                                 generation_config=generation_config, eos_token_ids=eos_ids,
                                 pad_token_id=tokenizer.pad_token_id,
                                 mask_truncated_completions=g.mask_truncated_completions)
            lengths = _lengths(batch, eos_ids)  # (B,) tokens up to and including EOS
            ids_list = [ids[:n].tolist() for ids, n in zip(batch.completion_ids.cpu(), lengths.tolist(), strict=True)]
            completions = tokenizer.batch_decode(ids_list, skip_special_tokens=True)
            columns = {k: [v for v in values for _ in range(g.num_generations)] for k, values in rows.items()}
            prompts = columns.pop("prompt")
            local_scores = score_completions(rewards, prompts=prompts, completions=completions,
                                             completion_ids=ids_list, columns=columns)  # (B, K)
            # Group statistics need every completion of a prompt; all of a prompt's completions are on one
            # process, but the "batch" scaling and the logged stats need all processes: gather first.
            scores = accelerator.gather(local_scores.to(accelerator.device)).cpu()  # (B*world, K)
            totals = combine_rewards(scores, weights)  # (B*world,)
            advantages = compute_advantages(totals, g.num_generations, g.scale_rewards)
            batch.advantages = advantages[rank * len(batch):(rank + 1) * len(batch)].to(accelerator.device)
            with torch.no_grad(), autocast():
                if g.num_iterations > 1:
                    batch.old_logps = _logps_in_chunks(policy, batch, g.temperature, t.per_device_train_batch_size)
                if g.beta > 0:  # the frozen copy, or the LoRA policy with its adapter off
                    reference = policy if ref_model is None else ref_model
                    with policy.disable_adapter() if ref_model is None else contextlib.nullcontext():
                        batch.ref_logps = _logps_in_chunks(reference, batch, g.temperature,
                                                           t.per_device_train_batch_size)
            state.rollout_stats = _rollout_stats(accelerator, rewards, scores, totals, lengths, batch,
                                                 g.num_generations)
            state.rollout = batch.state_dict()
            record = RolloutRecord(
                step=state.step + 1, process_index=rank,
                prompt_indices=[i for i in indices for _ in range(g.num_generations)],
                prefixes=columns.get("prefix", [""] * len(completions)), completions=completions,
                completion_lengths=lengths.tolist(), truncated=batch.is_truncated.tolist(),
                rewards={r.name: _nullable(local_scores[:, k]) for k, r in enumerate(rewards)},
                reward=_nullable(combine_rewards(local_scores, weights)), advantages=batch.advantages.tolist(),
                questions=columns.get("question"), solutions=columns.get("solution"))
            if completion_log.due(record.step, span=g.num_iterations):  # the same answer on every process
                completion_log.write(gather_rows(record.rows()))
            if on_rollout is not None:
                on_rollout(record)
        batch = Rollout(**state.rollout)
        # dapo: tokens of the whole generation batch on all processes, per process (see loss.NORMALIZERS)
        num_items = accelerator.gather(batch.completion_mask.sum().to(accelerator.device)).sum().item() / world

        # ---- 2. optimize over micro-batches
        model.train()
        step_loss, loss_metrics = 0.0, {}
        micro = t.per_device_train_batch_size
        for m, start in enumerate(range(0, local_rows, micro)):
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

        # ---- 4. log, checkpoint
        reduced = accelerator.reduce(torch.tensor([step_loss, *loss_metrics.values()], device=accelerator.device),
                                     reduction="mean").tolist()
        row = {"step": state.step, "loss": reduced[0], **stats,
               **dict.fromkeys(LOSS_METRICS), **dict(zip(loss_metrics, reduced[1:], strict=True)),
               "learning_rate": learning_rate,
               "grad_norm": None if grad_norm is None else float(grad_norm),
               "step_time": time.perf_counter() - step_start}
        row["clip_ratio"] = row.pop("clip_ratio/region_mean")
        history.append(row)
        if accelerator.is_main_process:
            health.update(state.step, stats["truncated_ratio"], stats["zero_std_ratio"])
        if accelerator.is_main_process and (state.step % out.logging_steps == 0 or state.step == t.max_steps):
            _log_row(accelerator, run_dir, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", reward=row["reward"] and f"{row['reward']:.3f}")
        bar.update(1)

        # ---- 5. evaluate, checkpoint (after evaluating: the eval row is then part of the checkpoint's past)
        if eval_dataset is not None and (state.step % t.eval_steps == 0 or state.step == t.max_steps):
            eval_row = {"step": state.step, **evaluate(
                policy, eval_dataset, rewards=rewards, tokenizer=tokenizer, generation_config=eval_generation_config,
                eos_ids=eos_ids, num_generations=g.eval_num_generations,
                prompts_per_batch=max(1, t.per_device_train_batch_size // g.eval_num_generations),
                accelerator=accelerator, seed=eval_seed(t.seed, state.step, rank), autocast=autocast)}
            eval_history.append(eval_row)
            if accelerator.is_main_process:
                _log_row(accelerator, run_dir, eval_row)
        if out.save_steps and state.step % out.save_steps == 0 and state.step < t.max_steps:
            save_checkpoint(accelerator, run_dir, state.step, tokenizer)
    bar.close()

    # ---- final model
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with final_model_dir(run_dir, is_main=True) as staging:
            final = accelerator.unwrap_model(model)
            final.save_pretrained(staging)  # with LoRA: the adapter, for PeftModel.from_pretrained
            tokenizer.save_pretrained(staging)
            if config.model.lora is not None and config.model.lora.merge:
                from prefill_kit.backends.lora import MERGED_DIR, save_merged

                save_merged(final, tokenizer, staging / MERGED_DIR)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group
        tracker.finish()
    accelerator.trackers.clear()
    return TrainResult(run_dir, state.step, history, eval_history)


def _log_row(accelerator, run_dir: Path, row: dict[str, Any]) -> None:
    """One metrics row to metrics.jsonl and to every tracker, under the same names and step (main process)."""
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    accelerator.log(tracker_values(row), step=row["step"])


def _lengths(batch: Rollout, eos_ids: list[int]) -> torch.Tensor:
    """Completion lengths up to and including the first EOS, whatever mask_truncated_completions did."""
    from prefill_kit.backends.builtin.rollout import completion_mask_from_eos

    return completion_mask_from_eos(batch.completion_ids, eos_ids).sum(dim=1).cpu()


@torch.no_grad()
def _logps_in_chunks(model, batch: Rollout, temperature: float, chunk: int) -> torch.Tensor:
    return torch.cat([completion_logps(model, batch.rows(s, s + chunk), temperature)
                      for s in range(0, len(batch), chunk)])


def _rollout_stats(accelerator, rewards, scores: torch.Tensor, totals: torch.Tensor, lengths: torch.Tensor,
                   batch: Rollout, num_generations: int) -> dict[str, float]:
    """Reward and length statistics over every process's completions (as TRL logs them)."""
    all_lengths = accelerator.gather(lengths.to(accelerator.device)).float().cpu()
    truncated = accelerator.gather(batch.is_truncated.to(accelerator.device)).float().cpu()
    group_std = nanstd(totals.view(-1, num_generations), dim=1)
    stats = {"reward": _nan_to_none(torch.nanmean(totals).item()),
             "reward_std": _nan_to_none(nanstd(totals).item())}
    for k, r in enumerate(rewards):
        stats[f"rewards/{r.name}"] = _nan_to_none(torch.nanmean(scores[:, k]).item())
    stats["zero_std_ratio"] = torch.isclose(torch.nan_to_num(group_std), torch.zeros(())).float().mean().item()
    stats["completion_length"] = all_lengths.mean().item()
    stats["truncated_ratio"] = truncated.mean().item()
    return stats


def _nan_to_none(x: float) -> float | None:
    return None if x != x else x


def _nullable(values: torch.Tensor) -> list[float | None]:
    return [_nan_to_none(v) for v in values.tolist()]
