"""The GRPO math against hand-computed values: advantages, the clipped loss, KL, and each normalizer."""

from __future__ import annotations

import math

import pytest
import torch

from prefill_kit.backends.builtin import combine_rewards, compute_advantages, grpo_loss, token_logps
from prefill_kit.grpo.advantages import nanstd

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


# ------------------------------------------------------------------ TRL 1.16's loss family: GSPO, CISPO, SAPO, LUSPO
# The same batch as above: r = 1.1, 1.5 (row 0, A = +1, one padding token); 0.5, 0.9, 1.3 (row 1, A = -1).
LOGP = [[-1 + math.log(1.1), -1 + math.log(1.5)], [-1 + math.log(0.5), -1 + math.log(0.9), -1 + math.log(1.3)]]
W0 = math.sqrt(1.1 * 1.5)  # GSPO weight of row 0: exp(mean log-ratio) = 1.2845, above 1 + eps
W1 = (0.5 * 0.9 * 1.3) ** (1 / 3)  # row 1: 0.8363, inside [0.8, 1.2]
K3 = 2.0 - math.log(2.0) - 1.0  # k3 where ref - logp = ln 2 (row 1, token 1); 0 elsewhere


def _ref(logps):
    delta = torch.zeros(2, 3)
    delta[1, 1] = math.log(2.0)
    return logps.detach() + delta


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_cispo_clamps_the_detached_weight_so_every_token_keeps_its_gradient():
    logps, old, adv, mask = _batch()
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="cispo", epsilon_high=1.2)
    # -sg(min(r, 1.2)) * A * logp: weights 1.1, 1.2 (clamped); 0.5, 0.9, 1.2 (clamped, A < 0)
    per_token = [-1.1 * LOGP[0][0], -1.2 * LOGP[0][1], 0.5 * LOGP[1][0], 0.9 * LOGP[1][1], 1.2 * LOGP[1][2]]
    assert loss.item() == pytest.approx(sum(per_token) / 5)  # dapo's normalizer: tokens of the batch
    loss.backward()
    # d/dlogp = -w A / 5: a clamped token still learns (unlike the clipped objective), padding does not
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.1, -1.2, 0.0], [0.5, 0.9, 1.2]]) / 5)
    assert metrics["cispo_clip_ratio"].item() == pytest.approx(1 / 5)  # r = 1.5 with A > 0; 1.3 has A < 0
    assert "clip_ratio/region_mean" not in metrics and "kl" not in metrics


def test_cispo_uses_num_items_in_batch_and_the_kl_term():
    logps, old, adv, mask = _batch()
    ref = _ref(logps)
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, loss_type="cispo", epsilon_high=5.0, beta=0.5,
                              num_items_in_batch=10)
    per_token = [-1.1 * LOGP[0][0], -1.5 * LOGP[0][1], 0.5 * LOGP[1][0], 0.9 * LOGP[1][1], 1.3 * LOGP[1][2]]
    assert loss.item() == pytest.approx((sum(per_token) + 0.5 * K3 * 0.9) / 10)
    assert metrics["kl"].item() == pytest.approx(K3 * 0.9 / 5)
    assert metrics["cispo_clip_ratio"].item() == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_sapo_soft_gate(beta):
    logps, old, adv, mask = _batch()
    ref = _ref(logps) if beta else None
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, loss_type="sapo", beta=beta)
    # -sigmoid(tau (r - 1)) * 4 / tau * A, tau = 1.0 (A > 0) or 1.05 (A <= 0): TRL's default temperatures
    row0 = [-4 * _sigmoid(0.1), -4 * _sigmoid(0.5)]
    row1 = [4 / 1.05 * _sigmoid(1.05 * (r - 1)) for r in (0.5, 0.9, 1.3)]
    row1[1] += beta * K3 * 0.9
    assert loss.item() == pytest.approx((sum(row0) / 2 + sum(row1) / 3) / 2)  # grpo's normalizer
    assert ("kl" in metrics) == bool(beta)
    assert not any(k.startswith("clip_ratio") for k in metrics)  # nothing is clipped


def test_sapo_temperatures_follow_the_sign_of_the_advantage():
    logps, old, adv, mask = _batch()
    loss, _ = grpo_loss(logps, old, None, adv, mask, loss_type="sapo", sapo_temperature_pos=2.0,
                        sapo_temperature_neg=0.5)
    row0 = [-2 * _sigmoid(2 * 0.1), -2 * _sigmoid(2 * 0.5)]
    row1 = [8 * _sigmoid(0.5 * (r - 1)) for r in (0.5, 0.9, 1.3)]
    assert loss.item() == pytest.approx((sum(row0) / 2 + sum(row1) / 3) / 2)


def test_sapo_on_policy_gradient_is_the_plain_policy_gradient():
    # at r = 1 the gate's slope is sigmoid'(0) * 4 = 1: the gradient is -A per token, as for the clipped loss
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    loss, _ = grpo_loss(logps, None, None, torch.tensor([2.0, -1.0]), torch.ones(2, 2), loss_type="sapo",
                        sapo_temperature_neg=3.0)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]) / 4)


