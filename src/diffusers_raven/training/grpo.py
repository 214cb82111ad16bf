"""GRPO on video rollouts: rewards, group advantages and the policy losses (METHOD.md §6, §8).

The pieces CM-GRPO and its Flow-GRPO baseline share: several reward functions' scores are aggregated into one
reward per video (:func:`aggregate_rewards`), standardised inside each prompt group (:func:`group_advantages`) and
turned into a policy loss, either CM-GRPO's stop-gradient regression on the consistency step's Gaussian kernel
(:func:`cm_grpo_loss`, mirroring :func:`~diffusers_raven.training.dmd_loss`) or the PPO clipped ratio on recorded
log-probabilities (:func:`ppo_clip_loss`, for ``num_iterations > 1`` and for the Flow-GRPO kernel). An optional KL
to a reference policy at the same state is :func:`reference_kl` / :func:`reference_kl_loss`.

Missing scores are NaN throughout: a reward function that returns ``None`` for a video is written as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .chunk_weights import weighted_mean

__all__ = [
    "aggregate_rewards",
    "cm_grpo_loss",
    "group_advantages",
    "ppo_clip_loss",
    "reference_kl",
    "reference_kl_loss",
]

AGGREGATIONS = ("normalize_then_sum", "sum_then_normalize")
SCALE_REWARDS = ("group", "batch", "none")


# ---------------------------------------------------------------------------------------------- input checks
def _float_tensor(name: str, value: torch.Tensor, ndim: int, allow_nan: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {type(value).__name__}.")
    if value.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {tuple(value.shape)}.")
    if value.shape[0] == 0:
        raise ValueError(f"`{name}` is empty.")
    bad = torch.isinf(value) if allow_nan else ~torch.isfinite(value)
    if bool(bad.any()):
        raise ValueError(f"`{name}` must be finite{' or NaN' if allow_nan else ''}.")
    return value


def _group_index(group_ids: torch.Tensor | Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unique ids [G], index [N] of each sample's group in 0..G-1)``."""
    ids = torch.as_tensor(group_ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.shape != (n,):
        raise ValueError(
            f"`group_ids` must be {n} integer ids (one per sample), got {ids.dtype} of shape {tuple(ids.shape)}."
        )
    unique, index = torch.unique(ids, sorted=True, return_inverse=True)
    return unique, index


def _group_stats(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, ...]:
    """Per-group ``(mean, biased std, count, constant)`` over the non-NaN ``values`` [N] (float64).

    ``constant`` marks groups whose scores are all equal (or that have none); their std is exactly 0. A group with
    no score has mean NaN.
    """
    valid = ~torch.isnan(values)
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    count = zeros.index_add(0, index, valid.double())
    mean = zeros.index_add(0, index, torch.where(valid, values, 0.0)) / count
    deviation = torch.where(valid, values - mean[index], 0.0)
    std = (zeros.index_add(0, index, deviation.square()) / count).sqrt()
    inf = torch.full_like(zeros, math.inf)
    high = (-inf).scatter_reduce(0, index, torch.where(valid, values, -math.inf), "amax")
    low = inf.scatter_reduce(0, index, torch.where(valid, values, math.inf), "amin")
    constant = ~(high > low)
    return mean, torch.where(constant, 0.0, std), count, constant


def _sigma_column(sigma_next: torch.Tensor | float, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """``σ'`` as a float64 ``[B, 1, …, 1]`` column, checked to lie in (0, 1]."""
    sigma = torch.as_tensor(sigma_next, dtype=torch.float64, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch_size)
    if sigma.shape != (batch_size,):
        raise ValueError(f"`sigma_next` must be a float or have shape ({batch_size},), got {tuple(sigma.shape)}.")
    if not bool(((sigma > 0) & (sigma <= 1)).all()):
        raise ValueError(
            f"`sigma_next` must lie in (0, 1] (σ' = 0 is the deterministic last step), got {sigma.tolist()}."
        )
    return sigma.view(batch_size, *([1] * (like.ndim - 1)))


def _check_videos(pred_original: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    if not isinstance(pred_original, torch.Tensor) or not pred_original.is_floating_point() or pred_original.ndim != 5:
        raise ValueError("`pred_original` must be a floating-point tensor of shape [B, C, F, h, w].")
    if not isinstance(other, torch.Tensor) or other.shape != pred_original.shape:
        shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
        raise ValueError(
            f"`{other_name}` must have the shape of `pred_original` {tuple(pred_original.shape)}, got {shape}."
        )


def _regression(
    pred_original: torch.Tensor,
    step: torch.Tensor,
    frame_weights: torch.Tensor | None,
    normaliser: float | None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """``scaling · Σ w (x̂0 − sg(x̂0 − step))² / normaliser``: gradient ``2 · scaling · w · step / normaliser``."""
    count = pred_original.numel()
    normaliser = float(count) if normaliser is None else float(normaliser)
    if not (math.isfinite(normaliser) and normaliser > 0):
        raise ValueError(f"`normaliser` must be a positive number, got {normaliser}.")
    if frame_weights is not None and frame_weights.numel() != pred_original.shape[2]:
        raise ValueError(
            f"`frame_weights` has {frame_weights.numel()} entries for {pred_original.shape[2]} frames (dim 2)."
        )
    x0 = pred_original.double()
    target = (x0 - step).detach()
    return weighted_mean((x0 - target).square(), frame_weights) * (scaling * count / normaliser)


# ---------------------------------------------------------------------------------------------- rewards
def aggregate_rewards(
    rewards: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    group_ids: torch.Tensor | Sequence[int],
    mode: str = "normalize_then_sum",
) -> torch.Tensor:
    """One reward per sample from ``F`` reward functions (METHOD §6, §8). Returns ``[N]`` in ``rewards``' dtype.

    Args:
        rewards: ``[N, F]`` scores, NaN where a function gave no score.
        weights: ``F`` finite weights (negative ones penalise); not all zero.
        group_ids: ``[N]`` integer prompt-group id of each sample (any ids, any group sizes ≥ 1).
        mode: ``"normalize_then_sum"``: each function's scores are z-scored inside each group (mean and biased std
            over the group's non-NaN scores; all equal, including a single score, gives 0), then
            ``Σ_f w_f z_f / Σ_f |w_f|`` with both sums over the functions that scored the sample.
            ``"sum_then_normalize"``: ``Σ_f w_f r_f`` over the functions that scored the sample (NaN terms
            skipped, TRL's ``nansum``); the normalisation is left to :func:`group_advantages`.

    NaN: a NaN score is left out of its function's group statistics and of the sample's sums. A sample that no
    function scored is NaN (drop it or let :func:`group_advantages` give it advantage 0); so, in
    ``normalize_then_sum``, is a sample scored only by zero-weight functions.
    """
    _float_tensor("rewards", rewards, ndim=2, allow_nan=True)
    weights = torch.as_tensor(weights, dtype=torch.float64, device=rewards.device)
    if weights.shape != (rewards.shape[1],) or not bool(torch.isfinite(weights).all()) or not bool(weights.any()):
        raise ValueError(
            f"`weights` must be {rewards.shape[1]} finite numbers (one per reward function), not all zero; "
            f"got {weights.tolist()}."
        )
    if mode not in AGGREGATIONS:
        raise ValueError(f"`mode` must be one of {list(AGGREGATIONS)}, got {mode!r}.")
    unique, index = _group_index(group_ids, rewards.shape[0])
    values = rewards.double()
    scored = ~torch.isnan(values)
    if mode == "normalize_then_sum":
        columns = []
        for f in range(values.shape[1]):
            mean, std, _, constant = _group_stats(values[:, f], index, len(unique))
            z = torch.where(constant[index], 0.0, (values[:, f] - mean[index]) / std[index])
            columns.append(torch.where(scored[:, f], z, math.nan))
        values = torch.stack(columns, dim=1)
    total = torch.where(scored, values * weights, 0.0).sum(dim=1)
    if mode == "normalize_then_sum":
        total = total / torch.where(scored, weights.abs(), 0.0).sum(dim=1)  # 0/0 → NaN: nothing weighted scored
    total = torch.where(scored.any(dim=1), total, math.nan)
    return total.to(rewards.dtype)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[int],
    scale_rewards: str = "group",
    std_floor: float = 1e-4,
    eps: float = 1e-5,
    clip: float | None = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages ``A = (r − mean_group) / (max(std, std_floor) + eps)``, clipped to ``±clip`` (METHOD §6).

    ``std`` is the biased (population) std of the sample's group (``scale_rewards="group"``) or of the whole
    batch (``"batch"``); ``"none"`` keeps ``r − mean_group``. ``clip=None`` does not clip. Pass the rewards of every
    process (full groups). A group whose rewards are all equal gets exactly 0.

    NaN rewards (unscored samples) are left out of every mean and std and get advantage 0.

    Returns ``(advantages [N], stats)`` with ``stats``: ``group_ids`` (the sorted unique ids ``[G]``),
    ``group_mean``, ``group_std`` (biased, over scored samples; 0 for a constant group), ``group_count`` (scored
    samples per group) and ``frac_reward_zero_std``: the fraction of groups whose rewards are all equal (a group
    with fewer than two scored samples counts), i.e. groups that carry no learning signal; it always uses the
    group std, whatever ``scale_rewards``.
    """
    _float_tensor("rewards", rewards, ndim=1, allow_nan=True)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"`scale_rewards` must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}.")
    if not (math.isfinite(std_floor) and std_floor >= 0):
        raise ValueError(f"`std_floor` must be a non-negative number, got {std_floor}.")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"`eps` must be a non-negative number, got {eps}.")
    if clip is not None and not clip > 0:
        raise ValueError(f"`clip` must be positive or None, got {clip}.")
    unique, index = _group_index(group_ids, rewards.shape[0])
    values = rewards.double()
    mean, std, count, constant = _group_stats(values, index, len(unique))
    centred = torch.where(constant[index], 0.0, values - mean[index])
    if scale_rewards != "none":
        if scale_rewards == "batch":
            scale = _group_stats(values, torch.zeros_like(index), 1)[1].expand(len(unique))
        else:
            scale = std
        centred = centred / (scale.clamp_min(std_floor) + eps)[index]
    advantages = torch.nan_to_num(centred, nan=0.0)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    stats = {
        "group_ids": unique,
        "group_mean": mean,
        "group_std": std,
        "group_count": count,
        "frac_reward_zero_std": constant.double().mean(),
    }
    return advantages.to(rewards.dtype), stats


# ---------------------------------------------------------------------------------------------- policy losses
def cm_grpo_loss(
    pred_original: torch.Tensor,
    next_sample: torch.Tensor,
    sigma_next: torch.Tensor | float,
    advantages: torch.Tensor,
    frame_weights: torch.Tensor | None = None,
    policy_loss_scaling: float = 100.0,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CM-GRPO's surrogate for the consistency step ``x_{σ_k} → x' = x_{σ_{k+1}}`` (METHOD §6, §1).

    The step is the kernel ``N(x'; μ_θ, σ'² I)`` with ``μ_θ = (1 − σ') x̂0_θ``. With
    ``c = −½ A (1 − σ') sg(x' − μ_θ) / σ'²``,
    ``L = policy_loss_scaling · Σ_elements w (x̂0_θ − sg(x̂0_θ − c))² / normaliser``, so
    ``∂L/∂x̂0_θ = −A · ∂ log N(x'; μ_θ, σ'² I)/∂x̂0_θ · w · policy_loss_scaling / normaliser``.

    Args:
        pred_original: ``x̂0_θ`` ``[B, C, F, h, w]``, carrying the graph (recomputed from the recorded ``x_{σ_k}``).
        next_sample: the recorded ``x'`` (same shape), treated as a constant.
        sigma_next: ``σ' ∈ (0, 1]``, a float or ``[B]``.
        advantages: ``[B]`` (from :func:`group_advantages`).
        frame_weights: ``[F]`` per-frame chunk weights of METHOD §4 (mean element weight 1), or None.
        policy_loss_scaling: the loss scale (100 in RAVEN's reference code, the default).
        normaliser: the divisor (default: the element count of ``pred_original``, i.e. a mean).

    The value is ``policy_loss_scaling · Σ w c² / normaliser``: the weighted mean squared size of the step the
    regression asks of ``x̂0`` (like DMD's ``½‖grad‖²``). It is ≥ 0 whatever the sign of ``A`` and is not a
    policy objective; log ``stats["log_prob"]`` to follow the policy. ``stats``: ``log_prob`` ``[B]``, the mean
    over elements of ``log N(x'; μ_θ, σ'² I)`` (detached, float64; the reduction Flow-GRPO records for PPO
    ratios), and ``z_rms`` ``[B]``, the root mean square of ``(x' − μ_θ)/σ'``: close to 1 on-policy, when the
    recomputed ``x̂0`` matches the rollout's. Computed in float64; the loss is returned in ``pred_original``'s dtype.
    """
    _check_videos(pred_original, next_sample, "next_sample")
    batch = pred_original.shape[0]
    _float_tensor("advantages", advantages, ndim=1)
    if advantages.shape != (batch,):
        raise ValueError(f"`advantages` must have shape ({batch},), got {tuple(advantages.shape)}.")
    if not (math.isfinite(policy_loss_scaling) and policy_loss_scaling > 0):
        raise ValueError(f"`policy_loss_scaling` must be a positive number, got {policy_loss_scaling}.")
    sigma = _sigma_column(sigma_next, batch, pred_original)
    residual = (next_sample.double() - (1 - sigma) * pred_original.detach().double()) / sigma  # (x' − μ)/σ'
    c = -0.5 * advantages.detach().to(sigma).view_as(sigma) * (1 - sigma) * residual / sigma
    loss = _regression(pred_original, c, frame_weights, normaliser, float(policy_loss_scaling))
    dims = tuple(range(1, pred_original.ndim))
    log_prob = (-0.5 * residual.square() - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(dim=dims)
    stats = {"log_prob": log_prob, "z_rms": residual.square().mean(dim=dims).sqrt()}
    return loss.to(pred_original.dtype), stats


def reference_kl(
    pred_original: torch.Tensor, ref_pred_original: torch.Tensor, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """Per-sample ``KL = (1 − σ')² ‖x̂0_θ − x̂0_ref‖² / (2σ'²)`` between the policy's and the reference's kernels at
    the same state (same ``σ'``; METHOD §1, §6). Returns ``[B]`` float64, differentiable in ``pred_original``."""
    _check_videos(pred_original, ref_pred_original, "ref_pred_original")
    sigma = _sigma_column(sigma_next, pred_original.shape[0], pred_original)
    difference = (1 - sigma) * (pred_original.double() - ref_pred_original.detach().double()) / sigma
    return 0.5 * difference.square().sum(dim=tuple(range(1, pred_original.ndim)))


def reference_kl_loss(
    pred_original: torch.Tensor,
    ref_pred_original: torch.Tensor,
    sigma_next: torch.Tensor | float,
    frame_weights: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop-gradient form of :func:`reference_kl`, weighted and normalised like :func:`cm_grpo_loss`.

    ``L = Σ w (x̂0_θ − sg(x̂0_θ − g))² / normaliser`` with ``g = ½ (1 − σ')² (x̂0_θ − x̂0_ref) / σ'²``, so
    ``∂L/∂x̂0_θ = w · ∂KL/∂x̂0_θ / normaliser`` (per element). Multiply by ``β`` in the trainer (``β = 0`` in the
    paper). Returns ``(loss, kl)`` with ``kl`` the detached per-sample :func:`reference_kl` ``[B]`` to log.
    """
    _check_videos(pred_original, ref_pred_original, "ref_pred_original")
    sigma = _sigma_column(sigma_next, pred_original.shape[0], pred_original)
    difference = pred_original.detach().double() - ref_pred_original.detach().double()
    g = 0.5 * (1 - sigma).square() * difference / sigma.square()
    loss = _regression(pred_original, g, frame_weights, normaliser)
    kl = reference_kl(pred_original.detach(), ref_pred_original, sigma_next)
    return loss.to(pred_original.dtype), kl


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate on per-sample log-probabilities, as TRL's GRPO loss (METHOD §6, ``num_iterations > 1``).

    ``ratio = exp(log_prob − old_log_prob)``; loss ``= mean_B −min(ratio·A, clip(ratio, 1 − ε_low, 1 + ε_high)·A)``.
    On-policy (``ratio = 1``) its gradient with respect to ``log_prob`` is ``−A / B``.

    Args:
        log_prob: ``[B]`` the current policy's log-probability of the recorded step (with the graph).
        old_log_prob: ``[B]`` the same under the policy that made the rollout (treated as a constant).
        advantages: ``[B]``.
        epsilon_low, epsilon_high: the clip range (``epsilon_high=None``: same as ``epsilon_low``).

    Use a per-element mean, ``GaussianTransition.log_prob(x', reduction="mean")``, for both log-probabilities
    (Flow-GRPO's convention): a sum over ~1e6 latent elements turns small changes of the mean into ratios that
    overflow. The clip range then applies to the per-element likelihood ratio (Flow-GRPO uses ε ≈ 1e-4).

    ``stats`` (TRL's names): ``clip_ratio/low_mean``, the fraction of samples with ``ratio < 1 − ε_low`` and
    ``A < 0``; ``clip_ratio/high_mean``, with ``ratio > 1 + ε_high`` and ``A > 0`` (the samples whose gradient the
    clip removes); ``clip_ratio/region_mean``, either; and ``ratio_mean``.
    """
    _float_tensor("log_prob", log_prob, ndim=1)
    for name, value in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        _float_tensor(name, value, ndim=1)
        if value.shape != log_prob.shape:
            raise ValueError(
                f"`{name}` must have the shape of `log_prob` {tuple(log_prob.shape)}, got {tuple(value.shape)}."
            )
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not 0 < epsilon_low < 1:
        raise ValueError(f"`epsilon_low` must lie in (0, 1), got {epsilon_low}.")
    if not epsilon_high > 0:
        raise ValueError(f"`epsilon_high` must be positive, got {epsilon_high}.")
    ratio = torch.exp(log_prob - old_log_prob.detach())
    advantages = advantages.detach().to(ratio.dtype)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).mean()
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).double()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).double()
    stats = {
        "clip_ratio/low_mean": low.mean(),
        "clip_ratio/high_mean": high.mean(),
        "clip_ratio/region_mean": torch.maximum(low, high).mean(),
        "ratio_mean": ratio.detach().mean(),
    }
    return loss, stats
