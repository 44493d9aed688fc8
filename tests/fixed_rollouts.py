"""Fixed rollouts for comparing training steps across process counts: the same prompt always gets the same
completions, whichever process samples it and however many prompts share its batch.

Used in-process by tests/test_builtin_equivalence.py and, in each rank, by its two-process driver.
"""

from __future__ import annotations

import torch

_AdamW = torch.optim.AdamW  # the real one, before any test swaps in the recording subclass


def _prompt_seed(prompt: list[int], generation: int) -> int:
    return (sum((k + 1) * t for k, t in enumerate(prompt)) * 31 + generation) % (2**31)


def fix_sampling(model, tokenizer) -> None:
    """Make `model.generate` return completions that depend only on each row's prompt and its place in the
    prompt's group: tokens from a seed, EOS at a seeded position (or none: truncated), padding after it."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(min(len(tokenizer), 300)) if i not in special])

    def generate(input_ids, attention_mask, generation_config, **_):
        length = generation_config.max_new_tokens
        rows, previous, generation = [], None, 0
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = [t for t, m in zip(ids, mask, strict=True) if m]
            generation = generation + 1 if prompt == previous else 0
            previous = prompt
            rng = torch.Generator().manual_seed(_prompt_seed(prompt, generation))
            tokens = allowed[torch.randint(len(allowed), (length,), generator=rng)]
            end = int(torch.randint(1, length + 2, (1,), generator=rng))  # length + 1: no EOS, truncated
            if end <= length:
                tokens[end - 1] = tokenizer.eos_token_id
                tokens[end:] = tokenizer.pad_token_id
            rows.append(tokens)
        return torch.cat([input_ids, torch.stack(rows).to(input_ids.device)], dim=1)

    model.generate = generate


def spread(completions, completion_ids, **kwargs) -> list[float]:
    """A reward that differs within and across groups, so that every rank's advantages are its own."""
    return [(sum(ids) * 7 % 13) / 12 for ids in completion_ids]


class RecordingAdamW(_AdamW):
    """AdamW that records, at each step, the gradient it is given (after clipping), and the call order."""

    grads: list[list[torch.Tensor]] = []
    events: list[str] = []

    def step(self, closure=None):
        RecordingAdamW.events.append("optimizer.step")
        RecordingAdamW.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                                     if p.grad is not None])
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        RecordingAdamW.events.append("zero_grad")
        return super().zero_grad(set_to_none=set_to_none)
