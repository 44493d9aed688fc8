"""Rollout: sample `num_generations` completions per prompt and score token log-probs.

The prompt ids are exactly the rendered prompt's ids (tokenized with `add_special_tokens=False`, prefix
included), left-padded. Only what the model generates after them is a completion token; the prefix is part
of the prompt the model conditions on and never enters the completion or its mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from prefill_kit.config import GRPOSection
from prefill_kit.grpo.advantages import combine_rewards
from prefill_kit.grpo.loss import token_logps
from prefill_kit.grpo.scoring import WeightedRewardLike, reward_weights, score_completions


@dataclass
class Rollout:
    """One batch of generated completions, one row per completion, rows of a prompt adjacent.

    Filled in stages: `generate` sets the ids and masks; the loop adds `old_logps` (only when a batch is
    reused, num_iterations > 1), `ref_logps` (only with beta > 0) and `advantages`.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded with pad_token_id
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first EOS
    is_truncated: torch.Tensor  # (B,) bool: no EOS within max_completion_length
    old_logps: torch.Tensor | None = None  # (B, C)
    ref_logps: torch.Tensor | None = None  # (B, C)
    advantages: torch.Tensor | None = None  # (B,)
    # (B, C): what the model attends to after the prompt, where it differs from the loss mask (multi-turn: the
    # bridges and tool results are attended to, never trained); None: the completion mask
    completion_attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def rows(self, start: int, stop: int) -> Rollout:
        """Rows [start, stop): a micro-batch."""
        return Rollout(**{f.name: None if (v := getattr(self, f.name)) is None else v[start:stop]
                          for f in fields(self)})

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids, attention mask), both (B, max_len), padded on the left."""
    tensors = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ids = pad_sequence(tensors, batch_first=True, padding_value=pad_token_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(t) for t in tensors], batch_first=True, padding_value=0,
                        padding_side="left")
    return ids, mask


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """1 on every token up to and including the first EOS, 0 after it: (B, C) -> (B, C) long.

    A row without EOS (truncated) is all ones.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    # index of the first EOS, or C when there is none
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), completion_ids.size(1))  # (B,)
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first_eos.unsqueeze(1)).long()


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], *, num_generations: int, generation_config,
             eos_token_ids: Sequence[int], pad_token_id: int, mask_truncated_completions: bool = False) -> Rollout:
    """Sample `num_generations` completions for each prompt; rows of one prompt are adjacent.

    `generation_config` is a `transformers.GenerationConfig` with do_sample, temperature, top_p, top_k and
    max_new_tokens set. With `mask_truncated_completions`, a completion that never reached EOS gets an
    all-zero mask, so it adds nothing to the loss (DAPO's overlong filtering).
    """
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    ids, mask = left_pad(repeated, pad_token_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config)
    finally:
        model.train(was_training)
    completion_ids = out[:, ids.size(1):]  # (B, C)
    completion_mask = completion_mask_from_eos(completion_ids, eos_token_ids)
    is_truncated = ~torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=device)).any(dim=1)
    if mask_truncated_completions:
        completion_mask = completion_mask * (~is_truncated).unsqueeze(1).long()
    # tokens after the first EOS are padding from here on (generate already pads rows that finished early)
    completion_ids = completion_ids.masked_fill(completion_mask_from_eos(completion_ids, eos_token_ids) == 0,
                                                pad_token_id)
    return Rollout(ids, mask, completion_ids, completion_mask, is_truncated)


def completion_logps(model, batch: Rollout, temperature: float) -> torch.Tensor:
    """Log-probs of the completion tokens under `model`: (B, C).

    Runs prompt + completion through the model and keeps only the logits that predict completion tokens
    (`logits_to_keep`), so prompt and prefix positions are never scored.
    """
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)  # (B, P+C)
    attended = batch.completion_mask if batch.completion_attention_mask is None else batch.completion_attention_mask
    attention_mask = torch.cat([batch.prompt_mask, attended], dim=1)  # (B, P+C)
    num_completion = batch.completion_ids.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=num_completion + 1).logits  # (B, C+1, V)
    return token_logps(logits[:, :-1], batch.completion_ids, temperature)  # (B, C)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, tokenizer.eos_token_id} - {None})


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


@dataclass
class ScoredRollout:
    """Completions of some prompts, sampled and scored: what the loop, evaluation and preflight all need.

    One entry (or row) per completion, the `num_generations` completions of a prompt adjacent.
    """

    batch: Rollout | None  # the tensors the loss needs; None when the prompts were sampled in several chunks
    completion_ids: list[list[int]]  # cut after the first EOS (TRL's `completion_ids` for rewards)
    completions: list[str]  # decoded without special tokens
    lengths: list[int]  # tokens up to and including the first EOS
    truncated: list[bool]  # no EOS within max_completion_length
    prompts: list[str]
    columns: dict[str, list[Any]]  # every other data column (with `prefix`), one value per completion
    scores: torch.Tensor  # (B, K): each reward's score, NaN where it returned None
    totals: torch.Tensor  # (B,): the weighted total, NaN where no reward could judge


def sample_and_score(policy, rows: dict[str, list[Any]], *, rewards: Sequence[WeightedRewardLike], tokenizer,
                     num_generations: int, generation_config, eos_ids: list[int],
                     mask_truncated_completions: bool = False, chunk: int | None = None,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     on_chunk: Callable[[int], None] | None = None) -> ScoredRollout:
    """Sample `num_generations` completions of each prompt in `rows` (column -> list), then score them all.

    Prompts are sampled `chunk` at a time (all at once when None; `on_chunk` hears each chunk's prompt count),
    and the rewards are called once, with TRL's arguments, after the last chunk.
    """
    prompt_ids = rows["prompt_ids"]
    chunk = chunk or max(1, len(prompt_ids))
    batches = []
    for start in range(0, len(prompt_ids), chunk):
        part = prompt_ids[start:start + chunk]
        with autocast():
            batches.append(generate(policy, part, num_generations=num_generations,
                                    generation_config=generation_config, eos_token_ids=eos_ids,
                                    pad_token_id=tokenizer.pad_token_id,
                                    mask_truncated_completions=mask_truncated_completions))
        if on_chunk is not None:
            on_chunk(len(part))
    ids_list: list[list[int]] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    for batch in batches:
        ends = completion_mask_from_eos(batch.completion_ids, eos_ids).sum(dim=1).tolist()  # (b,)
        ids_list += [ids[:n].tolist() for ids, n in zip(batch.completion_ids.cpu(), ends, strict=True)]
        lengths += ends
        truncated += batch.is_truncated.tolist()
    completions = tokenizer.batch_decode(ids_list, skip_special_tokens=True)
    columns = {k: [v for v in values for _ in range(num_generations)] for k, values in rows.items()}
    prompts = columns.pop("prompt")
    scores = score_completions(rewards, prompts=prompts, completions=completions, completion_ids=ids_list,
                               columns=columns)  # (B, K)
    return ScoredRollout(batch=batches[0] if len(batches) == 1 else None, completion_ids=ids_list,
                         completions=completions, lengths=lengths, truncated=truncated, prompts=prompts,
                         columns=columns, scores=scores, totals=combine_rewards(scores, reward_weights(rewards)))
