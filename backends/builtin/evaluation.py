"""Evaluation during training: sample completions for every held-out prompt, score them, log the means.

The eval prompts come from `data.eval_path` alone, so none of them is ever trained on. Sampling runs under a
forked RNG seeded by (seed, step, process): the training stream's random state is the same whether or not
evaluation ran, so a run with evaluation trains exactly like one without, and a resumed run stays exact.

A multi-turn run (`rollout.tools` / `rollout.environment`) evaluates with the same multi-turn rollouts as it trains
(`grpo.multiturn.MultiTurnRollouts` over the eval data's conversations: the same tools, template and bridge), and
adds `eval/turns/mean`, `eval/tools/calls` and `eval/tools/failures` over every eval rollout.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch

from prefill_kit.grpo.multiturn import MultiTurnRollouts, metrics
from prefill_kit.grpo.rollout import sample_and_score
from prefill_kit.grpo.scoring import WeightedRewardLike, none_if_nan
from prefill_kit.runs.completion_log import eval_metrics


def process_shard(num_rows: int, process_index: int, num_processes: int) -> range:
    """The contiguous slice of eval rows one process evaluates; the slices cover every row exactly once."""
    return range(process_index * num_rows // num_processes, (process_index + 1) * num_rows // num_processes)


def eval_seed(seed: int, step: int, process_index: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + process_index) % 2**63


@contextlib.contextmanager
def forked_rng(device: torch.device, seed: int):
    """Random state for sampling inside the block only; the caller's state is restored after it."""
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type="cuda" if device.type == "cpu" else device.type):
        torch.manual_seed(seed)
        yield


class TurnCounts(NamedTuple):
    """One eval rollout's counts, as `multiturn.metrics` reads them (small enough to gather across processes)."""

    turns: int
    tool_calls: int
    tool_failures: int

    @classmethod
    def of(cls, result) -> TurnCounts:
        return cls(result.turns, result.tool_calls, result.tool_failures)


def eval_rollouts(config, tokenizer, tools) -> MultiTurnRollouts | None:
    """The multi-turn rollouts evaluation runs: the training run's (tools, template, prefix, bridge) over the eval
    data's conversations; None for a single-turn run or without eval data."""
    if tools is None or not config.data.eval_path:
        return None
    eval_data = dataclasses.replace(config.data, path=config.data.eval_path)
    return MultiTurnRollouts(dataclasses.replace(config, data=eval_data), tokenizer, tools)


@torch.no_grad()
def evaluate(policy, dataset, *, rewards: Sequence[WeightedRewardLike], tokenizer, generation_config,
             eos_ids: list[int], num_generations: int, prompts_per_batch: int, accelerator, seed: int,
             autocast, multi_turn: MultiTurnRollouts | None = None) -> dict[str, float | None]:
    """`eval/reward` and `eval/rewards/<name>`: means over `num_generations` completions of every eval prompt; with
    `multi_turn` (see `eval_rollouts`), its rollouts' `eval/turns/mean`, `eval/tools/calls`, `eval/tools/failures`.

    Each process samples its shard of the prompts; every process returns the same means, over all shards.
    """
    from accelerate.utils import gather_object

    local: list[list[float | None]] = []  # one row of K scores per completion
    counts: list[TurnCounts] = []  # multi-turn: one per rollout
    shard = process_shard(len(dataset), accelerator.process_index, accelerator.num_processes)
    with forked_rng(accelerator.device, seed):
        for start in range(shard.start, shard.stop, prompts_per_batch):
            indices = list(range(start, min(start + prompts_per_batch, shard.stop)))
            rows = dataset[indices[0]:indices[-1] + 1]  # column -> list, one per prompt
            if multi_turn is None:
                scored = sample_and_score(policy, rows, rewards=rewards, tokenizer=tokenizer,
                                          num_generations=num_generations, generation_config=generation_config,
                                          eos_ids=eos_ids, autocast=autocast)
            else:
                scored = multi_turn(policy, rows, indices, rewards=rewards, num_generations=num_generations,
                                    generation_config=generation_config, eos_ids=eos_ids, autocast=autocast)
                counts += [TurnCounts.of(r) for r in scored.results]
            local += [[none_if_nan(v) for v in row] for row in scored.scores.tolist()]  # (b, K)
    gather = gather_object if accelerator.num_processes > 1 else list
    out = eval_metrics(gather(local), [r.name for r in rewards], [float(r.weight) for r in rewards])
    if multi_turn is not None:
        out.update({f"eval/{k}": v for k, v in metrics(gather(counts)).items()})
    return out
