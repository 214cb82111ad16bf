"""Diagonal Gaussian transition kernels of the few-step samplers (METHOD §1).

A sampler step ``x_{σ_k} → x_{σ_{k+1}}`` that injects fresh noise is the Gaussian kernel
``π(x' | x) = N(μ, s² I)``. The schedulers return it as a :class:`GaussianTransition` so that RL trainers can
evaluate ``log π`` of a recorded next state and the KL between two policies at the same state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["GaussianTransition", "randn_like_shape"]

_REDUCTIONS = ("sum", "mean", "none")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {list(_REDUCTIONS)}, got {reduction!r}.")


def _stat_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 if any input already is (statistics are never computed in half precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce over every non-batch dimension; sums and means accumulate in float64 (METHOD §1: ``D`` can be ~1e6)."""
    if reduction == "none":
        return values
    if values.ndim <= 1:  # nothing but the batch dimension
        return values.to(torch.float64)
    dims = tuple(range(1, values.ndim))
    if reduction == "sum":
        return values.sum(dim=dims, dtype=torch.float64)
    return values.mean(dim=dims, dtype=torch.float64)


def randn_like_shape(
    shape: Sequence[int],
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn with ``torch.randn(..., generator=generator)``.

    ``generator`` may be one ``torch.Generator`` or a list with one generator per batch element (dim 0), as in
    diffusers pipelines. A CPU generator used for a tensor on another device draws on the CPU, then moves the
    noise, so a seed gives the same numbers on every device.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(shape) == 0 or len(generator) != shape[0]:
                raise ValueError(
                    f"`generator` is a list of {len(generator)} generators but the batch size is "
                    f"{shape[0] if shape else 'undefined'}; pass one generator per sample."
                )
            return torch.cat([randn_like_shape((1, *shape[1:]), g, device, dtype) for g in generator], dim=0)
    rand_device = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"`generator` lives on {generator.device} and cannot draw noise for a {device} tensor.")
        rand_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


