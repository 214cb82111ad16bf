"""GRPO pieces against hand computations (statistics, numpy), torch.distributions and autograd through
GaussianTransition.log_prob."""

import math
import statistics

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusers_raven import GaussianTransition
from diffusers_raven.training import (
    aggregate_rewards,
    cm_grpo_loss,
    frame_weights,
    group_advantages,
    ppo_clip_loss,
    reference_kl,
    reference_kl_loss,
)

NAN = float("nan")


# ---------------------------------------------------------------------------------------------- rewards
REWARDS = [  # 8 samples, 2 reward functions; NaN = no score
    [1.0, 0.1],
    [4.0, 0.3],
    [3.0, 0.1],
    [NAN, NAN],  # no score at all
    [2.0, 0.1],
    [7.0, NAN],
    [0.5, 0.9],
    [NAN, 0.4],
]
GROUPS = [5, 2, 5, 2, 5, 9, 2, 9]  # group 2: samples 1, 3, 6; group 5: 0, 2, 4 (column 1 constant); group 9: 5, 7
WEIGHTS = [2.0, -0.5]


def _hand_normalize_then_sum(rewards, groups, weights):
    out = []
    for i, row in enumerate(rewards):
        numerator, denominator = 0.0, 0.0
        for f, value in enumerate(row):
            if math.isnan(value):
                continue
            scores = [
                rewards[j][f] for j in range(len(rewards)) if groups[j] == groups[i] and not math.isnan(rewards[j][f])
            ]
            if len(set(scores)) == 1:
                z = 0.0
            else:
                z = (value - statistics.fmean(scores)) / statistics.pstdev(scores)
            numerator += weights[f] * z
            denominator += abs(weights[f])
        out.append(numerator / denominator if denominator > 0 else NAN)
    return out


def test_normalize_then_sum_by_hand():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    got = aggregate_rewards(rewards, WEIGHTS, torch.tensor(GROUPS), mode="normalize_then_sum")
    expected = _hand_normalize_then_sum(REWARDS, GROUPS, WEIGHTS)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-12, atol=1e-12)
    assert math.isnan(got[3].item())  # no score
    # group 5's second function is constant (0.1 three times): it contributes 0 but still counts in Σ|w|
    z = (1.0 - 2.0) / statistics.pstdev([1.0, 3.0, 2.0])
    assert got[0].item() == pytest.approx(2.0 * z / 2.5)
    # sample 5 is its group's only scored sample of function 0 and unscored by function 1: 0
    assert got[5].item() == 0.0


def test_normalize_then_sum_zero_weight_only_sample_is_nan():
    rewards = torch.tensor([[1.0, NAN], [2.0, NAN], [NAN, 3.0], [NAN, 5.0]])
    got = aggregate_rewards(rewards, [0.0, 1.0], [0, 0, 0, 0], mode="normalize_then_sum")
    assert math.isnan(got[0].item()) and math.isnan(got[1].item())
    assert got[2:].tolist() == [-1.0, 1.0]


def test_sum_then_normalize_is_nansum_by_hand():
    rewards = np.array(REWARDS)
    got = aggregate_rewards(torch.tensor(REWARDS, dtype=torch.float64), WEIGHTS, GROUPS, mode="sum_then_normalize")
    expected = np.nansum(rewards * np.array(WEIGHTS), axis=1)
    expected[np.isnan(rewards).all(axis=1)] = np.nan
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got[7].item() == pytest.approx(-0.5 * 0.4)


# ---------------------------------------------------------------------------------------------- advantages
ADV_REWARDS = [1.0, 3.0, 2.0, 5.0, 0.0, 4.0, NAN, 3.0, 1e-6, 0.5, NAN, 9.0, NAN, 2.5, 0.2]
ADV_GROUPS = [0, 1, 0, 2, 3, 0, 0, 1, 3, 4, 5, 4, 5, 4, 4]
# group 0: 1, 2, 4 (+ NaN); 1: constant 3, 3; 2: one sample; 3: std 5e-7 (the floor acts); 4: 0.5, 9, 2.5, 0.2;
# 5: no score


def _hand_advantages(rewards, groups, scale, std_floor, eps, clip):
    scored = [r for r in rewards if not math.isnan(r)]
    out = []
    for r, g in zip(rewards, groups, strict=True):
        members = [x for x, h in zip(rewards, groups, strict=True) if h == g and not math.isnan(x)]
        if math.isnan(r) or len(set(members)) == 1:
            out.append(0.0)
            continue
        a = r - statistics.fmean(members)
        if scale != "none":
            std = statistics.pstdev(members) if scale == "group" else statistics.pstdev(scored)
            a /= max(std, std_floor) + eps
        if clip is not None:
            a = min(max(a, -clip), clip)
        out.append(a)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("clip", [5.0, 1.2, None])
