"""Distribution matching distillation losses (METHOD.md §5).

The generator step pushes the student's samples ``x̂0`` along ``(f − r) / D``: the difference between the critic's
("fake") and the teacher's ("real", classifier-free guided) denoised estimates of the re-noised sample, normalised
per sample by ``D = mean |x̂0 − r|``. Written as a regression onto a stop-gradient target so that any optimizer and
any chunk weighting apply.
"""

from __future__ import annotations

import torch

from .chunk_weights import weighted_mean
from .randomness import GeneratorLike, draw_per_sample


def dmd_gradient(x0: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(f − r) / D`` with ``D = max(mean_{per sample} |x̂0 − r|, eps)``, NaNs mapped to 0 (computed in float64)."""
    x0, fake_x0, real_x0 = x0.detach().double(), fake_x0.detach().double(), real_x0.detach().double()
    dims = tuple(range(1, x0.ndim))
    normalizer = (x0 - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return torch.nan_to_num((fake_x0 - real_x0) / normalizer)


def dmd_loss(
    x0: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    frame_weights: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L = ½ ‖x̂0 − sg(x̂0 − grad)‖²``, chunk-weighted and averaged over the ``N`` elements.

    Its gradient with respect to ``x̂0`` is ``w · (f − r) / D / N``. Returns ``(loss, grad)``; ``x0`` carries the
    generator's graph, ``fake_x0`` and ``real_x0`` are treated as constants.
    """
    grad = dmd_gradient(x0, fake_x0, real_x0, eps)
    target = (x0.double() - grad).detach()
    elementwise = 0.5 * (x0.double() - target) ** 2
    return weighted_mean(elementwise, frame_weights).to(x0.dtype), grad


def flow_matching_loss(
    velocity: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, frame_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``‖v − (ε − x0)‖²`` averaged over elements (optionally chunk-weighted): the critic's denoising loss on
    detached generator samples, and the teacher's training loss."""
    target = (noise - x0).detach()
    return weighted_mean((velocity.float() - target.float()) ** 2, frame_weights)


def critic_loss(
    velocity: torch.Tensor, noise: torch.Tensor, generated_x0: torch.Tensor, frame_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The fake-score (critic) loss of METHOD §5 on detached generator samples."""
    return flow_matching_loss(velocity, noise, generated_x0.detach(), frame_weights)


def sample_dmd_timesteps(
    batch_size: int,
    min_sigma: float = 0.02,
    max_sigma: float = 0.98,
    shift: float = 5.0,
    generator: GeneratorLike = None,
    num_train_timesteps: int | None = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The re-noising levels of the DMD generator and critic steps (METHOD §5), as sigmas in [0, 1]:
    ``τ = min_sigma + (max_sigma − min_sigma) · shift(u)``, ``u ~ U[0, 1]`` (RAVEN's reference code: shift first,
    then scale into ``[0.02, 0.98]``), rounded to an integer timestep ``T τ`` when ``num_train_timesteps`` is set.
    ``generator`` may be one generator per sample."""
    if not 0 <= min_sigma < max_sigma <= 1:
        raise ValueError(f"Need 0 ≤ `min_sigma` < `max_sigma` ≤ 1, got {min_sigma}, {max_sigma}.")
    u = draw_per_sample(batch_size, generator, lambda n, g: torch.rand(n, generator=g, dtype=torch.float64))
    tau = min_sigma + (max_sigma - min_sigma) * (shift * u / (1 + (shift - 1) * u))
    if num_train_timesteps is not None:
        tau = torch.round(tau * num_train_timesteps) / num_train_timesteps
    return tau.float().to(device)
