"""The GRPO loss family of TRL 1.16 (`GRPOTrainer._compute_loss`), formula for formula.

One importance weight (per token, or per sequence for GSPO), one per-token objective per family (the
clipped PPO objective, CISPO's clamped weight, SAPO's soft gate), a k3 KL term, and a table of normalizers.
Pure tensor functions: token log-probs in, `(loss, metrics)` out. Every tensor of shape (B, T) holds one
row per completion and one column per completion token; `completion_mask` is 1 on generated tokens
(up to and including the first EOS) and 0 on padding, so prompt and prefix tokens never get here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

LossType = Literal["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo"]
ImportanceSamplingLevel = Literal["token", "sequence"]


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


def _sequence_sum_mean(loss: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    return (loss * mask).sum(-1).mean()


# How each loss type turns per-token losses into one number.
#   grpo:    mean over each sequence's tokens, then over sequences (long completions weigh less per token)
#   bnpo:    mean over all tokens of this batch
#   dapo:    sum over tokens / tokens in the whole generation batch on all processes (`num_items_in_batch`,
#            already divided by the number of processes); in one process without accumulation, = bnpo
#   dr_grpo: sum over tokens / (batch size * max_completion_length), a constant: no length bias
#   cispo:   as dapo;  sapo: as grpo
#   luspo:   sum over each sequence's tokens, mean over sequences (a sequence weighs by its length)
NORMALIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _per_sequence_mean,
    "bnpo": _token_mean,
    "dapo": _generation_batch_token_mean,
    "dr_grpo": _batch_times_max_length,
    "cispo": _generation_batch_token_mean,
    "sapo": _per_sequence_mean,
    "luspo": _sequence_sum_mean,
}
# Loss types whose normalizer already counts the tokens of the whole accumulation window; every other
# loss is divided by gradient_accumulation_steps per micro-batch, as TRL does.
WINDOW_NORMALIZED = frozenset({"dapo", "cispo"})


def importance_log_weights(log_ratio: torch.Tensor, mask: torch.Tensor,
                           level: ImportanceSamplingLevel = "token") -> torch.Tensor:
    """log(pi / pi_old) per token (B, T), or GSPO's per sequence (B, 1): the mean of its tokens' log-ratios.

    The sequence mean makes the weight of a long and a short completion comparable (GSPO's length
    normalisation); padding does not count.
    """
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level: expected token or sequence, got {level!r}")


def _clipped_objective(coef: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, *, epsilon: float,
                       epsilon_high: float, **_) -> torch.Tensor:
    """PPO's pessimistic objective: -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A)."""
    clipped = torch.clamp(coef, 1 - epsilon, 1 + epsilon_high)
    return -torch.min(coef * advantages, clipped * advantages)


def _cispo_objective(coef: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, *, epsilon_high: float,
                     **_) -> torch.Tensor:
    """CISPO: -sg(min(w, epsilon_high)) A logp. The weight is clamped, never the gradient: every token learns."""
    return -torch.clamp(coef, max=epsilon_high).detach() * advantages * logps


def _sapo_objective(coef: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, *,
                    sapo_temperature_pos: float, sapo_temperature_neg: float, **_) -> torch.Tensor:
    """SAPO: -sigmoid(tau (w - 1)) 4 / tau A, a soft gate in place of the hard clip (tau by the sign of A)."""
    tau = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
    return -torch.sigmoid(tau * (coef - 1)) * 4 / tau * advantages


# The per-token objective of each loss type (TRL's first if/elif ladder).
OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    **dict.fromkeys(("grpo", "bnpo", "dr_grpo", "dapo", "luspo"), _clipped_objective),
    "cispo": _cispo_objective,
    "sapo": _sapo_objective,
}