class GaussianTransition:
    """Diagonal Gaussian ``N(mean, std² I)`` over one batch of states (METHOD §1, "Gaussian transition").

    Args:
        mean: the kernel mean ``μ`` (batch first, e.g. ``[B, C, F, H, W]``). Gradients flow through it.
        std: the standard deviation, a float or a tensor broadcastable to ``mean`` (e.g. a 0-d tensor or one of
            shape ``[B, 1, 1, 1, 1]``). Stored as a tensor, kept compact (not expanded).

    ``log_prob`` and ``kl`` equal ``torch.distributions.Normal``'s (summed over non-batch dimensions for
    ``reduction="sum"``); they are evaluated in float32 (float64 if an input is float64) and reductions accumulate
    in float64, so the log-likelihood of a large video latent keeps its precision.
    """

    __slots__ = ("mean", "std")

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | float) -> None:
        if not isinstance(mean, torch.Tensor) or not mean.is_floating_point():
            raise ValueError(f"`mean` must be a floating-point tensor, got {type(mean).__name__}.")
        if isinstance(std, torch.Tensor):
            if not std.is_floating_point():
                raise ValueError("`std` must be a floating-point tensor or a float.")
            try:
                broadcast = torch.broadcast_shapes(std.shape, mean.shape)
            except RuntimeError:
                broadcast = None
            if broadcast != mean.shape:
                raise ValueError(
                    f"`std` of shape {tuple(std.shape)} is not broadcastable to `mean` of shape {tuple(mean.shape)}."
                )
            std = std.to(device=mean.device)
        else:
            std = float(std)
            if not (math.isfinite(std) and std > 0.0):
                raise ValueError(f"`std` must be a finite positive number, got {std}.")
            std = torch.tensor(std, dtype=mean.dtype, device=mean.device)
        self.mean = mean
        self.std = std

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> torch.Size:
        """Shape of a sample (the shape of ``mean``)."""
        return self.mean.shape

    @property
    def batch_size(self) -> int:
        """Size of dim 0 (1 for a 0-d mean)."""
        return int(self.mean.shape[0]) if self.mean.ndim > 0 else 1

    @property
    def num_elements(self) -> int:
        """Elements per sample, ``D`` in METHOD §1 (product of the non-batch dimensions)."""
        return int(math.prod(self.mean.shape[1:])) if self.mean.ndim > 0 else 1

    @property
    def variance(self) -> torch.Tensor:
        """``std²`` (compact shape, like ``std``)."""
        return self.std * self.std

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    # ------------------------------------------------------------------ sampling and densities
    def sample(self, generator: GeneratorLike = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``mean + std · noise`` (METHOD §1). ``noise`` (standard normal, shape of ``mean``) wins over
        ``generator``; otherwise it is drawn with ``torch.randn(..., generator=generator)`` in ``mean``'s dtype."""
        if noise is None:
            noise = randn_like_shape(self.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        else:
            if not isinstance(noise, torch.Tensor):
                raise ValueError(f"`noise` must be a tensor, got {type(noise).__name__}.")
            if noise.shape != self.shape:
                raise ValueError(f"`noise` has shape {tuple(noise.shape)}, expected {tuple(self.shape)}.")
            noise = noise.to(device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std.to(self.mean.dtype) * noise

    def log_prob(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``log N(x; μ, σ²)`` per element: ``−(x−μ)²/(2σ²) − log σ − ½ log 2π`` (METHOD §1).

        ``reduction``: ``"sum"`` over non-batch dims (shape ``[B]``, the ``log π`` of METHOD §1), ``"mean"`` over
        non-batch dims (Flow-GRPO's normalisation), or ``"none"`` (elementwise, shape of ``mean``). Reduced
        values are float64 (a sum over ~1e6 elements needs it for PPO ratios); ``"none"`` is float32 (or float64).
        """
        _check_reduction(reduction)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"`x` must be a tensor, got {type(x).__name__}.")
        if x.shape != self.shape:
            raise ValueError(f"`x` has shape {tuple(x.shape)}, expected {tuple(self.shape)}.")
        dtype = _stat_dtype(x, self.mean, self.std)
        mean = self.mean.to(dtype)
        std = self.std.to(device=mean.device, dtype=dtype)
        z = (x.to(device=mean.device, dtype=dtype) - mean) / std
        values = -0.5 * z.square() - torch.log(std) - _HALF_LOG_2PI
        return _reduce(values, reduction)

    def kl(self, other: GaussianTransition, reduction: str = "sum") -> torch.Tensor:
        """``KL(self ‖ other)`` between diagonal Gaussians.

        Per element ``log(σ_b/σ_a) + (σ_a² + (μ_a − μ_b)²)/(2σ_b²) − ½``; for equal stds this is
        ``(μ_a − μ_b)²/(2σ²)`` (METHOD §1 and §6). ``reduction`` as in :meth:`log_prob`.
        """
        _check_reduction(reduction)
        if not isinstance(other, GaussianTransition):
            raise ValueError(f"`other` must be a GaussianTransition, got {type(other).__name__}.")
        if other.shape != self.shape:
            raise ValueError(f"`other` has shape {tuple(other.shape)}, expected {tuple(self.shape)}.")
        dtype = _stat_dtype(self.mean, self.std, other.mean, other.std)
        device = self.mean.device
        mu_a, mu_b = self.mean.to(dtype), other.mean.to(device=device, dtype=dtype)
        std_a, std_b = self.std.to(device=device, dtype=dtype), other.std.to(device=device, dtype=dtype)
        ratio = std_a / std_b
        values = 0.5 * ((mu_a - mu_b) / std_b).square() + 0.5 * (ratio.square() - 1.0) - torch.log(ratio)
        return _reduce(values, reduction)

    # ------------------------------------------------------------------ tensor plumbing
    def detach(self) -> GaussianTransition:
        """The same kernel with ``mean`` and ``std`` detached from the autograd graph."""
        return GaussianTransition(self.mean.detach(), self.std.detach())

    def to(self, *args, **kwargs) -> GaussianTransition:
        """Move/cast ``mean`` and ``std`` like ``torch.Tensor.to``."""
        return GaussianTransition(self.mean.to(*args, **kwargs), self.std.to(*args, **kwargs))

    def __repr__(self) -> str:
        std = f"{self.std.item():.6g}" if self.std.numel() == 1 else f"tensor{tuple(self.std.shape)}"
        return f"GaussianTransition(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, std={std})"


GaussianTransition.__module__ = "diffusers_raven"
