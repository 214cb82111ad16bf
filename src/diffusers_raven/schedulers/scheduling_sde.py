"""Flow-GRPO Euler–Maruyama sampler (METHOD §1, "Flow-GRPO SDE step"), the baseline kernel for CM-GRPO (§6)."""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

from .scheduling_consistency import (
    SchedulerStepOutput,
    SigmaLike,
    _check_sigma_pair,
    _check_step_inputs,
    _compute_dtype,
    _FlowMatchScheduleMixin,
    expand_sigma,
)
from .transitions import GaussianTransition, GeneratorLike

__all__ = ["FlowMatchSDEScheduler"]


def _check_noise_level(noise_level: float, name: str = "noise_level") -> float:
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)):
        raise ValueError(f"`{name}` must be a non-negative float, got {noise_level!r}.")
    noise_level = float(noise_level)
    if not (math.isfinite(noise_level) and noise_level >= 0.0):
        raise ValueError(f"`{name}` must be a non-negative float, got {noise_level}.")
    return noise_level


class FlowMatchSDEScheduler(_FlowMatchScheduleMixin, FlowMatchEulerDiscreteScheduler):
    """Euler–Maruyama discretisation of the flow-matching reverse SDE, as in Flow-GRPO (METHOD §1).

    With ``dt = σ' − σ < 0``, noise level ``a`` and ``s = a·sqrt(σ / (1 − σ))``::

        μ  = x + [s² / (2σ) · dt] · x + v̂ · (1 + s² (1 − σ) / (2σ)) · dt
        x' = μ + s · sqrt(−dt) · ε,      kernel N(μ, s² (−dt) I)

    **Guard at σ = 1** (where ``σ / (1 − σ)`` is infinite): with ``noise_sigma_max=None`` (default) the
    denominator uses the next sigma, ``s = a·sqrt(σ / (1 − σ'))`` when ``σ = 1`` — Flow-GRPO's rule (it uses the
    first sigma below 1, which is ``σ'`` on the first step). With ``noise_sigma_max = c`` the ratio is computed from
    ``min(σ, c)`` on every step. Only the noise scale ``s`` is guarded; ``μ`` uses the true ``σ``.

    The last step (``σ' = 0``) is the deterministic Euler step ``x + dt·v̂ = x̂0`` (no noise, ``transition=None``);
    with ``noise_level = 0`` every step is the plain Euler ODE step (``FlowMatchEulerDiscreteScheduler.step``).

    Args:
        num_train_timesteps: ``T`` in ``t = T σ`` (1000).
        shift: shift of METHOD §0 (5.0); the default schedule is the one of ``ConsistencyFlowMatchScheduler``.
        noise_level: ``a`` (0.7 as in Flow-GRPO).
        noise_sigma_max: optional cap ``c ∈ (0, 1)`` for the σ used in ``σ / (1 − σ)`` (see the guard above).
        denoising_sigmas: final sigmas of the default schedule (``None``: ``[1.0, 0.9375, 0.8333…, 0.625]``).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 5.0,
        noise_level: float = 0.7,
        noise_sigma_max: float | None = None,
        denoising_sigmas: list[float] | None = None,
    ) -> None:
        # The parent's __init__ is not called (it would register config entries this class does not support).
        _check_noise_level(noise_level)
        if noise_sigma_max is not None:
            if isinstance(noise_sigma_max, bool) or not isinstance(noise_sigma_max, (int, float)):
                raise ValueError(f"`noise_sigma_max` must be a float in (0, 1) or None, got {noise_sigma_max!r}.")
            if not 0.0 < float(noise_sigma_max) < 1.0:
                raise ValueError(f"`noise_sigma_max` must be in (0, 1), got {noise_sigma_max}.")
        self._init_schedule_state()

    # ------------------------------------------------------------------ noise scale
    def noise_scale(self, sigma: SigmaLike, sigma_next: SigmaLike, noise_level: float | None = None) -> SigmaLike:
        """``s = a·sqrt(σ_g / (1 − σ_g))`` with the σ = 1 guard of the class docstring (METHOD §1)."""
        a = self.config.noise_level if noise_level is None else _check_noise_level(noise_level)
        cap = self.config.noise_sigma_max
        if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor):
            sigma_t = torch.as_tensor(sigma, dtype=torch.float64 if _is_f64(sigma, sigma_next) else torch.float32)
            if cap is not None:
                capped = sigma_t.clamp(max=float(cap))
                return a * torch.sqrt(capped / (1.0 - capped))
            denom = torch.where(sigma_t >= 1.0, 1.0 - torch.as_tensor(sigma_next).to(sigma_t), 1.0 - sigma_t)
            return a * torch.sqrt(sigma_t / denom)
        sigma, sigma_next = float(sigma), float(sigma_next)
        if cap is not None:
            capped = min(sigma, float(cap))
            return a * math.sqrt(capped / (1.0 - capped))
        denom = (1.0 - sigma_next) if sigma >= 1.0 else (1.0 - sigma)
        return a * math.sqrt(sigma / denom)

    # ------------------------------------------------------------------ step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: GeneratorLike = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
        noise_level: float | None = None,
    ) -> SchedulerStepOutput | tuple:
        """One Flow-GRPO SDE step from ``sample = x_σ`` (METHOD §1).

        Args:
            model_output: the predicted flow velocity ``v̂ ≈ ε − x0``.
            timestep: the current entry of ``self.timesteps``.
            sample: the current state ``x_σ``.
            generator: a ``torch.Generator`` (or one per sample) for ``ε``.
            noise: ``ε`` itself (standard normal, shape of ``sample``); takes precedence over ``generator``.
            return_dict: return a :class:`SchedulerStepOutput` or ``(prev_sample, pred_original_sample, transition)``.
            noise_level: overrides ``config.noise_level`` for this step (e.g. 0 for deterministic evaluation).
        """
        sigma, sigma_next = self._sigma_pair_for_step(timestep)
        out = self.step_from_sigmas(
            model_output, sample, sigma, sigma_next, generator=generator, noise=noise, noise_level=noise_level
        )
        self._step_index += 1
        if not return_dict:
            return (out.prev_sample, out.pred_original_sample, out.transition)
        return out

    def step_from_sigmas(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        sigma: SigmaLike,
        sigma_next: SigmaLike,
        generator: GeneratorLike = None,
        noise: torch.Tensor | None = None,
        noise_level: float | None = None,
        frame_dim: int = 2,
    ) -> SchedulerStepOutput:
        """The SDE step for explicit ``(σ, σ')`` without touching the step index (for recomputing ``μ_θ``)."""
        _check_step_inputs(model_output, sample)
        sigma = float(sigma) if isinstance(sigma, int) and not isinstance(sigma, bool) else sigma
        sigma_next = (
            float(sigma_next) if isinstance(sigma_next, int) and not isinstance(sigma_next, bool) else sigma_next
        )
        final = _check_sigma_pair(sigma, sigma_next)
        a = self.config.noise_level if noise_level is None else _check_noise_level(noise_level)

        dtype = _compute_dtype(sample, model_output)
        s_cur = expand_sigma(sigma, sample, frame_dim, "sigma")
        s_nxt = expand_sigma(sigma_next, sample, frame_dim, "sigma_next")
        if isinstance(s_cur, torch.Tensor):
            s_cur = s_cur.to(dtype)
        if isinstance(s_nxt, torch.Tensor):
            s_nxt = s_nxt.to(dtype)
        dt = s_nxt - s_cur

        x = sample.to(dtype)
        v = model_output.to(dtype)
        x0 = x - s_cur * v
        if final or a == 0.0:
            # Deterministic Euler ODE step; on the last step (σ' = 0) it equals x̂0.
            prev, transition = x + dt * v, None
        else:
            scale = self.noise_scale(s_cur, s_nxt, noise_level=a)
            if isinstance(scale, torch.Tensor):
                scale = scale.to(dtype)
            var = scale * scale
            mean = x + (var / (2.0 * s_cur) * dt) * x + v * ((1.0 + var * (1.0 - s_cur) / (2.0 * s_cur)) * dt)
            std = scale * torch.sqrt(-dt) if isinstance(dt, torch.Tensor) else scale * math.sqrt(-dt)
            transition = GaussianTransition(mean, std)
            prev = transition.sample(generator=generator, noise=noise)
        return SchedulerStepOutput(
            prev_sample=prev.to(model_output.dtype),
            pred_original_sample=x0.to(model_output.dtype),
            transition=transition,
        )


def _is_f64(*values: SigmaLike) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in values)


FlowMatchSDEScheduler.__module__ = "diffusers_raven"
