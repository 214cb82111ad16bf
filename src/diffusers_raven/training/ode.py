"""ODE regression, the initialisation of a causal few-step student (METHOD.md §5, CausVid / Self Forcing).

The teacher's probability-flow ODE is integrated from noise with many Euler steps on a grid that contains the
few-step sigmas; the states at those sigmas and the final ``x0`` form the regression pairs. The causal student then
learns, with block-causal attention and an independent few-step sigma per chunk, to map ``x_{σ_k}`` to ``x0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .chunk_weights import weighted_mean
from .randomness import GeneratorLike, draw_per_sample


def shifted_grid(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """``shift(u)`` for ``u = linspace(1, 0, num_steps + 1)`` (float64): the teacher's Euler grid."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def teacher_ode_trajectory(
    teacher,
    noise: torch.Tensor,
    text: torch.Tensor,
    negative: torch.Tensor | None,
    record_sigmas: Sequence[float],
    guidance_scale: float = 3.0,
    num_steps: int = 48,
    shift: float = 5.0,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler integration of the guided teacher velocity from ``noise`` (at σ = 1) to σ = 0.

    Returns ``(states [len(record_sigmas), B, C, F, h, w], x0)``; every recorded sigma must lie on the grid
    ``shifted_grid(num_steps, shift)`` (e.g. the four Self Forcing sigmas with ``num_steps`` a multiple of 4).
    """
    grid = shifted_grid(num_steps, shift)
    indices = []
    for sigma in record_sigmas:
        hit = torch.isclose(grid, torch.tensor(float(sigma), dtype=torch.float64), atol=1e-6).nonzero()
        if hit.numel() == 0:
            raise ValueError(
                f"`record_sigmas` value {sigma} is not on the {num_steps}-step grid of shift {shift}; use a "
                "`num_steps` that is a multiple of the few-step count."
            )
        indices.append(int(hit[0]))
    x = noise
    states = {}
    for i in range(num_steps):
        if i in indices:
            states[i] = x
        sigma, sigma_next = float(grid[i]), float(grid[i + 1])
        t = torch.full((x.shape[0],), num_train_timesteps * sigma, device=x.device, dtype=x.dtype)
        velocity = teacher(x, t, text).sample
        if negative is not None and guidance_scale != 1.0:
            uncond = teacher(x, t, negative).sample
            velocity = uncond + guidance_scale * (velocity - uncond)
        x = x + (sigma_next - sigma) * velocity
    return torch.stack([states[i] for i in indices]), x


def ode_regression_inputs(
    states: torch.Tensor,
    sigmas: torch.Tensor,
    chunk_sizes: Sequence[int],
    generator: GeneratorLike = None,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick an independent few-step index per (sample, chunk): the noisy input ``[B, C, F, h, w]`` and the per-frame
    timesteps ``[B, F]`` (``T σ``, ``T = num_train_timesteps``) of one block-causal pass."""
    num_steps, batch = states.shape[:2]
    picks = draw_per_sample(batch, generator,
                            lambda n, g: torch.randint(0, num_steps, (n, len(chunk_sizes)), generator=g))
    per_frame = picks.repeat_interleave(torch.as_tensor(list(chunk_sizes)), dim=1)  # [B, F]
    gather = per_frame.to(states.device)[None, :, None, :, None, None].expand(1, -1, states.shape[2], -1,
                                                                               *states.shape[4:])
    noisy = states.gather(0, gather)[0]
    return noisy, sigmas.to(states.device)[per_frame.to(states.device)] * num_train_timesteps


def ode_regression_loss(
    prediction_x0: torch.Tensor, target_x0: torch.Tensor, frame_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean ‖x̂0 − x0‖²`` (optionally chunk-weighted)."""
    return weighted_mean((prediction_x0.float() - target_x0.detach().float()) ** 2, frame_weights)
