"""Training prompts: load the data file, render it when it is raw, and decide which prompts each step uses."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from prefill_kit.config import DataSection
from prefill_kit.errors import DataError


def is_rendered(dataset) -> bool:
    """A rendered file has a string `prompt` and a `prefix` column: it is used as is, never rendered again."""
    cols = set(dataset.column_names)
    return {"prompt", "prefix"} <= cols and len(dataset) > 0 and isinstance(dataset[0]["prompt"], str)


def load_training_data(section: DataSection, tokenizer):
    """The prompts to train on: a `datasets.Dataset` with `prompt`, `prefix`, `prompt_ids` and every other column.

    Raw data is rendered with `section.template`, or the tokenizer's own chat template when that is None.
    `prompt_ids` come from the rendered text with `add_special_tokens=False` and the tokenizer in use (a
    rendered file's own ids are replaced), so the model sees exactly the rendered prompt.
    """
    from prefill_kit.pipeline import as_dataset, render_dataset
    from prefill_kit.prompt_tokens import PromptTokenizer

    path = Path(section.path)
    if not path.exists():
        raise DataError("no such file or directory", source=str(path))
    dataset = as_dataset(str(path))
    if len(dataset) == 0:
        raise DataError("no rows", source=str(path))
    if not is_rendered(dataset):
        return render_dataset(dataset, template=section.template, tokenizer=tokenizer, prefix=section.prefix,
                              continue_final=section.continue_final, template_kwargs=section.template_kwargs,
                              format=section.format)
    encoder = PromptTokenizer(tokenizer)  # == tokenizer(prompts, add_special_tokens=False), computed faster

    def tokenize(batch):
        ids = encoder.encode(batch["prompt"])
        return {"prompt_ids": ids, "num_prompt_tokens": [len(i) for i in ids]}

    return dataset.map(tokenize, batched=True)


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
