"""Which training prompts each process uses at each step (loading them is `prefill_kit.prompts.training_data`)."""

from __future__ import annotations

import functools

import torch


def prompt_indices(generation: int, *, num_prompts: int, prompts_per_process: int, process_index: int,
                   num_processes: int, seed: int, shuffle: bool = True) -> list[int]:
    """Dataset rows for one process at one generation step. Pure: the step alone fixes the data position.

    The data is an endless stream of epochs, each a permutation seeded by (seed, epoch). Generation g takes
    the next `prompts_per_process * num_processes` prompts of the stream, and each process its own slice.
    """
    per_step = prompts_per_process * num_processes
    start = generation * per_step + process_index * prompts_per_process
    out = []
    for k in range(start, start + prompts_per_process):
        epoch, pos = divmod(k, num_prompts)
        out.append(int(_epoch_order(epoch, num_prompts, seed, shuffle)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(epoch: int, n: int, seed: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