def loss_warnings(loss_type: str, importance_sampling_level: str) -> list[str]:
    """The combinations GRPOTrainer warns about, with TRL 1.16's reasons (its wording)."""
    out = []
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        out.append("grpo.loss_type luspo: grpo.importance_sampling_level should be sequence to mirror the "
                   "paper's setup")
    if importance_sampling_level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        out.append(f"grpo.importance_sampling_level sequence: the {loss_type} loss sums per-token contributions, "
                   "which effectively weights each sequence by its completion length instead of optimizing the "
                   "per-sequence objective; to reproduce the GSPO paper's setup, set grpo.loss_type to grpo")
    return out


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, *, loss_type: LossType = "dapo",
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              importance_sampling_level: ImportanceSamplingLevel = "token", sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, max_completion_length: int | None = None,
              num_items_in_batch: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of TRL 1.16's `GRPOTrainer._compute_loss`, defaults included.

    With w the importance weight (`importance_log_weights`: per token, or GSPO's per sequence, broadcast
    over the tokens) and A the completion's advantage, the per-token loss is `OBJECTIVES[loss_type]`:
        grpo, bnpo, dr_grpo, dapo, luspo: -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A)
        cispo: -sg(min(w, epsilon_high)) A logp      (epsilon_high is the clamp itself, not 1 + it)
        sapo:  -sigmoid(tau (w - 1)) 4 / tau A       (tau = sapo_temperature_pos if A > 0, else _neg)
    plus beta * w * KL, where KL = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator) and the factor w is
    TRL's default `use_bias_correction_kl=True` (it makes the KL gradient the unbiased reverse-KL gradient).
    `old_logps=None` means on-policy (one iteration per batch): w = 1 in value, but carries the gradient.
    The per-token losses are masked and reduced by `NORMALIZERS[loss_type]`.

    Shapes: logps, old_logps, ref_logps, completion_mask (B, T); advantages (B,).
    Returns the loss and detached metrics, as TRL logs them: `kl` (masked token mean; only with beta > 0);
    for the clipped family `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (share of
    tokens, or of sequences at sequence level, where clipping took the gradient away); for cispo
    `cispo_clip_ratio` (share where the weight was clamped with A > 0); sapo clips nothing.
    """
    if loss_type not in NORMALIZERS:
        raise ValueError(f"loss_type: expected one of {', '.join(NORMALIZERS)}, got {loss_type!r}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    advantages = advantages.unsqueeze(1)  # (B, 1)

    coef = torch.exp(importance_log_weights(logps - old_logps, mask, importance_sampling_level))  # (B, T) or (B, 1)
    per_token_loss = OBJECTIVES[loss_type](coef, logps, advantages, epsilon=epsilon, epsilon_high=epsilon_high,
                                           sapo_temperature_pos=sapo_temperature_pos,
                                           sapo_temperature_neg=sapo_temperature_neg)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        delta = ref_logps - logps
        per_token_kl = (torch.exp(delta) - delta - 1) * coef  # (B, T)
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)

    loss = NORMALIZERS[loss_type](per_token_loss, mask, max_completion_length=max_completion_length,
                                  num_items_in_batch=num_items_in_batch)

    per_sequence = importance_sampling_level == "sequence"
    if OBJECTIVES[loss_type] is _clipped_objective:
        low = (coef < 1 - epsilon) & (advantages < 0)
        high = (coef > 1 + epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = _share(low, mask, per_sequence)
        metrics["clip_ratio/high_mean"] = _share(high, mask, per_sequence)
        metrics["clip_ratio/region_mean"] = _share(low | high, mask, per_sequence)
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _share((coef > epsilon_high) & (advantages > 0), mask, per_sequence)
    return loss, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def _share(flags: torch.Tensor, mask: torch.Tensor, per_sequence: bool) -> torch.Tensor:
    """The share of tokens flagged; at sequence level (one flag per sequence) the share of sequences, as TRL."""
    flags = flags.to(mask.dtype)
    return flags.mean().detach() if per_sequence else _masked_mean(flags, mask)
