"""The GRPO math against hand-computed values: advantages, the clipped loss, KL, and each normalizer."""

from __future__ import annotations

import math

import pytest
import torch

from prefill_kit.backends.builtin import combine_rewards, compute_advantages, grpo_loss, token_logps
from prefill_kit.backends.builtin.advantages import nanstd

EPS = 1e-4  # TRL's std epsilon
NAN = float("nan")


# ------------------------------------------------------------------------------------------- advantages


def test_group_advantages_use_bessel_std_and_zero_out_flat_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = compute_advantages(rewards, num_generations=4)
    # group 1: mean 0.25; Bessel variance (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
    expected_first = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + EPS)
    torch.testing.assert_close(adv[:4], expected_first)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: no signal, not NaN


@pytest.mark.parametrize(("scale", "expected"), [
    ("group", [-1 / (math.sqrt(2) + EPS), 1 / (math.sqrt(2) + EPS), 0.0, 0.0]),
    # batch std over [0, 2, 1, 1]: mean 1, Bessel variance 2/3
    ("batch", [-1 / (math.sqrt(2 / 3) + EPS), 1 / (math.sqrt(2 / 3) + EPS), 0.0, 0.0]),
    ("none", [-1.0, 1.0, 0.0, 0.0]),
])
def test_scale_rewards(scale, expected):
    adv = compute_advantages(torch.tensor([0.0, 2.0, 1.0, 1.0]), num_generations=2, scale_rewards=scale)
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_none_rewards_are_skipped_and_unscorable_rows_get_zero_advantage():
    # two reward functions, weights 1 and 2; NaN stands for a reward that returned None
    per_func = torch.tensor([[NAN, NAN], [1.0, NAN], [0.0, 1.0], [NAN, 0.0]])
    totals = combine_rewards(per_func, torch.tensor([1.0, 2.0]))
    assert math.isnan(totals[0])  # every reward None: unscorable, not 0
    assert totals[1:].tolist() == [1.0, 2.0, 0.0]  # NaN-aware weighted sum
    adv = compute_advantages(totals, num_generations=2)
    # group 1 has one scorable row: its std is undefined, so no advantage for either row
    assert adv[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(adv[2:], torch.tensor([1.0, -1.0]) / (math.sqrt(2) + EPS))


def test_nanstd_matches_trl():
    from trl.trainer.utils import nanstd as trl_nanstd

    x = torch.tensor([[1.0, NAN, 3.0, 7.0], [NAN, NAN, 2.0, 5.0], [4.0, NAN, NAN, NAN]])
    torch.testing.assert_close(nanstd(x, dim=1), trl_nanstd(x, dim=1), equal_nan=True)
    torch.testing.assert_close(nanstd(x), trl_nanstd(x))


def test_advantages_reject_a_batch_that_splits_a_group():
    with pytest.raises(ValueError, match="multiple of 4"):
        compute_advantages(torch.zeros(6), num_generations=4)


# ------------------------------------------------------------------------------------------------- loss


def _batch():
    """Two completions; row 0 has 2 real tokens + 1 padding, row 1 has 3 tokens.

    Ratios r = exp(logp - old): row 0 (A = +1): 1.1 (inside), 1.5 (above 1 + eps), 3.0 (padding);
    row 1 (A = -1): 0.5 (below 1 - eps), 0.9 (inside), 1.3 (above, but A < 0 so the unclipped term wins).
    """
    old = torch.full((2, 3), -1.0)
    ratios = torch.tensor([[1.1, 1.5, 3.0], [0.5, 0.9, 1.3]])
    logps = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    return logps, old, advantages, mask


# per-token losses -min(rA, clip(r)A): row 0: -1.1, -1.2 (clipped); row 1: 0.8 (clipped), 0.9, 1.3
@pytest.mark.parametrize(("loss_type", "kwargs", "expected"), [
    ("grpo", {}, ((-1.1 - 1.2) / 2 + (0.8 + 0.9 + 1.3) / 3) / 2),
    ("bnpo", {}, (-2.3 + 3.0) / 5),
    ("dapo", {}, (-2.3 + 3.0) / 5),
    ("dapo", {"num_items_in_batch": 10}, (-2.3 + 3.0) / 10),
    ("bnpo", {"num_items_in_batch": 10}, (-2.3 + 3.0) / 5),  # bnpo always normalizes by its own tokens
    ("dr_grpo", {"max_completion_length": 4}, (-2.3 + 3.0) / (2 * 4)),
])
def test_loss_normalizers(loss_type, kwargs, expected):
    logps, old, adv, mask = _batch()
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type=loss_type, epsilon=0.2, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert "kl" not in metrics
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)


def test_clipped_tokens_and_padding_get_no_gradient():
    logps, old, adv, mask = _batch()
    loss, _ = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", epsilon=0.2)
    loss.backward()
    # d(-rA)/dlogp = -rA, over 5 tokens; clipped tokens and padding: exactly 0
    expected = torch.tensor([[-1.1, 0.0, 0.0], [0.0, 0.9, 1.3]]) / 5
    torch.testing.assert_close(logps.grad, expected)


def test_epsilon_high_widens_only_the_upper_bound():
    logps, old, adv, mask = _batch()
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.6)
    # row 0 token 1: r = 1.5 is now inside [0.8, 1.6] -> -1.5; row 1 token 0 still clipped low at 0.8
    assert loss.item() == pytest.approx((-1.1 - 1.5 + 0.8 + 0.9 + 1.3) / 5)
    assert metrics["clip_ratio/high_mean"].item() == 0.0
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)


def test_kl_is_k3_times_the_ratio():
    logps, old, adv, mask = _batch()
    delta = torch.zeros(2, 3)
    delta[1, 1] = math.log(2.0)  # ref - logp = ln 2 on one token, 0 elsewhere (where k3 = 0)
    ref = logps.detach() + delta
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, loss_type="bnpo", epsilon=0.2, beta=0.5)
    k3 = 2.0 - math.log(2.0) - 1.0  # exp(d) - d - 1
    kl_token = k3 * 0.9  # times that token's ratio (TRL's use_bias_correction_kl)
    assert metrics["kl"].item() == pytest.approx(kl_token / 5)
    assert loss.item() == pytest.approx((-2.3 + 3.0 + 0.5 * kl_token) / 5)


def test_on_policy_ratio_is_one_but_carries_the_gradient():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, metrics = grpo_loss(logps, None, None, adv, torch.ones(2, 2), loss_type="dapo")
    assert loss.item() == pytest.approx(-(2 * 2 - 1 * 2) / 4)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]) / 4)
    assert metrics["clip_ratio/region_mean"].item() == 0.0


def test_token_logps_divide_logits_by_temperature():
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)]]])  # at T=2: [0, ln 3] -> p = [1/4, 3/4]
    out = token_logps(logits, torch.tensor([[1]]), temperature=2.0)
    assert out.item() == pytest.approx(math.log(0.75))


def test_unknown_loss_type_is_rejected():
    logps, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, old, None, adv, mask, loss_type="ppo")