def test_group_advantages_by_hand(scale, clip):
    rewards = torch.tensor(ADV_REWARDS, dtype=torch.float64)
    got, stats = group_advantages(rewards, torch.tensor(ADV_GROUPS), scale_rewards=scale, clip=clip)
    expected = _hand_advantages(ADV_REWARDS, ADV_GROUPS, scale, 1e-4, 1e-5, clip)
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-12, atol=1e-15)
    assert not torch.isnan(got).any()
    assert stats["group_ids"].tolist() == [0, 1, 2, 3, 4, 5]
    means, stds, counts = [], [], []
    for g in range(6):
        members = [x for x, h in zip(ADV_REWARDS, ADV_GROUPS, strict=True) if h == g and not math.isnan(x)]
        counts.append(len(members))
        means.append(statistics.fmean(members) if members else NAN)
        stds.append(statistics.pstdev(members) if len(set(members)) > 1 else 0.0)
    np.testing.assert_allclose(stats["group_mean"].numpy(), means, rtol=1e-12)
    np.testing.assert_allclose(stats["group_std"].numpy(), stds, rtol=1e-12)
    assert stats["group_count"].tolist() == counts
    assert stats["frac_reward_zero_std"].item() == pytest.approx(3 / 6)  # groups 1, 2 and 5


def test_group_advantages_floor_and_clip_act():
    rewards = torch.tensor([0.0, 1e-6] + [0.0] * 29 + [1.0], dtype=torch.float64)
    groups = [0, 0] + [1] * 30
    got, _ = group_advantages(rewards, groups)
    assert got[:2].tolist() == pytest.approx([-5e-7 / 1.1e-4, 5e-7 / 1.1e-4])  # std 5e-7 floored to 1e-4
    assert got[-1].item() == 5.0  # sqrt(29) ≈ 5.39 clipped
    unclipped, _ = group_advantages(rewards, groups, clip=None)
    values = [0.0] * 29 + [1.0]
    expected = (1.0 - statistics.fmean(values)) / (statistics.pstdev(values) + 1e-5)
    assert unclipped[-1].item() == pytest.approx(expected, rel=1e-12) and expected > 5


def test_aggregate_then_advantages_float32_keeps_dtype():
    rewards = torch.tensor(REWARDS, dtype=torch.float32)
    reward = aggregate_rewards(rewards, WEIGHTS, GROUPS, mode="sum_then_normalize")
    advantages, _ = group_advantages(reward, GROUPS)
    assert reward.dtype == advantages.dtype == torch.float32
    assert advantages[3].item() == 0.0


# ---------------------------------------------------------------------------------------------- CM-GRPO surrogate
def _step(seed=0, shape=(2, 3, 6, 4, 4), on_policy=False, sigma=0.8333):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    if on_policy:
        x_next = (1 - sigma) * x0 + sigma * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        x_next = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0.requires_grad_(True), x_next


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("per_sample_sigma", [False, True])
@pytest.mark.parametrize("scaling, normaliser", [(100.0, None), (1.0, 7.0)])
def test_cm_grpo_gradient_is_minus_advantage_times_log_prob_gradient(weighted, per_sample_sigma, scaling, normaliser):
    x0, x_next = _step()
    advantages = torch.tensor([1.3, -0.7], dtype=torch.float64)
    sigma = torch.tensor([0.8333, 0.625], dtype=torch.float64) if per_sample_sigma else 0.9375
    weights = frame_weights([3, 3], -1.0) if weighted else None
    loss, _ = cm_grpo_loss(x0, x_next, sigma, advantages, weights, policy_loss_scaling=scaling, normaliser=normaliser)
    (grad,) = torch.autograd.grad(loss, x0)

    # independent: autograd through the Gaussian kernel's log-likelihood
    s = sigma.view(2, 1, 1, 1, 1) if per_sample_sigma else sigma
    x0_ref = x0.detach().clone().requires_grad_(True)
    log_prob = GaussianTransition(mean=(1 - s) * x0_ref, std=s).log_prob(x_next, reduction="none")
    w = weights.view(1, 1, 6, 1, 1) if weighted else torch.ones(())
    n = x0.numel() if normaliser is None else normaliser
    objective = (-advantages.view(2, 1, 1, 1, 1) * w * log_prob).sum() * scaling / n
    (expected,) = torch.autograd.grad(objective, x0_ref, retain_graph=True)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)

    # the value: scaling · Σ w c² / n with 2c = −A ∂ log π/∂x̂0 (per element)
    (score,) = torch.autograd.grad(log_prob.sum(), x0_ref)
    c = -0.5 * advantages.view(2, 1, 1, 1, 1) * score
    assert loss.item() == pytest.approx((w * c.square()).sum().item() * scaling / n, rel=1e-10)


