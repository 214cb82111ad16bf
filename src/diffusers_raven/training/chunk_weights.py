"""Chunk-wise loss scaling by future participation (METHOD.md §4).

A chunk that many later chunks attend to matters more for the stream than its own denoising loss says; RAVEN
reweights the per-chunk losses by a monotone transform of each chunk's *participation score*
``p_c = Σ_{c' ≥ c} n_{c'} / Σ n`` and renormalises so that the mean element weight stays 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def participation_scores(chunk_sizes: Sequence[int]) -> torch.Tensor:
    """``p_c = Σ_{c' ≥ c} n_{c'} / Σ_{c'} n_{c'}`` (so ``p_1 = 1`` and ``p`` decreases)."""
    sizes = torch.as_tensor(list(chunk_sizes), dtype=torch.float64)
    if sizes.ndim != 1 or sizes.numel() == 0 or bool((sizes <= 0).any()):
        raise ValueError(f"`chunk_sizes` must be a non-empty list of positive sizes, got {list(chunk_sizes)}.")
    return sizes.flip(0).cumsum(0).flip(0) / sizes.sum()


def participation_transform(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """``g_α(p)``: ``α p / (1 + (α − 1) p)`` for ``α > 0``; for ``α < 0`` the same map of ``r = p_K / p`` with ``|α|``;
    ``g_0 = 1``. ``α = 1`` gives ``p`` itself, ``α = −1`` gives ``p_K / p`` (later chunks weigh more)."""
    if alpha == 0:
        return torch.ones_like(p)
    if alpha < 0:
        p = p[-1] / p
        alpha = -alpha
    return alpha * p / (1 + (alpha - 1) * p)


def chunk_weights(chunk_sizes: Sequence[int], alpha: float) -> torch.Tensor:
    """Per-chunk weights ``w_c = g(p_c) · N / Σ_c g(p_c) n_c``, so that ``Σ_c w_c n_c = N`` (float64).

    For 7 equal chunks and ``α = −1``: ``≈ [0.386, 0.450, 0.540, 0.675, 0.900, 1.350, 2.700]``.
    """
    sizes = torch.as_tensor(list(chunk_sizes), dtype=torch.float64)
    g = participation_transform(participation_scores(chunk_sizes), float(alpha))
    return g * sizes.sum() / (g * sizes).sum()


def frame_weights(chunk_sizes: Sequence[int], alpha: float) -> torch.Tensor:
    """The chunk weights repeated over each chunk's latent frames: ``[sum(chunk_sizes)]``."""
    weights = chunk_weights(chunk_sizes, alpha)
    return weights.repeat_interleave(torch.as_tensor(list(chunk_sizes)))


def weighted_mean(elementwise: torch.Tensor, weights: torch.Tensor | None, frame_dim: int = 2) -> torch.Tensor:
    """``Σ w ℓ / N`` with per-frame ``weights`` broadcast along ``frame_dim`` of ``elementwise`` (METHOD §4).

    With weights from :func:`frame_weights` the mean element weight is 1, so this is the plain mean when every
    chunk has the same loss.
    """
    if weights is None:
        return elementwise.mean()
    if weights.numel() != elementwise.shape[frame_dim]:
        raise ValueError(
            f"`weights` has {weights.numel()} entries for {elementwise.shape[frame_dim]} frames (dim {frame_dim})."
        )
    shape = [1] * elementwise.ndim
    shape[frame_dim] = -1
    weights = weights.to(device=elementwise.device, dtype=elementwise.dtype).view(shape)
    return (elementwise * weights).sum() / elementwise.numel()