def test_sequence_level_weight_is_the_length_normalised_sequence_ratio():
    logps, old, adv, mask = _batch()
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    # row 0: W0 = 1.28 > 1.2 with A > 0 -> clipped at 1.2 (no gradient); row 1: W1 inside -> +W1
    assert loss.item() == pytest.approx((-1.2 + W1) / 2)
    loss.backward()
    # d(W1)/dlogp_t = W1 / 3 for each of row 1's tokens; the mean over 2 sequences halves it
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, 0.0], [W1 / 6] * 3]))
    # clip shares are over sequences at this level, as TRL logs them
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 2)
    assert metrics["clip_ratio/low_mean"].item() == 0.0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(1 / 2)


def test_sequence_level_inside_the_clip_region_and_with_kl():
    logps, old, adv, mask = _batch()
    ref = _ref(logps)
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, loss_type="grpo", importance_sampling_level="sequence",
                              epsilon_high=0.3, beta=0.5)
    # W0 is now inside [0.8, 1.3]; the KL token is weighted by its sequence's weight W1
    assert loss.item() == pytest.approx((-W0 + (3 * W1 + 0.5 * K3 * W1) / 3) / 2)
    assert metrics["kl"].item() == pytest.approx(K3 * W1 / 5)
    assert metrics["clip_ratio/region_mean"].item() == 0.0
    loss.backward()
    assert logps.grad[0, 0].item() == pytest.approx(-W0 / 4)  # d(-W0)/dlogp = -W0 / 2, then / 2 sequences


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_luspo_sums_each_sequence_then_averages(beta):
    logps, old, adv, mask = _batch()
    ref = _ref(logps) if beta else None
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, loss_type="luspo", importance_sampling_level="sequence",
                              beta=beta)
    # per-token loss -1.2 (row 0, clipped) and +W1 (row 1), summed over each sequence's tokens
    assert loss.item() == pytest.approx((2 * -1.2 + 3 * W1 + beta * K3 * W1) / 2, abs=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 2)


def test_luspo_at_token_level_masks_padding():
    logps, old, adv, mask = _batch()
    loss, _ = grpo_loss(logps, old, None, adv, mask, loss_type="luspo")
    assert loss.item() == pytest.approx((-2.3 + 3.0) / 2)  # padding's r = 3.0 does not count


@pytest.mark.parametrize(("loss_type", "level", "expected"), [
    ("luspo", "token", ["should be sequence to mirror the paper's setup"]),
    ("luspo", "sequence", []),
    ("grpo", "sequence", []),
    ("sapo", "sequence", []),
    ("dapo", "token", []),
    *[(t, "sequence", ["weights each sequence by its completion length"])
      for t in ("bnpo", "dr_grpo", "dapo", "cispo")],
])
def test_loss_warnings_are_trls(loss_type, level, expected):
    from prefill_kit.grpo.loss import loss_warnings

    got = loss_warnings(loss_type, level)
    assert len(got) == len(expected) and all(e in g for e, g in zip(expected, got, strict=True))


def test_unknown_importance_sampling_level_is_rejected():
    logps, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, old, None, adv, mask, importance_sampling_level="batch")


def _trl_compute_loss(logps, old, ref, adv, mask, *, loss_type, level, beta, epsilon_high, **loss_args):
    """TRL 1.16's own `GRPOTrainer._compute_loss` on these tensors: one process, no accumulation, no vLLM."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x,
                                  sync_gradients=True)
    args = SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1,
                           sapo_temperature_pos=loss_args.get("sapo_temperature_pos", 1.0),
                           sapo_temperature_neg=loss_args.get("sapo_temperature_neg", 1.05))
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=args, loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=accelerator,
        max_completion_length=4, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(2, 1, dtype=torch.long), "prompt_mask": torch.ones(2, 1),
              "completion_ids": torch.zeros(2, 3, dtype=torch.long), "completion_mask": mask.float(),
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum().float()}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items() if k != "entropy"}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_every_loss_equals_trls_own_compute_loss(loss_type, level, beta):
    """The same numbers as TRL's method itself: loss, gradient and every metric both compute."""
    epsilon_high = 1.2 if loss_type == "cispo" else 0.25
    logps, old, adv, mask = _batch()
    ref = _ref(logps) if beta else None
    ours, metrics = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                              beta=beta, epsilon=0.2, epsilon_high=epsilon_high, max_completion_length=4,
                              num_items_in_batch=mask.sum().item())
    (grad,) = torch.autograd.grad(ours, logps)
    trl_logps = logps.detach().clone().requires_grad_(True)
    theirs, trl_metrics = _trl_compute_loss(trl_logps, old, ref, adv, mask, loss_type=loss_type, level=level,
                                            beta=beta, epsilon_high=epsilon_high)
    (trl_grad,) = torch.autograd.grad(theirs, trl_logps)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(grad, trl_grad)
    shared = {k for k in trl_metrics if "_min" not in k and "_max" not in k}  # per-sequence extremes: not logged
    assert shared == set(metrics)
    for key in shared:
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-6), key