def test_cm_grpo_stats_against_torch_distributions():
    sigma = 0.8333
    x0, x_next = _step(shape=(2, 4, 6, 8, 8), on_policy=True, sigma=sigma)
    _, stats = cm_grpo_loss(x0, x_next, sigma, torch.tensor([1.0, -1.0], dtype=torch.float64))
    expected = Normal((1 - sigma) * x0.detach(), sigma).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(stats["log_prob"], expected)
    assert not stats["log_prob"].requires_grad
    assert torch.allclose(stats["z_rms"], torch.ones(2, dtype=torch.float64), atol=0.05)  # on-policy: N(0, 1)
    _, off = cm_grpo_loss(x0 + 5.0, x_next, sigma, torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert (off["z_rms"] > 1.3).all()  # the mean moved by one std: rms ≈ √2


def test_cm_grpo_matches_on_policy_ppo_gradient():
    # on-policy, PPO on summed log-probs has gradient −A/B ∂ log π: CM-GRPO with scaling 1 and normaliser B
    x0, x_next = _step(seed=3)
    advantages = torch.tensor([0.4, -2.0], dtype=torch.float64)
    sigma = 0.625
    loss, _ = cm_grpo_loss(x0, x_next, sigma, advantages, policy_loss_scaling=1.0, normaliser=2)
    (grad,) = torch.autograd.grad(loss, x0)
    log_prob = GaussianTransition((1 - sigma) * x0, sigma).log_prob(x_next, reduction="sum")
    ppo, _ = ppo_clip_loss(log_prob, log_prob.detach(), advantages)
    (expected,) = torch.autograd.grad(ppo, x0)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_cm_grpo_float32_graph():
    x0 = torch.randn(1, 2, 3, 2, 2, requires_grad=True)
    loss, _ = cm_grpo_loss(x0, torch.randn(1, 2, 3, 2, 2), 0.5, torch.tensor([1.0]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all()


# ---------------------------------------------------------------------------------------------- KL to a reference
@pytest.mark.parametrize("per_sample_sigma", [False, True])
def test_reference_kl_against_torch_distributions(per_sample_sigma):
    x0, ref = _step(seed=1)
    sigma = torch.tensor([0.9375, 0.625], dtype=torch.float64) if per_sample_sigma else 0.8333
    s = sigma.view(2, 1, 1, 1, 1) if per_sample_sigma else torch.tensor(sigma, dtype=torch.float64)
    got = reference_kl(x0, ref, sigma)
    normal = kl_divergence(Normal((1 - s) * x0.detach(), s), Normal((1 - s) * ref, s)).flatten(1).sum(1)
    transition = GaussianTransition((1 - s) * x0.detach(), s).kl(GaussianTransition((1 - s) * ref, s))
    torch.testing.assert_close(got.detach(), normal)
    torch.testing.assert_close(got.detach(), transition)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("normaliser", [None, 5.0])
def test_reference_kl_loss_gradient_is_the_kl_gradient(weighted, normaliser):
    x0, ref = _step(seed=2)
    sigma = torch.tensor([0.9375, 0.625], dtype=torch.float64)
    weights = frame_weights([3, 3], -1.0) if weighted else None
    loss, kl = reference_kl_loss(x0, ref, sigma, weights, normaliser)
    (grad,) = torch.autograd.grad(loss, x0)
    s = sigma.view(2, 1, 1, 1, 1)
    x0_ref = x0.detach().clone().requires_grad_(True)
    elementwise = kl_divergence(Normal((1 - s) * x0_ref, s), Normal((1 - s) * ref, s))
    w = weights.view(1, 1, 6, 1, 1) if weighted else torch.ones(())
    n = x0.numel() if normaliser is None else normaliser
    (expected,) = torch.autograd.grad((w * elementwise).sum() / n, x0_ref)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(kl, elementwise.detach().flatten(1).sum(1))
    assert not kl.requires_grad


# ---------------------------------------------------------------------------------------------- PPO clip
def test_ppo_clip_loss_by_hand():
    ratios = [0.5, 0.9, 1.0, 1.1, 1.5, 0.7, 1.3]
    adv = [-1.0, 2.0, 0.5, -3.0, 1.0, 1.0, -2.0]
    old = [-1.2, 0.3, 2.0, -0.4, 0.0, 1.1, -2.5]
    eps_low, eps_high = 0.2, 0.28
    log_prob = torch.tensor(np.log(ratios) + np.array(old), requires_grad=True)
    old_t, adv_t = torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    loss, stats = ppo_clip_loss(log_prob, old_t, adv_t, eps_low, eps_high)
    (grad,) = torch.autograd.grad(loss, log_prob)

    per_sample, expected_grad, low, high = [], [], [], []
    for r, a in zip(ratios, adv, strict=True):
        clipped = min(max(r, 1 - eps_low), 1 + eps_high)
        per_sample.append(-min(r * a, clipped * a))
        is_low, is_high = r < 1 - eps_low and a < 0, r > 1 + eps_high and a > 0
        low.append(is_low)
        high.append(is_high)
        # d(−r a)/d log r = −r a unless the clipped branch is the minimum (then it is constant)
        expected_grad.append(0.0 if (is_low or is_high) else -r * a / len(ratios))
    assert loss.item() == pytest.approx(statistics.fmean(per_sample), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-12, atol=1e-15)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(sum(low) / 7)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(sum(high) / 7)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(
        sum(a or b for a, b in zip(low, high, strict=True)) / 7
    )
    assert sum(low) == 1 and sum(high) == 1


def test_ppo_on_policy_gradient_is_minus_advantage_over_batch():
    old = torch.tensor([-0.3, 1.7, 0.2, -5.0], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5, 0.0, -2.0], dtype=torch.float64)
    log_prob = old.clone().requires_grad_(True)
    loss, stats = ppo_clip_loss(log_prob, old, adv, epsilon_low=1e-4)
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -adv / 4)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["clip_ratio/region_mean"].item() == 0.0 and stats["ratio_mean"].item() == 1.0


# ---------------------------------------------------------------------------------------------- bad input
def _video(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: aggregate_rewards(torch.tensor([[1.0, math.inf]]), [1, 1], [0]), "rewards"),
        (lambda: aggregate_rewards(torch.tensor([1.0, 2.0]), [1], [0, 0]), "rewards"),
        (lambda: aggregate_rewards(torch.ones(2, 2), [1.0], [0, 0]), "weights"),
        (lambda: aggregate_rewards(torch.ones(2, 2), [0.0, 0.0], [0, 0]), "weights"),
        (lambda: aggregate_rewards(torch.ones(2, 2), [1.0, 1.0], [0.0, 1.0]), "group_ids"),
        (lambda: aggregate_rewards(torch.ones(2, 2), [1.0, 1.0], [0]), "group_ids"),
        (lambda: aggregate_rewards(torch.ones(2, 2), [1.0, 1.0], [0, 0], mode="mean"), "mode"),
        (lambda: group_advantages(torch.ones(2), [0, 0], scale_rewards="prompt"), "scale_rewards"),
        (lambda: group_advantages(torch.ones(2), [0, 0], std_floor=-1.0), "std_floor"),
        (lambda: group_advantages(torch.ones(2), [0, 0], eps=-1.0), "eps"),
        (lambda: group_advantages(torch.ones(2), [0, 0], clip=0.0), "clip"),
        (lambda: group_advantages(torch.ones(2, 1), [0, 0]), "rewards"),
        (lambda: cm_grpo_loss(_video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 2), 0.0, torch.ones(2)), "sigma_next"),
        (
            lambda: cm_grpo_loss(_video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 2), [0.5, 0.5, 0.5], torch.ones(2)),
            "sigma_next",
        ),
        (lambda: cm_grpo_loss(_video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 1), 0.5, torch.ones(2)), "next_sample"),
        (lambda: cm_grpo_loss(_video(2, 1, 3, 2), _video(2, 1, 3, 2), 0.5, torch.ones(2)), "pred_original"),
        (lambda: cm_grpo_loss(_video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 2), 0.5, torch.ones(3)), "advantages"),
        (
            lambda: cm_grpo_loss(_video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 2), 0.5, torch.ones(2), torch.ones(4)),
            "frame_weights",
        ),
        (
            lambda: cm_grpo_loss(_video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 2), 0.5, torch.ones(2), normaliser=0),
            "normaliser",
        ),
        (
            lambda: cm_grpo_loss(
                _video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 2), 0.5, torch.ones(2), policy_loss_scaling=0
            ),
            "policy_loss_scaling",
        ),
        (lambda: reference_kl(_video(2, 1, 3, 2, 2), _video(1, 1, 3, 2, 2), 0.5), "ref_pred_original"),
        (lambda: reference_kl_loss(_video(2, 1, 3, 2, 2), _video(2, 1, 3, 2, 2), 1.5), "sigma_next"),
        (lambda: ppo_clip_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2)), "old_log_prob"),
        (lambda: ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.tensor([NAN, 0.0])), "advantages"),
        (lambda: ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), epsilon_low=1.0), "epsilon_low"),
        (lambda: ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.2, -0.1), "epsilon_high"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()
