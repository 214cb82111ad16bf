"""KVPO: routed branches, anchor-relative advantages, trajectory velocity energy and the Gibbs policy (METHOD.md §7).

The pieces of one KVPO update, in order: :func:`branch_plans` picks the older frames each branch attends to in the
routed stretch (METHOD §2, §7); the branches and an unrouted anchor are scored and :func:`anchor_advantages` /
:func:`fuse_advantages` turn the scores into one advantage per branch; each branch's recorded states are replayed
under the unrouted context and :func:`trajectory_velocity_energy` measures how far the model's velocities are from
the recorded (routed) ones; :func:`kvpo_loss` is the clipped-ratio loss on the Gibbs policy ``softmax(−E)`` over
the branches; :func:`safety_gate` skips or scales the update when no branch beats the anchor.

Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .grpo import _float_tensor

__all__ = [
    "GateDecision",
    "anchor_advantages",
    "branch_plans",
    "fuse_advantages",
    "gibbs_log_policy",
    "kvpo_loss",
    "recorded_velocity",
    "safety_gate",
    "trajectory_velocity_energy",
]

FUSIONS = ("std", "zscore", "none")
GATES = ("skip", "scale", "none")
ENERGY_SPACES = ("velocity", "x0")


def _finite(name: str, value: float, low: float = -math.inf, positive: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < low or (positive and value <= 0):
        need = "a positive number" if positive else f"a finite number ≥ {low}"
        raise ValueError(f"`{name}` must be {need}, got {value}.")
    return value


def _per_step(name: str, value: torch.Tensor) -> torch.Tensor:
    """Check a finite floating-point ``[G, P, K, …]`` tensor (branch, routed chunk, step, the chunk's elements)."""
    if not isinstance(value, torch.Tensor) or value.ndim < 4:
        raise ValueError(f"`{name}` must be a tensor of shape [G, P, K, ...] (at least 4 dimensions).")
    return _float_tensor(name, value, ndim=value.ndim)


def _spread(values: torch.Tensor) -> torch.Tensor:
    """Unbiased std of a 1-D float64 tensor; exactly 0 when its entries are all equal or it has one entry."""
    if values.numel() < 2 or not bool(values.max() > values.min()):
        return values.new_zeros(())
    return values.std(unbiased=True)


# ---------------------------------------------------------------------------------------------- branch plans
def branch_plans(
    pool: Sequence[int] | torch.Tensor,
    num_branches: int,
    num_frames: int,
    generator: torch.Generator | int,
) -> torch.Tensor:
    """The ``n`` older frames each branch attends to over a routed stretch (METHOD §2, §7). Returns ``[G, n]`` int64.

    The pool (the eligible older frame ids) is sorted, permuted once with ``torch.randperm(len(pool),
    generator=generator)``, and branch ``g`` takes the ``n`` permuted frames starting at offset
    ``g · max(1, ⌊pool / G⌋)``, reading the permutation cyclically (past its end it continues from its start).
    Each row is sorted. With ``G · n ≤ pool`` the branches are disjoint; otherwise consecutive branches share at
    most ``n − max(1, ⌊pool / G⌋)`` frames, and when ``G > pool`` branches ``g`` and ``g + pool`` are equal.

    Args:
        pool: the eligible frame ids (distinct, non-negative).
        num_branches: ``G ≥ 1``.
        num_frames: ``n``, between 1 and the pool size.
        generator: a ``torch.Generator`` (its state advances) or an integer seed (a fresh CPU generator).
    """
    ids = torch.as_tensor(pool)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.ndim != 1:
        raise ValueError(f"`pool` must be a 1-D sequence of integer frame ids, got {ids.dtype} {tuple(ids.shape)}.")
    if ids.numel() == 0 or bool((ids < 0).any()) or ids.unique().numel() != ids.numel():
        raise ValueError(f"`pool` must hold distinct non-negative frame ids, got {ids.tolist()}.")
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
        raise ValueError(f"`num_branches` must be an integer ≥ 1, got {num_branches!r}.")
    size = ids.numel()
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= size:
        raise ValueError(f"`num_frames` must be an integer between 1 and the pool size {size}, got {num_frames!r}.")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or an integer seed, got {type(generator).__name__}.")
    order = ids.sort().values.long()[torch.randperm(size, generator=generator, device=generator.device).cpu()]
    stride = max(1, size // num_branches)
    offsets = torch.arange(num_branches).unsqueeze(1) * stride + torch.arange(num_frames)
    return order[offsets % size].sort(dim=1).values


# ---------------------------------------------------------------------------------------------- advantages
def anchor_advantages(
    rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Anchor-relative advantage of each branch for one scope (local or global), METHOD §7. Returns ``[G]`` float64.

    Per reward component ``c``: ``A^c_g = (r^c_g − r^c_anchor) / (std^c + eps)`` with ``std^c`` the unbiased std of
    the ``G + 1`` scores (the branches and the anchor); a component whose scores are all equal gives 0. The
    components combine as ``Σ_c w_c A^c_g / Σ_c |w_c|`` (a weighted mean of z-scores, so the result keeps the
    scale of one component whatever the weights, as ``aggregate_rewards``' ``normalize_then_sum``).

    Args:
        rewards: ``[G]`` (one component) or ``[G, C]`` finite scores of the branches.
        anchor_rewards: the anchor's scores: a 0-d tensor or ``[1]`` for one component, else ``[C]``.
        weights: ``C`` finite weights, not all zero (default: all 1; negative ones penalise).
        eps: added to the std (1e-8).
    """
    if isinstance(rewards, torch.Tensor) and rewards.ndim == 1:
        rewards = rewards.unsqueeze(1)
    _float_tensor("rewards", rewards, ndim=2)
    components = rewards.shape[1]
    if components == 0:
        raise ValueError("`rewards` has no reward component (shape [G, 0]).")
    if not isinstance(anchor_rewards, torch.Tensor) or not anchor_rewards.is_floating_point():
        raise ValueError("`anchor_rewards` must be a floating-point tensor.")
    anchor = anchor_rewards.double().reshape(-1)
    if anchor.shape != (components,) or not bool(torch.isfinite(anchor).all()):
        raise ValueError(f"`anchor_rewards` must be {components} finite scores, got {anchor_rewards.tolist()}.")
    weights = torch.ones(components) if weights is None else weights
    weights = torch.as_tensor(weights, dtype=torch.float64, device=rewards.device)
    if weights.shape != (components,) or not bool(torch.isfinite(weights).all()) or not bool(weights.any()):
        raise ValueError(f"`weights` must be {components} finite numbers, not all zero; got {weights.tolist()}.")
    eps = _finite("eps", eps, low=0.0)
    values = rewards.double()
    total = values.new_zeros(values.shape[0])
    for c in range(components):
        spread = _spread(torch.cat([values[:, c], anchor[c : c + 1]]))
        if spread > 0:
            total = total + weights[c] * (values[:, c] - anchor[c]) / (spread + eps)
    return total / weights.abs().sum()


def fuse_advantages(
    local: torch.Tensor,
    global_: torch.Tensor,
    mode: str = "std",
    local_weight: float = 1.0,
    global_weight: float = 0.5,
    clip: float | None = 2.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """One advantage per branch from the local and global anchor-relative advantages (METHOD §7). ``[G]`` float64.

    ``mode="std"``: ``w_loc · A_loc / std(A_loc) + w_glob · A_glob / std(A_glob)`` (the anchor offset is kept);
    ``"zscore"``: ``w_loc · z(A_loc) + w_glob · z(A_glob)`` with ``z(A) = (A − mean(A)) / std(A)`` (centred on the
    branch mean: the anchor offset is dropped); ``"none"``: ``w_loc · A_loc + w_glob · A_glob``. ``std`` is the
    unbiased std over the ``G`` branches plus ``eps``; a term whose advantages are all equal (or ``G = 1``) carries
    no contrast between branches and contributes 0 in ``std`` and ``zscore``. The sum is clipped to ``±clip``
    (``None``: no clip).

    ``fuse_advantages(A_loc, A_glob, mode="none", clip=None)`` is the anchor-relative improvement that
    :func:`safety_gate` reads.
    """
    _float_tensor("local", local, ndim=1)
    _float_tensor("global_", global_, ndim=1)
    if global_.shape != local.shape:
        raise ValueError(f"`global_` must have the shape of `local` {tuple(local.shape)}, got {tuple(global_.shape)}.")
    if mode not in FUSIONS:
        raise ValueError(f"`mode` must be one of {list(FUSIONS)}, got {mode!r}.")
    local_weight = _finite("local_weight", local_weight, low=0.0)
    global_weight = _finite("global_weight", global_weight, low=0.0)
    if local_weight == global_weight == 0:
        raise ValueError("`local_weight` and `global_weight` must not both be 0.")
    if clip is not None:
        clip = _finite("clip", clip, positive=True)
    eps = _finite("eps", eps, low=0.0)

    def term(advantages: torch.Tensor) -> torch.Tensor:
        advantages = advantages.double()
        if mode == "none":
            return advantages
        spread = _spread(advantages)
        if spread == 0:
            return torch.zeros_like(advantages)
        centre = advantages.mean() if mode == "zscore" else 0.0
        return (advantages - centre) / (spread + eps)

    fused = local_weight * term(local) + global_weight * term(global_)
    return fused if clip is None else fused.clamp(-clip, clip)


# ---------------------------------------------------------------------------------------------- energy
def recorded_velocity(noisy: torch.Tensor, pred_original: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``v = (x_{σ_k} − x̂0) / σ_k`` from the recorded states and predictions ``[G, P, K, …]`` (METHOD §7, §0).

    ``sigmas`` ``[K]`` are the step sigmas (all in (0, 1]); dim 2 indexes the step. Returns float64, no graph.
    """
    _per_step("noisy", noisy)
    if not isinstance(pred_original, torch.Tensor) or pred_original.shape != noisy.shape:
        raise ValueError(f"`pred_original` must be a tensor of the shape of `noisy` {tuple(noisy.shape)}.")
    _per_step("pred_original", pred_original)
    sigma = _step_sigmas(sigmas, noisy)
    return (noisy.detach().double() - pred_original.detach().double()) / sigma


def _step_sigmas(sigmas: torch.Tensor | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``σ_k`` as a float64 ``[1, 1, K, 1, …]`` column, checked to lie in (0, 1]."""
    sigma = torch.as_tensor(sigmas, dtype=torch.float64, device=like.device)
    steps = like.shape[2]
    if sigma.shape != (steps,) or not bool(((sigma > 0) & (sigma <= 1)).all()):
        raise ValueError(f"`sigmas` must be {steps} values in (0, 1] (one per step, dim 2), got {sigma.tolist()}.")
    return sigma.view(1, 1, steps, *([1] * (like.ndim - 3)))


def trajectory_velocity_energy(
    pred_velocity: torch.Tensor,
    recorded: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    grad_steps: int | None = 2,
    space: str = "velocity",
    sigma_floor: float = 1.0,
) -> torch.Tensor:
    """Trajectory velocity energy ``E(g) = ½ Σ_b Σ_k w_k · mean‖v_θ − v‖²`` of each branch (METHOD §7). ``[G]`` float64.

    Args:
        pred_velocity: ``v_θ`` ``[G, P, K, …]`` (branch, routed chunk, step, then the chunk's elements), the
            velocities of the unrouted replay, with the graph.
        recorded: the recorded routed velocities ``v`` (same shape; see :func:`recorded_velocity`), a constant.
        sigmas: ``σ_k`` ``[K]`` in (0, 1].
        grad_steps: the gradient flows through steps ``k < grad_steps`` only (the later ones are detached); ``None``
            or a value ≥ ``K``: every step.
        space: ``"velocity"``: ``w_k = 1``. ``"x0"``: the energy of the clean-sample predictions divided by
            ``max(σ_k, sigma_floor)²``. At the same state ``x̂0_θ − x̂0 = −σ_k (v_θ − v)``, so this is
            ``w_k = σ_k² / max(σ_k, sigma_floor)²``: ``σ_k²`` with the default floor 1, and 1 when the floor is at
            most the smallest sigma.
        sigma_floor: in (0, 1], used by ``space="x0"`` only.

    The mean is over the chunk's elements (every dim after the step dim).
    """
    _per_step("pred_velocity", pred_velocity)
    if not isinstance(recorded, torch.Tensor) or recorded.shape != pred_velocity.shape:
        raise ValueError(f"`recorded` must be a tensor of the shape of `pred_velocity` {tuple(pred_velocity.shape)}.")
    _per_step("recorded", recorded)
    sigma = _step_sigmas(sigmas, pred_velocity).flatten()
    if grad_steps is not None and (isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or grad_steps < 1):
        raise ValueError(f"`grad_steps` must be an integer ≥ 1 or None, got {grad_steps!r}.")
    if space not in ENERGY_SPACES:
        raise ValueError(f"`space` must be one of {list(ENERGY_SPACES)}, got {space!r}.")
    sigma_floor = _finite("sigma_floor", sigma_floor, positive=True)
    if sigma_floor > 1:
        raise ValueError(f"`sigma_floor` must lie in (0, 1], got {sigma_floor}.")
    weights = torch.ones_like(sigma) if space == "velocity" else (sigma / sigma.clamp_min(sigma_floor)).square()
    pred = pred_velocity.double()
    if grad_steps is not None and grad_steps < pred.shape[2]:
        pred = torch.cat([pred[:, :, :grad_steps], pred[:, :, grad_steps:].detach()], dim=2)
    squared = (pred - recorded.detach().double()).square().flatten(3).mean(dim=3)  # [G, P, K]
    return 0.5 * (squared * weights).sum(dim=(1, 2))


# ---------------------------------------------------------------------------------------------- Gibbs policy
def gibbs_log_policy(energy: torch.Tensor) -> torch.Tensor:
    """``log π(g) = log_softmax_g(−E(g))`` over the branches (METHOD §7). ``[G]`` float64, with the graph."""
    _float_tensor("energy", energy, ndim=1)
    return torch.log_softmax(-energy.double(), dim=0)


def _log_policy(name: str, value: torch.Tensor, size: int) -> torch.Tensor:
    _float_tensor(name, value, ndim=1)
    if value.shape != (size,) or abs(float(torch.logsumexp(value.double(), 0))) > 1e-4:
        raise ValueError(f"`{name}` must be {size} log-probabilities (logsumexp 0), e.g. from gibbs_log_policy.")
    return value.detach().double()


def kvpo_loss(
    energy: torch.Tensor,
    advantages: torch.Tensor,
    old_log_policy: torch.Tensor | None = None,
    ref_log_policy: torch.Tensor | None = None,
    beta: float = 10.0,
    epsilon_low: float = 0.1,
    epsilon_high: float = 0.2,
    max_log_ratio: float = 20.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KVPO's clipped-ratio loss on the Gibbs policy over branches, plus ``β`` · its KL to the reference (METHOD §7).

    ``π_θ = softmax(−E_θ)``; ``ρ_g = exp(clamp(log π_θ(g) − log π_old(g), ±max_log_ratio))``;
    ``L = −(1/G) Σ_g min(ρ_g Â_g, clip(ρ_g, 1 − ε_low, 1 + ε_high) Â_g) + β Σ_g π_θ(g) log(π_θ(g) / π_ref(g))``.
    Lowering a branch's energy raises its probability: on-policy, ``∂L/∂E_g = (Â_g − π_θ(g) Σ_h Â_h) / G`` (without
    the KL), so with advantages summing to 0 good branches (``Â > 0``) have their energy lowered, bad ones raised.

    Args:
        energy: ``E_θ`` ``[G]`` from :func:`trajectory_velocity_energy`, with the graph.
        advantages: ``Â`` ``[G]`` from :func:`fuse_advantages` (a constant).
        old_log_policy: ``log π_old`` ``[G]`` of the policy that made the rollout (:func:`gibbs_log_policy` of its
            energies); ``None``: on-policy, the detached current one.
        ref_log_policy: ``log π_ref`` ``[G]`` of the initial policy (same branches); required when ``β > 0``.
        beta: the KL weight (10 in the reference code).

    ``stats`` (detached): ``kvpo/ratio`` (mean ``ρ``), ``kvpo/clip_fraction`` (the fraction of branches whose
    gradient the clip removes: ``ρ < 1 − ε_low`` with ``Â < 0`` or ``ρ > 1 + ε_high`` with ``Â > 0``),
    ``kvpo/policy_entropy`` (``−Σ π_θ log π_θ``), ``kvpo/kl`` (0 without a reference) and ``kvpo/policy_loss``
    (the clipped term alone).
    """
    log_policy = gibbs_log_policy(energy)
    size = log_policy.shape[0]
    _float_tensor("advantages", advantages, ndim=1)
    if advantages.shape != (size,):
        raise ValueError(f"`advantages` must have shape ({size},), got {tuple(advantages.shape)}.")
    old = log_policy.detach() if old_log_policy is None else _log_policy("old_log_policy", old_log_policy, size)
    beta = _finite("beta", beta, low=0.0)
    if beta > 0 and ref_log_policy is None:
        raise ValueError("`ref_log_policy` is required when `beta` > 0.")
    ref = None if ref_log_policy is None else _log_policy("ref_log_policy", ref_log_policy, size)
    if not 0 < epsilon_low < 1:
        raise ValueError(f"`epsilon_low` must lie in (0, 1), got {epsilon_low}.")
    epsilon_high = _finite("epsilon_high", epsilon_high, positive=True)
    max_log_ratio = _finite("max_log_ratio", max_log_ratio, positive=True)

    advantages = advantages.detach().double()
    ratio = torch.exp((log_policy - old).clamp(-max_log_ratio, max_log_ratio))
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    policy_loss = -torch.minimum(ratio * advantages, clipped * advantages).mean()
    probability = log_policy.exp()
    kl = (probability * (log_policy - ref)).sum() if ref is not None else log_policy.new_zeros(())
    loss = policy_loss + beta * kl
    removed = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    stats = {
        "kvpo/ratio": ratio.detach().mean(),
        "kvpo/clip_fraction": removed.double().mean(),
        "kvpo/policy_entropy": -(probability * log_policy).detach().sum(),
        "kvpo/kl": kl.detach(),
        "kvpo/policy_loss": policy_loss.detach(),
    }
    return loss, stats


# ---------------------------------------------------------------------------------------------- safety gate
class GateDecision(NamedTuple):
    """What :func:`safety_gate` tells the trainer: skip the update, or multiply the loss by ``scale``."""

    fired: bool
    skip: bool
    scale: float
    anchor_probability: float


def safety_gate(
    improvement: torch.Tensor,
    mode: str = "skip",
    energy: torch.Tensor | None = None,
    anchor_energy: torch.Tensor | float | None = None,
) -> GateDecision:
    """Guard against an update when no branch beats the unrouted anchor (METHOD §7).

    The gate fires when every entry of ``improvement`` is ≤ 0. Pass the anchor-relative improvement
    ``fuse_advantages(A_loc, A_glob, mode="none", clip=None)``, which keeps the anchor offset in every fusion
    mode (the ``zscore`` advantages are centred and would always have a positive entry).

    ``mode``: ``"skip"``: when fired, ``skip=True`` (the trainer drops the update; ``scale`` 0). ``"scale"``: the
    loss is multiplied by ``scale = 1 − π_anchor`` when fired (1 otherwise), with ``π_anchor`` the anchor's
    probability under the Gibbs policy over the branches and the anchor,
    ``exp(−E_anchor) / (exp(−E_anchor) + Σ_g exp(−E_g))``, computed without gradient: the more the policy already
    prefers the anchor, the smaller the update. ``energy`` ``[G]`` and ``anchor_energy`` are required in this mode.
    ``"none"``: never gates.
    """
    _float_tensor("improvement", improvement, ndim=1)
    if mode not in GATES:
        raise ValueError(f"`mode` must be one of {list(GATES)}, got {mode!r}.")
    fired = mode != "none" and bool((improvement <= 0).all())
    if mode == "scale":
        if energy is None or anchor_energy is None:
            raise ValueError("`energy` and `anchor_energy` are required when `mode` is 'scale'.")
        _float_tensor("energy", energy, ndim=1)
        if energy.shape != improvement.shape:
            raise ValueError(f"`energy` must have the shape of `improvement` {tuple(improvement.shape)}.")
        anchor = torch.as_tensor(anchor_energy, dtype=torch.float64).detach().cpu()
        if anchor.numel() != 1 or not bool(torch.isfinite(anchor).all()):
            raise ValueError(f"`anchor_energy` must be one finite number, got {anchor.tolist()}.")
        energies = torch.cat([energy.detach().double().cpu(), anchor.reshape(1)])
        anchor_probability = float(torch.softmax(-energies, dim=0)[-1])
        return GateDecision(fired, False, 1.0 - anchor_probability if fired else 1.0, anchor_probability)
    return GateDecision(fired, fired, 0.0 if fired else 1.0, math.nan)
