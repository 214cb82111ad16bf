"""Rollout records and the interleaved training-time-test packing (METHOD.md §1, §4).

A self-rollout of the chunk sampler is recorded per chunk (:class:`~diffusers_raven.pipelines.ChunkTrajectory`);
trainers stack the chunks into one :class:`RolloutRecord` and, for RAVEN, pack a training-time-test sequence: the
recorded input ``x_{σ_k}`` of every chunk (one step ``k`` per sample) plus, as ``history``, the context latents the
rollout wrote to its cache (the clean chunks noised to the context-noise level, the clean chunks themselves at
context noise 0), so the interleaved pass sees exactly the history the cached rollout saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .randomness import GeneratorLike, draw_per_sample


@dataclass
class RolloutRecord:
    """A whole rollout, chunks stacked along the latent-frame axis.

    Attributes:
        sigmas: ``[S + 1]`` the schedule (last entry 0).
        noisy: ``[S, B, C, F, h, w]`` the input of every step for every frame.
        pred_original: ``[S, B, C, F, h, w]`` the prediction of every step.
        clean: ``[B, C, F, h, w]`` the output video latents.
        chunk_sizes: latent frames per chunk.
        context: ``[B, C, F', h, w]`` the latents written to the cache, for the chunks whose context pass ran (every
            chunk but the last of a finite video: ``F' = F − last chunk``).
    """

    sigmas: torch.Tensor
    noisy: torch.Tensor
    pred_original: torch.Tensor
    clean: torch.Tensor
    chunk_sizes: list[int]
    context: torch.Tensor | None = None

    @classmethod
    def from_chunks(cls, chunks: Sequence) -> RolloutRecord:
        """Stack per-chunk trajectories (objects with ``sigmas``, ``noisy``, ``pred_original``, ``clean`` and
        ``context``, as :class:`~diffusers_raven.pipelines.ChunkTrajectory`) recorded from the first step."""
        if not chunks:
            raise ValueError("`chunks` is empty.")
        if any(c.noisy is None for c in chunks):
            raise ValueError("The chunks were sampled without `record=True` (`return_trajectory=True`).")
        clean = torch.cat([c.clean for c in chunks], dim=2)
        written = [c.context for c in chunks if getattr(c, "context", None) is not None]
        return cls(
            sigmas=chunks[0].sigmas,
            noisy=torch.cat([c.noisy for c in chunks], dim=3),
            pred_original=torch.cat([c.pred_original for c in chunks], dim=3),
            clean=clean,
            chunk_sizes=[c.clean.shape[2] for c in chunks],
            context=torch.cat(written, dim=2) if written else clean[:, :, :0],
        )

    def __getitem__(self, index: slice) -> RolloutRecord:
        """The record of a slice of the batch (a micro-batch of a generation batch)."""
        if not isinstance(index, slice):
            raise TypeError(f"A RolloutRecord is indexed by a slice of the batch, got {type(index).__name__}.")
        return RolloutRecord(
            sigmas=self.sigmas,
            noisy=self.noisy[:, index],
            pred_original=self.pred_original[:, index],
            clean=self.clean[index],
            chunk_sizes=list(self.chunk_sizes),
            context=None if self.context is None else self.context[index],
        )

    @property
    def num_steps(self) -> int:
        return self.noisy.shape[0]

    @property
    def batch_size(self) -> int:
        return self.clean.shape[0]

    def select_steps(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample step ``k_b``: ``(x_{σ_k} [B, C, F, h, w], σ_k [B])``."""
        steps = torch.as_tensor(steps, dtype=torch.long)
        if steps.shape != (self.clean.shape[0],):
            raise ValueError(f"`steps` must have one entry per sample ({self.clean.shape[0]}), got {list(steps.shape)}.")
        if bool((steps < 0).any()) or bool((steps >= self.num_steps).any()):
            raise ValueError(f"`steps` must lie in [0, {self.num_steps}), got {steps.tolist()}.")
        batch = torch.arange(self.clean.shape[0])
        return self.noisy[steps, batch], self.sigmas[steps]


def pack_interleaved(
    record: RolloutRecord, steps: torch.Tensor, context_timestep: float = 0.0, num_train_timesteps: int = 1000
) -> dict[str, torch.Tensor]:
    """Inputs of the interleaved forward of METHOD §4 for per-sample steps ``k``.

    Returns ``hidden_states`` (``x_{σ_k}`` of every chunk), per-frame ``timestep`` ``[B, F]`` (``T σ_k``),
    ``history`` (the context latents the rollout wrote for every chunk but the last; empty for a one-chunk video) and
    ``history_timestep`` (the context timestep), ready for ``transformer(**packed, encoder_hidden_states=...)``.
    ``context_timestep`` must be the rollout's context noise: the history is what its cache held.
    """
    noisy, sigma = record.select_steps(steps)
    frames = noisy.shape[2]
    timestep = (sigma * num_train_timesteps).to(noisy.dtype)[:, None].expand(-1, frames).to(noisy.device)
    needed = frames - record.chunk_sizes[-1]
    context = record.context if record.context is not None else record.clean[:, :, :0]
    if context.shape[2] < needed:
        raise ValueError(
            f"The record holds the context of {context.shape[2]} latent frames; the interleaved pass needs the "
            f"{needed} frames before the last chunk."
        )
    history = context[:, :, :needed]
    return {
        "hidden_states": noisy,
        "timestep": timestep,
        "history": history,
        "history_timestep": torch.full((noisy.shape[0],), float(context_timestep), device=noisy.device),
    }


def sample_steps(
    batch_size: int, num_steps: int, generator: GeneratorLike = None, exclude_last: bool = False
) -> torch.Tensor:
    """One random sampler step per sample (``exclude_last`` keeps only the stochastic, policy steps); ``generator``
    may be one generator per sample."""
    high = num_steps - 1 if exclude_last else num_steps
    if high < 1:
        raise ValueError(f"No step to sample from a {num_steps}-step schedule (exclude_last={exclude_last}).")
    return draw_per_sample(batch_size, generator, lambda n, g: torch.randint(0, high, (n,), generator=g))
