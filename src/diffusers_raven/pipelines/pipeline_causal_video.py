"""CausalVideoPipeline: streaming text-to-video generation with a causal Wan transformer and a KV cache.

The algorithm (METHOD.md §1–§2) is the package's one chunk loop, ``ChunkSampler`` of :mod:`.chunk_sampler`: per chunk
of ``num_frames_per_chunk`` latent frames it draws the chunk's noise, runs the few-step schedule with the transformer
attending to the KV cache, then writes the chunk's context (its output, noised to the ``context_noise`` timestep) to the
cache in one more pass, skipped after the last chunk of a finite video, which nothing reads. Between two chunks the
pipeline adds what a stream needs: a prompt switch (LongLive re-cache of the contexts the visible frames were written
with, METHOD §2) and decoding with the streaming VAE decoder, whose causal-convolution cache persists between chunks.

:meth:`CausalVideoPipeline.stream` yields decoded chunks as they are made, for a fixed length or endlessly
(``num_frames=None``), and can switch prompt mid-stream; ``__call__`` puts the chunks of a stream end to end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.video_processor import VideoProcessor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from ..models import CausalWanTransformer3DModel, KVCache
from ..models.kv_cache import check_window, visible_history
from ..schedulers import ConsistencyFlowMatchScheduler, FlowMatchSDEScheduler
from ..utils.text import encode_prompts
from .chunk_sampler import CacheDenoiser, ChunkSampler, ChunkTrajectory
from .vae_streaming import (
    StreamingVAEDecoder,
    denormalize_latents,
    frames_for_latents,
    vae_spatial_factor,
    vae_temporal_factor,
)

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")

_STREAM_ARGUMENTS_DOC = r"""            prompt (`str` or `list[str]`): the prompt(s); with ``switch_frames``, a schedule of prompts, one per segment.
            negative_prompt (`str` or `list[str]`, *optional*): used only when ``guidance_scale > 1``, for every prompt
                of the stream.
            height, width (`int`, *optional*): output size in pixels (multiples of VAE factor × patch size; default:
                the size the model was trained at, ``sample_height`` / ``sample_width`` of the config).
            num_frames (`int`, *optional*): output frames, ``1 + 4·(chunk·n − 1)`` (e.g. 21 or 81 for 3-frame chunks;
                ``__call__``'s default is 21). ``None`` (``stream``'s default) streams until the caller stops iterating,
                with constant memory: ``window_frames`` is then required and RoPE defaults to ``"relative"``.
            num_inference_steps (`int`, *optional*): steps per chunk (default: the scheduler's 4-step schedule).
            sigmas (`list[float]`, *optional*): explicit sigmas per chunk (overrides ``num_inference_steps``).
            guidance_scale (`float`): classifier-free guidance; 1 (distilled models) runs a single branch.
            generator (`torch.Generator`, *optional*): for reproducible noise.
            latents (`torch.Tensor`, *optional*): the initial noise of every chunk, ``[B, C, F_latent, h, w]``.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed text-encoder states (with
                ``switch_frames``, ``prompt_embeds`` is a list, one tensor per segment); the negative ones, as
                ``negative_prompt``, only with guidance and for every prompt.
            output_type (`str`): ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end (`Callable`, *optional*): called after every step as
                ``callback(pipe, step, timestep, callback_kwargs)``; may return a modified ``latents``.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed in ``callback_kwargs``.
            max_sequence_length (`int`, *optional*): padded text tokens; default: the tokenizer's ``model_max_length``
                when at most 512 (what the bundled model was trained with), else 512.
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. LoRA ``scale``).
            window_frames, sink_frames (`int`, *optional*): attention window and sinks, in latent frames (METHOD §2).
            context_noise (`float`): timestep of the context pass that writes the cache (0 = clean; METHOD §1).
            switch_frames (`list[int]`, *optional*): output frames at which the next prompt of the schedule takes
                over; a switch applies from the first chunk starting at or after that frame.
            rope (`str`, *optional*): ``"absolute"`` or ``"relative"`` cache positions (see :class:`KVCache`).
            return_trajectory (`bool`): also return each chunk's sampling record (:class:`ChunkTrajectory`: the input
                and prediction of every step, the output, and the context latents written to the cache).
