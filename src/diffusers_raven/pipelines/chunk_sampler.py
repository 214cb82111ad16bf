"""The chunk sampler: denoise a chunk through the KV cache, then write its context (METHOD.md §1).

This is the one chunk loop of the package. :class:`~diffusers_raven.CausalVideoPipeline` streams with it, re-caches
with it on a prompt switch, and the trainers build every history from it (RavenTrainer's rollouts, Self Forcing's
exit-step sample, teacher forcing) as the RL trainers do for their rollouts. So training sees the history inference
makes, including the context-noise rule:

- a chunk starts from noise ``x_{σ_0}`` and runs the scheduler's steps, each predicting ``x̂0`` from the cache
  (``step_from_sigmas``: the consistency step, or the Flow-GRPO SDE step); an ``exit_step`` stops early and returns
  that step's ``x̂0`` (Self Forcing's random exit, teacher forcing's single step);
- the chunk's **context** is its output noised to ``σ_ctx = context_noise / T`` with fresh noise (the output itself at
  ``context_noise = 0``); one more pass at timestep ``context_noise`` writes the context's keys and values, the only
  pass that writes the cache. The context latents are recorded: they are the history later chunks attended to, which
  the interleaved training pass (METHOD §4) and the prompt-switch re-cache replay.

Random draws happen in one order, from one generator: the chunk's noise (unless given), the noise of every
non-final step, then the context noise (only when ``context_noise > 0`` and the context is written).

A video may also start from given frames (a clip to continue): :meth:`ChunkSampler.prefill` writes a given chunk's
context with the same rule (its clean latents noised to ``context_noise``, one context pass), without sampling it.

An ``interrupt`` hook (diffusers' ``pipe._interrupt``) is asked before every step: once it answers True, the chunk's
remaining steps are skipped (its latents stay as they stand, as ``WanPipeline`` leaves them) and the video ends there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models import KVCache

__all__ = ["CacheDenoiser", "ChunkSampler", "ChunkTrajectory", "Denoiser"]


class Denoiser(Protocol):
    """``(latents, timestep, frame_offset, update_cache) -> velocity`` of one chunk through a KV cache. A context pass
    (``update_cache=True``) only has to write the cache; its return value is not read (it may be ``None``)."""

    def __call__(self, latents: torch.Tensor, timestep: float, frame_offset: int, update_cache: bool = False):
        ...


@dataclass
class ChunkTrajectory(BaseOutput):
    """What one chunk's sampling did: the record trainers replay (METHOD §1, §4, §6).

    Attributes:
        sigmas: the schedule ``[σ_0, …, σ_{S-1}, 0]``.
        noisy: ``[S', B, C, f, h, w]``, the input ``x_{σ_k}`` of every step that ran.
        pred_original: ``[S', B, C, f, h, w]``, the prediction ``x̂0`` of every step that ran.
        transitions: one :class:`~diffusers_raven.GaussianTransition` per step (``None`` for the last one).
        clean: ``[B, C, f, h, w]``, the chunk's output (the last ``x̂0``).
        frame_start: the chunk's first latent frame.
        prompt_index: index of the prompt in effect (prompt schedules).
        context: ``[B, C, f, h, w]``, the latents whose keys and values were written to the cache (the output noised
            to the context-noise level), or ``None`` when the context pass did not run (the last chunk of a video).
        start_step: index of the first step that ran (0 unless sampling started from a given noisy state).
    """

    sigmas: torch.Tensor
    noisy: torch.Tensor | None
    pred_original: torch.Tensor | None
    transitions: list
    clean: torch.Tensor
    frame_start: int
    prompt_index: int = 0
    context: torch.Tensor | None = None
    start_step: int = 0


class CacheDenoiser:
    """The velocity of a chunk through a :class:`~diffusers_raven.KVCache`, with classifier-free guidance when
    ``negative_prompt_embeds`` are given (the cache then holds the negative and the positive branch, in that order).

    ``prompt_embeds`` / ``negative_prompt_embeds`` may be reassigned between chunks (a prompt switch).
    ``transformer`` may be a distributed wrapper of the model (a trainer's ``model``).

    A context pass (``update_cache=True``) runs the transformer in its cache-only mode (``cache_only=True``: the last
    block stops once its keys and values are taken, no output head) and returns ``None``.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        kv_cache: KVCache,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.transformer = transformer
        self.kv_cache = kv_cache
        self.prompt_embeds = prompt_embeds
        self.negative_prompt_embeds = negative_prompt_embeds
        self.guidance_scale = guidance_scale
        self.attention_kwargs = attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.negative_prompt_embeds is not None

    def __call__(
        self, latents: torch.Tensor, timestep: float, frame_offset: int, update_cache: bool = False
    ) -> torch.Tensor | None:
        if self.do_classifier_free_guidance:
            batched = torch.cat([latents, latents])
            embeds = torch.cat([self.negative_prompt_embeds, self.prompt_embeds])
        else:
            batched, embeds = latents, self.prompt_embeds
        t = torch.full((batched.shape[0],), float(timestep), device=latents.device)
        velocity = self.transformer(
            batched,
            t,
            embeds,
            kv_cache=self.kv_cache,
            frame_offset=frame_offset,
            update_cache=update_cache,
            cache_only=update_cache,
            attention_kwargs=self.attention_kwargs,
        ).sample
        if update_cache:  # a cache-only pass predicts nothing
            return None
        if not self.do_classifier_free_guidance:
            return velocity
        return self.guide(*velocity.chunk(2))

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of the two branches' velocities."""
        return uncond + self.guidance_scale * (cond - uncond)


StepCallback = Callable[[int, float, torch.Tensor], torch.Tensor | None]


class ChunkSampler:
    """Denoise chunks through a KV cache and write their context (see the module docstring).

    Args:
        scheduler: a :class:`~diffusers_raven.ConsistencyFlowMatchScheduler` or
            :class:`~diffusers_raven.FlowMatchSDEScheduler` whose schedule is set (``set_timesteps``); its
            ``schedule_sigmas`` are read once, here.
        context_noise (`float`): the timestep of the context pass (0: the clean output is written).
    """

    def __init__(self, scheduler, context_noise: float = 0.0) -> None:
        num_train = scheduler.config.num_train_timesteps
        if not 0 <= context_noise < num_train:
            raise ValueError(f"`context_noise` is a timestep in [0, {num_train}), got {context_noise!r}.")
        self.scheduler = scheduler
        self.sigmas = [float(s) for s in scheduler.schedule_sigmas]
        self.context_noise = float(context_noise)
        self.num_train_timesteps = num_train

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep(self, sigma: float) -> float:
        return float(self.scheduler.sigma_to_timestep(sigma))

    # ------------------------------------------------------------------ one chunk
    def denoise(
        self,
        denoiser: Denoiser,
        latents: torch.Tensor,
        frame_offset: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        start_step: int = 0,
        exit_step: int | None = None,
        grad: bool = False,
        record: bool = False,
        callback: StepCallback | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> ChunkTrajectory:
        """Run steps ``start_step … exit_step`` (default: all) on ``latents = x_{σ_start}``.

        The exit step is deterministic (it returns its ``x̂0``). With ``grad=True`` the exit step runs with gradients
        enabled and the steps before it without (Self Forcing); otherwise gradients follow the caller's mode.
        ``callback(step, timestep, next_latents)`` may return replacement latents (diffusers' step-end callback).
        ``interrupt()`` is asked before every step; True skips the steps left (``clean`` is then the latents as they
        stand: the last step's output, or ``latents`` if no step ran).
        """
        last = self.num_steps - 1 if exit_step is None else exit_step
        if not 0 <= start_step <= last < self.num_steps:
            raise ValueError(
                f"Need 0 ≤ `start_step` ≤ `exit_step` < {self.num_steps}, got {start_step} and {exit_step}."
            )
        x = latents
        noisy, pred, transitions = [], [], []
        for k in range(start_step, last + 1):
            if interrupt is not None and interrupt():
                break
            sigma = self.sigmas[k]
            sigma_next = self.sigmas[k + 1] if k < last else 0.0
            t = self.timestep(sigma)
            with torch.set_grad_enabled(torch.is_grad_enabled() and (not grad or k == last)):
                velocity = denoiser(x, t, frame_offset)
                out = self.scheduler.step_from_sigmas(velocity, x, sigma, sigma_next, generator=generator)
            if record:
                noisy.append(x)
                pred.append(out.pred_original_sample)
                transitions.append(out.transition)
            x = out.prev_sample
            if callback is not None:
                replaced = callback(k, t, x)
                x = x if replaced is None else replaced
        return ChunkTrajectory(
            sigmas=torch.tensor(self.sigmas),
            noisy=torch.stack(noisy) if record else None,
            pred_original=torch.stack(pred) if record else None,
            transitions=transitions,
            clean=x,
            frame_start=frame_offset,
            start_step=start_step,
        )

    def context_latents(self, clean: torch.Tensor, generator=None) -> torch.Tensor:
        """The chunk as the cache sees it: ``(1 − σ_ctx) x̂0 + σ_ctx ε`` with fresh ``ε`` (``x̂0`` itself at
        ``context_noise = 0``, drawing nothing). Detached: no gradient reaches a chunk through the cache."""
        clean = clean.detach()
        if self.context_noise == 0:
            return clean
        sigma = self.context_noise / self.num_train_timesteps
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return (1 - sigma) * clean + sigma * noise

    @torch.no_grad()
    def write_context(self, denoiser: Denoiser, context: torch.Tensor, frame_offset: int) -> None:
        """The context pass: the only pass that writes the cache (its keys and values at ``context_noise``)."""
        denoiser(context, self.context_noise, frame_offset, update_cache=True)

    def prefill(
        self, denoiser: Denoiser, clean: torch.Tensor, frame_offset: int, generator=None
    ) -> ChunkTrajectory:
        """Write a *given* chunk (clean latents ``[B, C, f, h, w]`` of a clip to continue) to the cache as if it had
        been sampled: its context (the context-noise rule of :meth:`context_latents`) in one context pass. Nothing is
        sampled; the record has the chunk as ``clean`` and ``context`` and no steps (``start_step`` = the number of
        steps)."""
        context = self.context_latents(clean, generator)
        self.write_context(denoiser, context, frame_offset)
        return ChunkTrajectory(
            sigmas=torch.tensor(self.sigmas),
            noisy=None,
            pred_original=None,
            transitions=[],
            clean=clean,
            frame_start=frame_offset,
            context=context,
            start_step=self.num_steps,
        )

    # ------------------------------------------------------------------ a video
    def chunks(
        self,
        denoiser: Denoiser,
        latent_shape: Sequence[int],
        chunk_frames: int,
        num_latent_frames: int | None,
        generator=None,
        latents: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        start_step: int = 0,
        exit_step: int | None = None,
        grad: bool = False,
        record: bool = False,
        callback: Callable[[int, int, float, torch.Tensor], torch.Tensor | None] | None = None,
        interrupt: Callable[[], bool] | None = None,
        first_frame: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[ChunkTrajectory]:
        """Sample a video chunk by chunk, yielding each chunk's record once its context is in the cache.

        Args:
            latent_shape: ``(batch, channels, height, width)`` of the latents.
            chunk_frames: latent frames per chunk (the last chunk of a video may be shorter).
            num_latent_frames: the video's latent frames; ``None`` streams until the caller stops.
            latents: ``x_{σ_start}`` of every chunk, ``[B, C, F, h, w]`` (default: noise drawn per chunk).
            history: clean latents ``[B, C, F, h, w]`` written to the cache instead of the chunks' outputs (teacher
                forcing: the data is the history).
            start_step, exit_step, grad, record: as in :meth:`denoise`.
            callback: ``callback(chunk_index, step, timestep, next_latents)``, may return replacement latents.
            interrupt: asked before every step; once True, the chunk in progress is yielded as it stands (no context
                pass) and no chunk follows.
            first_frame: latent frame of the first chunk (a stream resumed after earlier chunks).

        The generator is not advanced between chunks by anything but the sampler itself, so the caller may act on
        the cache between two chunks (a prompt switch) without changing the noise of the chunks after it.
        """
        batch, channels, height, width = latent_shape
        frame, index = first_frame, 0
        while num_latent_frames is None or frame < num_latent_frames:
            frames = chunk_frames if num_latent_frames is None else min(chunk_frames, num_latent_frames - frame)
            if latents is not None:
                x = latents[:, :, frame : frame + frames]
            else:
                x = randn_tensor((batch, channels, frames, height, width), generator=generator, device=device,
                                 dtype=dtype)
            step_callback = None if callback is None else (lambda k, t, y, i=index: callback(i, k, t, y))
            result = self.denoise(
                denoiser, x, frame, generator, start_step, exit_step, grad, record, step_callback, interrupt
            )
            if interrupt is not None and interrupt():  # nothing follows an interrupted chunk: no context pass
                yield result
                return
            # The last chunk of a finite video has no reader: its context pass (and context noise) is skipped.
            if num_latent_frames is None or frame + frames < num_latent_frames:
                written = result.clean if history is None else history[:, :, frame : frame + frames]
                result.context = self.context_latents(written, generator)
                self.write_context(denoiser, result.context, frame)
            yield result
            frame += frames
            index += 1

    def recache(
        self,
        denoiser: Denoiser,
        contexts: dict[int, torch.Tensor],
        chunk_frames: int,
        first_chunk_frames: int | None = None,
    ) -> None:
        """Rebuild the self-attention cache from recorded context latents (one ``[B, C, 1, h, w]`` tensor per latent
        frame), chunk by chunk in frame order: the prompt switch of METHOD §2, run with the denoiser's new prompt.

        The contexts are replayed as they were written (the same context noise), so after a re-cache the cache holds
        what a stream under the new prompt would hold for the same frames, and no random draw is spent. The frames are
        grouped by the chunks they were written in: chunks of ``chunk_frames`` after a first chunk of
        ``first_chunk_frames`` (default ``chunk_frames``; another size when a video started from a given clip whose
        length is not a whole number of chunks).
        """
        first = chunk_frames if first_chunk_frames is None else first_chunk_frames
        denoiser.kv_cache.reset()
        frames = sorted(contexts)
        while frames:
            start = 0 if frames[0] < first else frames[0] - (frames[0] - first) % chunk_frames
            end = first if start == 0 else start + chunk_frames
            run = [f for f in frames if f < end]
            self.write_context(denoiser, torch.cat([contexts[f] for f in run], dim=2), run[0])
            frames = frames[len(run) :]
