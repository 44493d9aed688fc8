"""Rewards to advantages, as TRL 1.16's GRPOTrainer computes them (`multi_objective_aggregation="sum_then_normalize"`).

Pure tensor functions: no model, no tokenizer, no process group. The loop gathers every process's rewards
first, so a group's statistics always see all `num_generations` completions of its prompt.
"""

from __future__ import annotations

from typing import Literal

import torch

STD_EPS = 1e-4  # TRL adds this to the std, so a group whose rewards are all equal gets advantage 0, not NaN

ScaleRewards = Literal["group", "batch", "none"]


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction; NaN where fewer than two values remain."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
    return std.squeeze() if dim is None else std.squeeze(dim)


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions: (B, K), (K,) -> (B,).

    A `None` reward arrives as NaN and is skipped (NaN-aware sum). A row where *every* function returned
    None is unscorable: its total stays NaN, so it is left out of the group baseline and gets advantage 0.
    """
    total = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)  # (B,)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return total.masked_fill(unscorable, float("nan"))


def compute_advantages(rewards: torch.Tensor, num_generations: int,
                       scale_rewards: ScaleRewards = "group") -> torch.Tensor:
    """Group-relative advantages: (B,) rewards, rows grouped by prompt in blocks of `num_generations` -> (B,).

    A = r - mean(group), divided by std + 1e-4 where the std (Bessel-corrected) is the group's
    (`"group"`), the whole batch's (`"batch"`), or not at all (`"none"`, Dr. GRPO). NaN rewards (unscorable
    rows) are left out of the means and stds, and their advantage is 0.
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards: expected shape (B,) with B a multiple of {num_generations}, "
                         f"got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, num_generations)  # (B/G, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (B,)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, dim=1).repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards: expected group, batch or none, got {scale_rewards!r}")
    return torch.nan_to_num(advantages, nan=0.0)