"""


def _with_stream_arguments(method: Callable) -> Callable:
    """Insert the arguments ``__call__`` and ``stream`` share (``_STREAM_ARGUMENTS_DOC``) after the ``Args:`` line of
    ``method``'s docstring, as diffusers' ``replace_example_docstring`` inserts examples: written once, shown by both."""
    head, args_line, tail = method.__doc__.partition("        Args:\n")
    if not args_line:
        raise ValueError(f"The docstring of {method.__qualname__} has no `Args:` line.")
    method.__doc__ = head + args_line + _STREAM_ARGUMENTS_DOC + tail
    return method


#: A prompt taking over at some chunk: (index in the prompt schedule, prompt embeds, negative prompt embeds or None).
_PromptSegment = tuple[int, torch.Tensor, torch.Tensor | None]
#: ``(prompt, prompt_embeds) -> (prompt embeds, negative prompt embeds or None)`` with a stream's text settings.
_PromptEncoder = Callable[[str | list[str] | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class CausalVideoChunk(BaseOutput):
    """One streamed chunk.

    Attributes:
        frames: decoded frames of this chunk (``np``: ``[B, n, H, W, 3]`` in [0, 1]; ``pil``: list of lists of images;
            ``pt``: ``[B, n, 3, H, W]``), or ``None`` for ``output_type="latent"``.
        latents: the chunk's clean latents ``[B, C, f, h, w]`` (normalised, as the transformer produces them).
        chunk_index: position of the chunk in the stream.
        frame_start: index of the chunk's first output frame in the video.
        latent_frame_start: index of the chunk's first latent frame.
        prompt_index: index of the prompt in effect.
        trajectory: the sampling record when ``return_trajectory=True``.
    """

    frames: Any
    latents: torch.Tensor
    chunk_index: int
    frame_start: int
    latent_frame_start: int
    prompt_index: int = 0
    trajectory: ChunkTrajectory | None = None


@dataclass
class CausalVideoPipelineOutput(BaseOutput):
    """Output of :class:`CausalVideoPipeline`.

    Attributes:
        frames: the videos (``np``: ``[B, F, H, W, 3]`` in [0, 1]; ``pil``: list of lists of images; ``pt``:
            ``[B, F, 3, H, W]``; ``latent``: ``[B, C, F_latent, h, w]``).
        trajectory: per-chunk sampling records when ``return_trajectory=True``.
    """

    frames: Any
    trajectory: list[ChunkTrajectory] | None = None


@dataclass
class _StreamState:
    """What a stream carries from one chunk to the next (and what ``CausalVideoStream.switch_prompt`` changes).

    ``denoiser`` holds the KV cache and the prompt in effect; ``contexts`` the context latents (one ``[B, C, 1, h, w]``
    tensor per latent frame) of the frames the next chunk sees, which a prompt switch re-caches.
    """

    denoiser: CacheDenoiser
    decoder: StreamingVAEDecoder
    num_latent_frames: int | None
    frame: int = 0
    chunk_index: int = 0
    output_frame: int = 0
    prompt_index: int = 0
    contexts: dict[int, torch.Tensor] = field(default_factory=dict)
    pending_prompt: _PromptSegment | None = None


class CausalVideoStream:
    """An iterator over the chunks of a stream, with a handle to switch prompt mid-stream.

    Returned by :meth:`CausalVideoPipeline.stream`. ``switch_prompt(prompt)`` makes the next chunk (and the ones after
    it) follow ``prompt``: the text cache is dropped and the self-attention cache is rebuilt under the new prompt from
    the context latents the visible frames were written with (METHOD §2).
    """

    def __init__(
        self,
        chunks: Iterator[CausalVideoChunk],
        state: _StreamState,
        encode_prompt: _PromptEncoder,
    ) -> None:
        self._chunks = chunks
        self._state = state
        self._encode_prompt = encode_prompt

    def __iter__(self) -> CausalVideoStream:
        return self

    def __next__(self) -> CausalVideoChunk:
        with torch.no_grad():  # inference only, without changing the caller's grad mode between chunks
            return next(self._chunks)

    @property
    def cache(self) -> KVCache:
        return self._state.denoiser.kv_cache

    @property
    def latent_frame(self) -> int:
        """Latent frames generated so far."""
        return self._state.frame

    def switch_prompt(self, prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None) -> None:
        """Switch to a new prompt from the next chunk on."""
        embeds, negative = self._encode_prompt(prompt, prompt_embeds)
        batch = self._state.denoiser.prompt_embeds.shape[0]
        if embeds.shape[0] != batch:
            raise ValueError(f"The new prompt has batch {embeds.shape[0]}, the stream {batch}.")
        self._state.pending_prompt = (self._state.prompt_index + 1, embeds, negative)

    def close(self) -> None:
        self._chunks.close()


class CausalVideoPipeline(DiffusionPipeline):
    r"""Streaming text-to-video generation with a causal Wan transformer, a KV cache and a few-step sampler.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): tokenizer of the text encoder.
        text_encoder ([`~transformers.UMT5EncoderModel`]): frozen text encoder.
        transformer ([`CausalWanTransformer3DModel`]): the causal video transformer.
        vae ([`~diffusers.AutoencoderKLWan`]): the Wan video autoencoder.
        scheduler ([`ConsistencyFlowMatchScheduler`] or [`FlowMatchSDEScheduler`]): the step rule of the chunk sampler.
        sample_height, sample_width (`int`, *optional*): the video size the model was trained at, used when
            `height` / `width` are not given.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: UMT5EncoderModel,
        transformer: CausalWanTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: ConsistencyFlowMatchScheduler | FlowMatchSDEScheduler,
        sample_height: int | None = None,
        sample_width: int | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        # The size the model was trained at (saved in model_index.json): the default of `height` / `width`.
        self.register_to_config(sample_height=sample_height, sample_width=sample_width)
        self.vae_scale_factor_temporal = vae_temporal_factor(vae) if vae is not None else 4
        self.vae_scale_factor_spatial = vae_spatial_factor(vae) if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> CausalVideoPipeline:
        """Load from a local folder, or from a Hub repository id (downloaded first, then loaded from disk)."""
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            try:
                path = snapshot_download(path, **hub_kwargs)
            except Exception as err:  # a clear message for a path that is neither a folder nor a reachable repo
                raise FileNotFoundError(
                    f"{pretrained_model_name_or_path!r} is not a local folder and could not be downloaded from the "
                    f"Hub ({type(err).__name__}: {err})."
                ) from err
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ sizes
    @property
    def chunk_frames(self) -> int:
        return self.transformer.config.num_frames_per_chunk

    @property
    def default_height(self) -> int:
        """``sample_height`` of the config, else 8 patches of latent height."""
        sample = getattr(self.config, "sample_height", None)
        return sample or 8 * self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]

    @property
    def default_width(self) -> int:
        sample = getattr(self.config, "sample_width", None)
        return sample or 8 * self.vae_scale_factor_spatial * self.transformer.config.patch_size[2]

    def latent_frames_for(self, num_frames: int) -> int:
        """Latent frames of a video of ``num_frames`` output frames."""
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1

    # ------------------------------------------------------------------ text
    def default_max_sequence_length(self, max_sequence_length: int | None = None) -> int:
        """``max_sequence_length`` itself, or for ``None`` the tokenizer's ``model_max_length`` if at most 512, else
        512: the padded text length the transformer cross-attends to, which should be the one it was trained with."""
        if max_sequence_length is None:
            limit = getattr(self.tokenizer, "model_max_length", None)
            return int(limit) if isinstance(limit, int) and 0 < limit <= 512 else 512
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` must be a positive integer or None, got {max_sequence_length!r}")
        return max_sequence_length

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = False,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder states of the prompt (and of the negative prompt when guidance is on).

        ``max_sequence_length=None`` takes the tokenizer's ``model_max_length`` when it is at most 512 (a tokenizer
        saved for a model trained on shorter texts, as the bundled ShapesWorld one with 18), else Wan's 512.
        """
        max_sequence_length = self.default_max_sequence_length(max_sequence_length)
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        if prompt_embeds is None:
            prompt_embeds = encode_prompts(self.tokenizer, self.text_encoder, prompt, max_sequence_length, device, dtype)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch = prompt_embeds.shape[0]
            negative_prompt = negative_prompt or ""
            negative_prompt = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != batch:
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for {batch} prompts.")
            negative_prompt_embeds = encode_prompts(
                self.tokenizer, self.text_encoder, negative_prompt, max_sequence_length, device, dtype
            )
        return prompt_embeds, negative_prompt_embeds

    def _encode_stream_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        max_sequence_length: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt of a stream (the first, a scheduled one, or a ``switch_prompt``) in the transformer's dtype; the
        negative embeds only when guidance is on."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give `prompt` or `prompt_embeds`.")
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError("`prompt` is empty.")
        do_classifier_free_guidance = guidance_scale > 1.0
        with torch.no_grad():
            embeds, negative = self.encode_prompt(
                prompt,
                negative_prompt,
                do_classifier_free_guidance,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                max_sequence_length=max_sequence_length,
                dtype=self.transformer.dtype,
            )
        return embeds, negative if do_classifier_free_guidance else None

    def _encode_prompt_schedule(
        self,
        encode: _PromptEncoder,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | list[torch.Tensor] | None,
        switch_frames: list[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, _PromptSegment]]:
        """The first prompt's embeds (and negative embeds), and the later prompts of a schedule keyed by the index of
        the chunk they start at (the first chunk starting at or after their switch frame)."""
        if switch_frames is None:
            return (*encode(prompt, prompt_embeds), {})
        prompts = prompt if prompt is not None else [None] * (len(switch_frames) + 1)
        embeds = prompt_embeds if prompt_embeds is not None else [None] * len(prompts)
        segments = [encode(p, e) for p, e in zip(prompts, embeds)]
        schedule = {
            self._first_chunk_from(frame): (index, *segments[index])
            for index, frame in enumerate(switch_frames, start=1)
        }
        return (*segments[0], schedule)

    def _first_chunk_from(self, output_frame: int) -> int:
        """Index of the first chunk that starts at or after output frame ``output_frame``."""
        latent = self.latent_frames_for(output_frame) if output_frame > 0 else 0
        return -(-latent // self.chunk_frames)

    # ------------------------------------------------------------------ checks
    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | list[torch.Tensor] | None,
        height: int,
        width: int,
        num_frames: int | None,
        latents: torch.Tensor | None,
        window_frames: int | None,
        sink_frames: int,
        switch_frames: list[int] | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
        context_noise: float,
    ) -> None:
        """Turn every bad argument into one clear ``ValueError``."""
        factor = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(
                f"`height` and `width` must be positive multiples of {factor} (VAE factor "
                f"{self.vae_scale_factor_spatial} × patch {self.transformer.config.patch_size[1]}); got {height}×{width}."
            )
        chunk = self.chunk_frames
        t = self.vae_scale_factor_temporal
        if num_frames is not None:
            if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % t:
                raise ValueError(
                    f"`num_frames` must be 1 + {t}·k frames (the VAE's temporal factor), got {num_frames!r}; "
                    f"e.g. {1 + t * (chunk - 1)} or {1 + t * (2 * chunk - 1)}."
                )
            latent = self.latent_frames_for(num_frames)
            if latent % chunk:
                raise ValueError(
                    f"`num_frames`={num_frames} gives {latent} latent frames, not a multiple of the chunk size "
                    f"({chunk}); use num_frames = 1 + {t}·({chunk}·n − 1), e.g. {1 + t * (chunk * 2 - 1)} or "
                    f"{1 + t * (chunk * 7 - 1)}."
                )
        check_window(window_frames, sink_frames, chunk)
        if num_frames is None and window_frames is None:
            raise ValueError("An endless stream (`num_frames=None`) needs `window_frames` to keep memory bounded.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not 0 <= context_noise < num_train_timesteps:
            raise ValueError(f"`context_noise` is a timestep in [0, {num_train_timesteps}), got {context_noise!r}.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give `prompt` or `prompt_embeds`.")
        if switch_frames is not None:
            schedule = prompt if prompt is not None else prompt_embeds
            if not isinstance(schedule, (list, tuple)) or len(schedule) != len(switch_frames) + 1:
                raise ValueError(
                    f"With `switch_frames` ({len(switch_frames)} switches), `prompt` must be a list of "
                    f"{len(switch_frames) + 1} prompts (one per segment)."
                )
            if any(not isinstance(f, int) for f in switch_frames) or list(switch_frames) != sorted(set(switch_frames)):
                raise ValueError(f"`switch_frames` must be strictly increasing integers, got {switch_frames}.")
            if switch_frames and switch_frames[0] <= 0:
                raise ValueError(f"`switch_frames` must be positive frame indices, got {switch_frames}.")
            if num_frames is not None and switch_frames and switch_frames[-1] >= num_frames:
                raise ValueError(f"`switch_frames` must be below `num_frames` ({num_frames}), got {switch_frames}.")
        else:
            for p in [prompt] if isinstance(prompt, str) else (prompt or []):
                if not isinstance(p, str) or not p.strip():
                    raise ValueError(f"`prompt` must be non-empty text, got {p!r}.")
        if latents is not None:
            first = prompt_embeds if prompt_embeds is not None else prompt  # the embeds win, as in `encode_prompt`
            first = first[0] if switch_frames is not None else first  # a schedule: its first segment
            batch = 1 if isinstance(first, str) else len(first)
            h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
            frames = None if num_frames is None else self.latent_frames_for(num_frames)
            expected = (batch, self.transformer.config.in_channels, frames, h, w)
            if num_frames is None or tuple(latents.shape) != expected:
                raise ValueError(f"`latents` must have shape {list(expected)} (and `num_frames` must be set).")

    # ------------------------------------------------------------------ preparation
    def prepare_kv_cache(
        self,
        batch_size: int,
        do_classifier_free_guidance: bool,
        window_frames: int | None,
        sink_frames: int,
        rope: str,
    ) -> KVCache:
        """An empty KV cache for a stream: one row per sample and guidance branch (METHOD §2)."""
        return KVCache.for_model(
            self.transformer,
            batch_size * (2 if do_classifier_free_guidance else 1),
            window_frames=window_frames,
            sink_frames=sink_frames,
            rope=rope,
        )

    def _step_end_hook(
        self,
        denoiser: CacheDenoiser,
        progress: tqdm,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> Callable[[int, int, float, torch.Tensor], torch.Tensor]:
        """The sampler's per-step hook: advance the progress bar and call ``callback_on_step_end`` (diffusers'
        signature, with the step counted over the whole stream and the step's entry of ``scheduler.timesteps``),
        whose ``latents`` replace the step's output."""
        timesteps = self.scheduler.timesteps
        num_steps = len(timesteps)

        def step_end(chunk_index: int, step: int, timestep: float, latents: torch.Tensor) -> torch.Tensor:
            progress.update()
            if callback_on_step_end is None:
                return latents
            tensors = {"latents": latents, "prompt_embeds": denoiser.prompt_embeds}
            outputs = callback_on_step_end(
                self,
                chunk_index * num_steps + step,
                timesteps[step],
                {name: tensors[name] for name in callback_on_step_end_tensor_inputs},
            )
            return outputs.pop("latents", latents)

        return step_end

    def _progress(self, num_latent_frames: int | None) -> tqdm:
        """A bar over every step of the video, or a counter without a total for an endless stream."""
        if num_latent_frames is None:
            return tqdm(total=None, **getattr(self, "_progress_bar_config", {}))
        num_chunks = -(-num_latent_frames // self.chunk_frames)
        return self.progress_bar(total=len(self.scheduler.timesteps) * num_chunks)

    # ------------------------------------------------------------------ the chunk loop
    def _switch_prompt_if_due(
        self, state: _StreamState, sampler: ChunkSampler, prompt_schedule: dict[int, _PromptSegment]
    ) -> None:
        """Before a chunk: apply a scheduled or requested prompt switch (LongLive re-cache, METHOD §2). The text cache
        is dropped, and the self-attention cache is rebuilt under the new prompt from the context latents the visible
        frames were written with (their context noise included), so it holds what a stream under the new prompt would
        have written for them."""
        switch = prompt_schedule.get(state.chunk_index) or state.pending_prompt
        if switch is None:
            return
        state.pending_prompt = None
        state.prompt_index, state.denoiser.prompt_embeds, state.denoiser.negative_prompt_embeds = switch
        state.denoiser.kv_cache.reset_text()
        if state.frame:
            sampler.recache(state.denoiser, state.contexts, self.chunk_frames)

    def _keep_contexts(self, state: _StreamState, trajectory: ChunkTrajectory) -> None:
        """Keep the chunk's context latents frame by frame, and forget the frames the next chunk no longer sees."""
        if trajectory.context is None:  # the last chunk of a finite video: nothing follows
            return
        for i in range(trajectory.context.shape[2]):
            state.contexts[trajectory.frame_start + i] = trajectory.context[:, :, i : i + 1]
        cache = state.denoiser.kv_cache
        if cache.window_frames is not None:
            end = trajectory.frame_start + trajectory.clean.shape[2]
            visible = set(visible_history(end, self.chunk_frames, cache.window_frames, cache.sink_frames))
            state.contexts = {f: v for f, v in state.contexts.items() if f in visible}

    def _decode_chunk(self, decoder: StreamingVAEDecoder, latents: torch.Tensor, output_type: str) -> Any:
        """Decode one chunk with the stream's decoder (its causal cache continues the previous chunks)."""
        if output_type == "latent":
            return None
        pixels = decoder.decode(denormalize_latents(latents.to(self.vae.dtype), self.vae))
        return self.video_processor.postprocess_video(pixels, output_type=output_type)

    def _chunk_loop(
        self,
        state: _StreamState,
        sampler: ChunkSampler,
        sampled: Iterator[ChunkTrajectory],
        prompt_schedule: dict[int, _PromptSegment],
        output_type: str,
        return_trajectory: bool,
        progress: tqdm,
    ) -> Iterator[CausalVideoChunk]:
        """Per chunk: switch prompt if due → sample the chunk (``sampled``, the sampler's own loop) → keep its
        contexts → decode → yield."""
        with progress:
            while state.num_latent_frames is None or state.frame < state.num_latent_frames:
                self._switch_prompt_if_due(state, sampler, prompt_schedule)
                trajectory = next(sampled)
                trajectory.prompt_index = state.prompt_index
                self._keep_contexts(state, trajectory)
                frames = self._decode_chunk(state.decoder, trajectory.clean, output_type)
                num_frames = trajectory.clean.shape[2]
                yield CausalVideoChunk(
                    frames=frames,
                    latents=trajectory.clean,
                    chunk_index=state.chunk_index,
                    frame_start=state.output_frame,
                    latent_frame_start=state.frame,
                    prompt_index=state.prompt_index,
                    trajectory=trajectory if return_trajectory else None,
                )
                state.output_frame += frames_for_latents(num_frames, state.frame, self.vae_scale_factor_temporal)
                state.frame += num_frames
                state.chunk_index += 1

    # ------------------------------------------------------------------ public entry points
    @_with_stream_arguments
    def stream(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        window_frames: int | None = None,
        sink_frames: int = 0,
        context_noise: float = 0.0,
        switch_frames: list[int] | None = None,
        rope: str | None = None,
        return_trajectory: bool = False,
    ) -> CausalVideoStream:
        r"""Generate a video chunk by chunk, yielding each decoded chunk as soon as it is ready.

        The inputs are checked, the prompts encoded and the cache, decoder and sampler prepared at once; each chunk is
        made when the returned :class:`CausalVideoStream` is asked for it. Its ``switch_prompt()`` changes the prompt
        interactively.

        Args:
        """
        # 1. Check inputs
        height = height or self.default_height
        width = width or self.default_width
        switch_frames = list(switch_frames) if switch_frames is not None else None
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt,
            prompt_embeds,
            height,
            width,
            num_frames,
            latents,
            window_frames,
            sink_frames,
            switch_frames,
            output_type,
            callback_on_step_end_tensor_inputs,
            context_noise,
        )

        # 2. Encode the prompt (and the later prompts of a schedule; the negative prompt serves every prompt)
        encode = partial(
            self._encode_stream_prompt,
            negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
        )
        prompt_embeds, negative_prompt_embeds, prompt_schedule = self._encode_prompt_schedule(
            encode, prompt, prompt_embeds, switch_frames
        )

        # 3. Prepare the schedule, the latents, the cache, the decoder and the sampler
        device, dtype = self._execution_device, self.transformer.dtype
        self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        batch_size = prompt_embeds.shape[0]
        num_latent_frames = None if num_frames is None else self.latent_frames_for(num_frames)
        latent_height = height // self.vae_scale_factor_spatial
        latent_width = width // self.vae_scale_factor_spatial
        latent_shape = (batch_size, self.transformer.config.in_channels, latent_height, latent_width)
        if latents is not None:  # else the sampler draws each chunk's noise when the chunk starts
            latents = latents.to(device, dtype)
        if rope is None:
            rope = "relative" if num_frames is None else "absolute"
        kv_cache = self.prepare_kv_cache(batch_size, negative_prompt_embeds is not None, window_frames, sink_frames, rope)
        denoiser = CacheDenoiser(
            self.transformer, kv_cache, prompt_embeds, negative_prompt_embeds, guidance_scale, attention_kwargs
        )
        state = _StreamState(denoiser, StreamingVAEDecoder(self.vae), num_latent_frames)
        sampler = ChunkSampler(self.scheduler, context_noise)
        progress = self._progress(num_latent_frames)
        sampled = sampler.chunks(
            denoiser,
            latent_shape,
            self.chunk_frames,
            num_latent_frames,
            generator,
            latents=latents,
            record=return_trajectory,
            callback=self._step_end_hook(
                denoiser, progress, callback_on_step_end, callback_on_step_end_tensor_inputs or ["latents"]
            ),
            device=device,
            dtype=dtype,
        )

        # 4. The chunk loop, run as the stream is read
        chunks = self._chunk_loop(state, sampler, sampled, prompt_schedule, output_type, return_trajectory, progress)
        return CausalVideoStream(chunks, state, encode)

    @torch.no_grad()
    @_with_stream_arguments
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 21,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        window_frames: int | None = None,
        sink_frames: int = 0,
        context_noise: float = 0.0,
        switch_frames: list[int] | None = None,
        rope: str | None = None,
        return_trajectory: bool = False,
    ) -> CausalVideoPipelineOutput | tuple:
        r"""Generate a whole video: the chunks of :meth:`stream` put end to end.

        Args:
            return_dict (`bool`): return a :class:`CausalVideoPipelineOutput` (else a tuple).
        """
        stream = self.stream(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
            attention_kwargs=attention_kwargs,
            window_frames=window_frames,
            sink_frames=sink_frames,
            context_noise=context_noise,
            switch_frames=switch_frames,
            rope=rope,
            return_trajectory=return_trajectory,
        )
        chunks = list(stream)
        self.maybe_free_model_hooks()

        if output_type == "latent":
            frames = torch.cat([c.latents for c in chunks], dim=2)
        elif output_type == "np":
            frames = np.concatenate([c.frames for c in chunks], axis=1)
        elif output_type == "pt":
            frames = torch.cat([c.frames for c in chunks], dim=1)
        else:
            frames = [sum((c.frames[b] for c in chunks), []) for b in range(len(chunks[0].frames))]
        trajectory = [c.trajectory for c in chunks] if return_trajectory else None
        if not return_dict:
            return (frames, trajectory) if return_trajectory else (frames,)
        return CausalVideoPipelineOutput(frames=frames, trajectory=trajectory)


for _cls in (CausalVideoPipeline, CausalVideoPipelineOutput, CausalVideoChunk):
    _cls.__module__ = "diffusers_raven"

__all__ = ["CausalVideoChunk", "CausalVideoPipeline", "CausalVideoPipelineOutput", "CausalVideoStream"]
