"""The GRPO loss: one clipped objective, a k3 KL term, and a table of normalizers (TRL 1.16's formulas).

Pure tensor functions: token log-probs in, `(loss, metrics)` out. Every tensor of shape (B, T) holds one
row per completion and one column per completion token; `completion_mask` is 1 on generated tokens
(up to and including the first EOS) and 0 on padding, so prompt and prefix tokens never get here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

LossType = Literal["dapo", "grpo", "bnpo", "dr_grpo"]


def token_logps(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under `log_softmax(logits / temperature)`: (B, T, V), (B, T) -> (B, T).

    Dividing by the sampling temperature makes these the log-probs of the distribution the tokens were
    sampled from, as TRL does.
    """
    logits = logits.float() / temperature
    picked = torch.gather(logits, -1, token_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def _per_sequence_mean(loss: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _token_mean(loss: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def _generation_batch_token_mean(loss: torch.Tensor, mask: torch.Tensor, num_items_in_batch: float | None = None,
                                 **_) -> torch.Tensor:
    if num_items_in_batch is None:  # one process, no accumulation: the batch is the generation batch
        return _token_mean(loss, mask)
    count = torch.as_tensor(num_items_in_batch, dtype=loss.dtype, device=loss.device)
    return (loss * mask).sum() / count.clamp(min=1.0)


def _batch_times_max_length(loss: torch.Tensor, mask: torch.Tensor, max_completion_length: int | None = None,
                            **_) -> torch.Tensor:
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    return (loss * mask).sum() / (loss.size(0) * max_completion_length)


# How each loss type turns per-token losses into one number.
#   grpo:    mean over each sequence's tokens, then over sequences (long completions weigh less per token)
#   bnpo:    mean over all tokens of this batch
#   dapo:    sum over tokens / tokens in the whole generation batch on all processes (`num_items_in_batch`,
#            already divided by the number of processes); in one process without accumulation, = bnpo
#   dr_grpo: sum over tokens / (batch size * max_completion_length), a constant: no length bias
NORMALIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _per_sequence_mean,
    "bnpo": _token_mean,
    "dapo": _generation_batch_token_mean,
    "dr_grpo": _batch_times_max_length,
}


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, *, loss_type: LossType = "dapo",
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              max_completion_length: int | None = None,
              num_items_in_batch: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of TRL 1.16's `GRPOTrainer._compute_loss` (token-level importance sampling).

    Per token, with r = exp(logp - old_logp) and A the completion's advantage:
        loss = -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A) + beta * r * KL
    where KL = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator), multiplied by r as TRL's default
    `use_bias_correction_kl=True` does (it makes the KL gradient the unbiased reverse-KL gradient).
    `old_logps=None` means on-policy (one iteration per batch): r = 1 in value, but carries the gradient.
    The per-token losses are masked and reduced by `NORMALIZERS[loss_type]`.

    Shapes: logps, old_logps, ref_logps, completion_mask (B, T); advantages (B,).
    Returns the loss and detached metrics: `kl` (masked token mean; only with beta > 0) and
    `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (share of tokens where clipping
    took the gradient away).
    """
    if loss_type not in NORMALIZERS:
        raise ValueError(f"loss_type: expected one of {', '.join(NORMALIZERS)}, got {loss_type!r}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    advantages = advantages.unsqueeze(1)  # (B, 1)

    ratio = torch.exp(logps - old_logps)  # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        delta = ref_logps - logps
        per_token_kl = (torch.exp(delta) - delta - 1) * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)

    loss = NORMALIZERS[loss_type](per_token_loss, mask, max_completion_length=max_completion_length,
                                  num_items_in_batch=num_items_in_batch)

    low = (ratio < 1 - epsilon) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    metrics["clip_ratio/low_mean"] = _masked_mean(low.to(mask.dtype), mask)
    metrics["clip_ratio/high_mean"] = _masked_mean(high.to(mask.dtype), mask)
    metrics["clip_ratio/region_mean"] = _masked_mean((low | high).to(mask.dtype), mask)
    return loss, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()
