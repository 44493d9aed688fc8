"""Evaluation during training: sample completions for every held-out prompt, score them, log the means.

The eval prompts come from `data.eval_path` alone, so none of them is ever trained on. Sampling runs under a
forked RNG seeded by (seed, step, process): the training stream's random state is the same whether or not
evaluation ran, so a run with evaluation trains exactly like one without, and a resumed run stays exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

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


@torch.no_grad()
def evaluate(policy, dataset, *, rewards: Sequence[WeightedRewardLike], tokenizer, generation_config,
             eos_ids: list[int], num_generations: int, prompts_per_batch: int, accelerator, seed: int,
             autocast) -> dict[str, float | None]:
    """`eval/reward` and `eval/rewards/<name>`: means over `num_generations` completions of every eval prompt.

    Each process samples its shard of the prompts; every process returns the same means, over all shards.
    """
    from accelerate.utils import gather_object

    local: list[list[float | None]] = []  # one row of K scores per completion
    shard = process_shard(len(dataset), accelerator.process_index, accelerator.num_processes)
    with forked_rng(accelerator.device, seed):
        for start in range(shard.start, shard.stop, prompts_per_batch):
            rows = dataset[start:min(start + prompts_per_batch, shard.stop)]  # column -> list, one per prompt
            scored = sample_and_score(policy, rows, rewards=rewards, tokenizer=tokenizer,
                                      num_generations=num_generations, generation_config=generation_config,
                                      eos_ids=eos_ids, autocast=autocast)
            local += [[none_if_nan(v) for v in row] for row in scored.scores.tolist()]  # (b, K)
    every = gather_object(local) if accelerator.num_processes > 1 else local
    return eval_metrics(every, [r.name for r in rewards], [float(r.weight) for r in rewards])
