"""CausalVideoPipeline: streaming text-to-video generation with a causal Wan transformer and a KV cache.

The algorithm (METHOD.md §1–§2) is the package's one chunk loop, ``ChunkSampler`` of :mod:`.chunk_sampler`: per chunk
of ``num_frames_per_chunk`` latent frames it draws the chunk's noise, runs the few-step schedule with the transformer
attending to the KV cache, then writes the chunk's context (its output, noised to the ``context_noise`` timestep) to the
cache in one more pass, skipped after the last chunk of a finite video, which nothing reads. Between two chunks the
pipeline adds what a stream needs: a prompt switch (LongLive re-cache of the contexts the visible frames were written
with, METHOD §2) and decoding with the streaming VAE decoder, whose causal-convolution cache persists between chunks.

:meth:`CausalVideoPipeline.stream` yields decoded chunks as they are made, for a fixed length or endlessly
(``num_frames=None``), and can switch prompt mid-stream; ``__call__`` puts the chunks of a stream end to end.

Both can continue a given clip (``video=`` frames or ``video_latents=``): its chunks are encoded with the streaming VAE
encoder and written to the cache by context passes (``ChunkSampler.prefill``, the same context-noise rule), then
generation goes on after them. A clip whose latent length is not a whole number of chunks starts with a shorter chunk.

The pipeline follows ``diffusers.WanPipeline``'s conventions: its ``__call__`` arguments (``num_videos_per_prompt``,
``guidance_scale_2`` refused as Wan refuses it without a second transformer), the ``guidance_scale``,
``do_classifier_free_guidance``, ``num_timesteps``, ``current_timestep``, ``attention_kwargs`` and ``interrupt``
properties, and step-end callbacks that may change ``_guidance_scale``, set ``_interrupt`` or return new
``latents`` / ``prompt_embeds`` / ``negative_prompt_embeds``. A step here is one step of one chunk: ``num_timesteps``
counts the steps of every generated chunk, the number of callback calls.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import PIL.Image
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
    StreamingVAEEncoder,
    denormalize_latents,
    frames_for_latents,
    normalize_latents,
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
                with constant memory: ``window_frames`` is then required and RoPE defaults to ``"relative"``. When a
                clip is continued, ``num_frames`` counts the whole video, the clip's frames included: ``1 + 4·(P +
                chunk·n − 1)`` for a clip of ``P`` latent frames.
            num_inference_steps (`int`, *optional*): steps per chunk (default: the scheduler's 4-step schedule).
            sigmas (`list[float]`, *optional*): explicit sigmas per chunk (overrides ``num_inference_steps``).
            guidance_scale (`float`): classifier-free guidance; 1 (distilled models) runs a single branch. A step-end
                callback may change ``pipe._guidance_scale`` for the steps after it (at most 1 turns guidance off; it
                cannot turn on guidance a stream started without).
            guidance_scale_2 (`float`, *optional*): ``WanPipeline``'s guidance of a second, low-noise transformer (Wan
                2.2); this pipeline has one transformer, so it must stay ``None`` (as ``WanPipeline`` requires without
                ``boundary_ratio``).
            num_videos_per_prompt (`int`): videos per prompt; the batch is ``len(prompt) · num_videos_per_prompt``,
                each prompt's videos next to each other (as ``WanPipeline`` orders them).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): for reproducible noise; a list has one
                generator per video (``len(prompt) · num_videos_per_prompt``), and a video made in a batch is then the
                video made alone with its generator.
            latents (`torch.Tensor`, *optional*): the initial noise of every chunk, ``[B, C, F_latent, h, w]`` (``B``
                counting ``num_videos_per_prompt``).
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed text-encoder states (with
                ``switch_frames``, ``prompt_embeds`` is a list, one tensor per segment); the negative ones, as
                ``negative_prompt``, only with guidance and for every prompt.
            output_type (`str`): ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called after
                every step of every chunk as ``callback(pipe, step, timestep, callback_kwargs)``, ``step`` counted over
                the whole video (``chunk · steps + k``, up to ``pipe.num_timesteps``); the dict it returns may replace
                ``latents`` (the chunk's) and ``prompt_embeds`` / ``negative_prompt_embeds`` (used from the next pass
                on; the history already in the cache stays). It may also set ``pipe._guidance_scale`` and
                ``pipe._interrupt``: an interrupt skips the chunk's remaining steps (its latents are decoded as they
                stand, as ``WanPipeline`` does) and ends the video after that chunk.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed in ``callback_kwargs``, among
                ``_callback_tensor_inputs`` (default ``["latents"]``).
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
            video (*optional*): a clip to continue, as diffusers' video pipelines take it: a list of PIL images (one
                image starts an image-to-video stream), a list of such lists (a batch), or ``[F, H, W, 3]`` /
                ``[B, F, H, W, 3]`` arrays or ``[F, 3, H, W]`` / ``[B, F, 3, H, W]`` tensors, float in [0, 1] or
                ``uint8``. Frames of another size are resized to ``height`` × ``width`` (with a warning). The VAE
                encodes the clip chunk by chunk and context passes write it to the cache; generation continues after
                it. The encoder takes ``1 + 4·k`` frames: from a clip of another length the last ``1 + 4·k`` are kept.
                A clip longer than the window can show the first generated chunk (``window_frames − chunk`` latent
                frames) is cut to its last frames. Both cuts are logged as warnings.
            video_latents (`torch.Tensor`, *optional*): the clip as normalised latents ``[B, C, P, h, w]`` (as
                ``output_type="latent"`` returns them), instead of ``video``; the same window rule applies.
            return_prefix (`bool`): start the output with the given clip (decoded from its latents, the VAE round
                trip of ``video``) or leave it out; chunks of the clip have ``is_prefix=True``.
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
        is_prefix: the chunk is part of a given clip being continued (encoded and written to the cache, not sampled).
    """

    frames: Any
    latents: torch.Tensor
    chunk_index: int
    frame_start: int
    latent_frame_start: int
    prompt_index: int = 0
    trajectory: ChunkTrajectory | None = None
    is_prefix: bool = False


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
class _Prefix:
    """A clip to continue, checked and cut to what will be used: pixel frames ``[B, 3, F, H, W]`` in [-1, 1] (encoded
    chunk by chunk when the stream reaches them) or normalised latents ``[B, C, P, h, w]``."""

    pixels: torch.Tensor | None
    latents: torch.Tensor | None
    num_latent_frames: int

    @property
    def batch_size(self) -> int:
        return (self.pixels if self.pixels is not None else self.latents).shape[0]

    def expand(self, batch_size: int, num_videos_per_prompt: int = 1) -> _Prefix:
        """The clip for a batch of ``batch_size`` videos (prompts × ``num_videos_per_prompt``): one clip serves them
        all, one clip per prompt serves that prompt's videos, or one clip per video."""
        if self.batch_size == batch_size:
            return self
        tensors = (self.pixels, self.latents)
        if self.batch_size == 1:
            pixels, latents = (None if x is None else x.expand(batch_size, *x.shape[1:]) for x in tensors)
        elif self.batch_size * num_videos_per_prompt == batch_size:
            pixels, latents = (None if x is None else x.repeat_interleave(num_videos_per_prompt, 0) for x in tensors)
        else:
            per_video = f" or one per video ({batch_size})" if num_videos_per_prompt > 1 else ""
            raise ValueError(
                f"The clip to continue (`video` / `video_latents`) has batch {self.batch_size}; give one clip, one per "
                f"prompt ({batch_size // num_videos_per_prompt}){per_video}."
            )
        return _Prefix(pixels, latents, self.num_latent_frames)


def _chunk_sizes(num_frames: int, chunk_frames: int) -> list[int]:
    """Chunks of a clip of ``num_frames`` latent frames: whole chunks after a shorter first one when the length is not
    a whole number of chunks (the chunks after the clip then start where it ends)."""
    first = num_frames % chunk_frames
    return ([first] if first else []) + [chunk_frames] * (num_frames // chunk_frames)


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
    prefix_frames: int = 0
    first_chunk_frames: int | None = None
    return_prefix: bool = True


@dataclass
class _RunState:
    """The values behind the pipeline's diffusers properties (``guidance_scale``, ``interrupt``, …) for one stream.

    The pipeline's attributes (``_guidance_scale``, ``_interrupt``, …) are what callbacks read and write, as in
    diffusers. A stream is lazy, so two streams of one pipeline may alternate: each stream keeps its own values here,
    puts them back on the pipeline when it resumes after another stream ran (:meth:`enter`), and takes back what
    callbacks or other threads wrote when it pauses (:meth:`leave`).
    """

    guidance_scale: float
    attention_kwargs: dict[str, Any] | None
    num_timesteps: int | None
    interrupt: bool = False
    current_timestep: torch.Tensor | None = None

    _ATTRIBUTES = ("guidance_scale", "attention_kwargs", "num_timesteps", "interrupt", "current_timestep")

    def enter(self, pipeline: CausalVideoPipeline) -> None:
        if getattr(pipeline, "_active_run", None) is not self:
            for name in self._ATTRIBUTES:
                setattr(pipeline, f"_{name}", getattr(self, name))
            pipeline._active_run = self

    def leave(self, pipeline: CausalVideoPipeline) -> None:
        for name in self._ATTRIBUTES:
            setattr(self, name, getattr(pipeline, f"_{name}"))


class _PipelineDenoiser(CacheDenoiser):
    """The stream's :class:`CacheDenoiser`, reading the pipeline's ``_guidance_scale`` at every pass (so a callback
    can change it) and setting its ``_current_timestep`` to the timestep of the pass in progress.

    A scale of at most 1 is no guidance, as ``WanPipeline.do_classifier_free_guidance`` has it: the velocity is the
    positive branch alone. The cache keeps both branches (their history stays written), so guidance can come back.
    """

    def __init__(self, pipeline: CausalVideoPipeline, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline

    def __call__(
        self, latents: torch.Tensor, timestep: float, frame_offset: int, update_cache: bool = False
    ) -> torch.Tensor | None:
        pipe = self.pipeline
        pipe._current_timestep = torch.tensor(float(timestep))
        scale = float(pipe._guidance_scale)
        if scale > 1.0 and not self.do_classifier_free_guidance:
            raise ValueError(
                f"`_guidance_scale` was set to {scale} during a stream started without guidance (guidance_scale <= 1): "
                "a callback can change the scale or turn guidance off, not turn it on (start with guidance_scale > 1)."
            )
        self.guidance_scale = scale
        return super().__call__(latents, timestep, frame_offset, update_cache)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return cond if self.guidance_scale <= 1.0 else super().guide(uncond, cond)


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
        pipeline: CausalVideoPipeline,
        run: _RunState,
    ) -> None:
        self._chunks = chunks
        self._state = state
        self._encode_prompt = encode_prompt
        self._pipeline = pipeline
        self._run = run

    def __iter__(self) -> CausalVideoStream:
        return self

    def __next__(self) -> CausalVideoChunk:
        self._run.enter(self._pipeline)  # the pipeline's properties are this stream's while it makes a chunk
        try:
            with torch.no_grad():  # inference only, without changing the caller's grad mode between chunks
                return next(self._chunks)
        finally:
            self._run.leave(self._pipeline)

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
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

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

    # ------------------------------------------------------------------ compiled path
    def enable_compile(self, **compile_kwargs) -> None:
        """Compile the transformer's repeated blocks with ``torch.compile`` (regional compilation, diffusers'
        ``transformer.compile_repeated_blocks(**compile_kwargs)``; default backend ``"inductor"``).

        Each block's per-token work (norms, modulation, projections, rotary embedding, FFN, cross-attention) is
        compiled; the attention plan (the KV-cache reads and writes over a history that grows from chunk to chunk)
        runs between graphs, so a stream compiles during its first chunks and never again, with a global or a
        windowed cache. ``fullgraph=True`` is not supported (the plan is a graph break). Off by default: on a CPU, at
        the bundled model's sizes, the compiled blocks are not faster (see ``docs/performance.md``).
        """
        self.transformer.compile_repeated_blocks(**compile_kwargs)

    def disable_compile(self) -> None:
        """Run the transformer's blocks eagerly again (undo :meth:`enable_compile`; compiled code stays cached)."""
        for block in self.transformer.blocks:
            block._compiled_call_impl = None

    @property
    def is_compiled(self) -> bool:
        """Whether the transformer's blocks run compiled (:meth:`enable_compile`)."""
        return any(getattr(block, "_compiled_call_impl", None) is not None for block in self.transformer.blocks)

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

    # ------------------------------------------------------------------ diffusers' run properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int | None:
        """Denoising steps of the video: steps per chunk × generated chunks, the number of step-end callback calls
        (``None`` for an endless stream)."""
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """Timestep of the transformer pass in progress (a step's, or ``context_noise`` during a context pass);
        ``None`` once the video is done."""
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

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
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder states of the prompt (and of the negative prompt when guidance is on), each row repeated
        ``num_videos_per_prompt`` times in place (``WanPipeline``'s order; given embeds are repeated too).

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
        if num_videos_per_prompt != 1:
            prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _encode_stream_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        max_sequence_length: int | None,
        num_videos_per_prompt: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt of a stream (the first, a scheduled one, or a ``switch_prompt``) in the transformer's dtype,
        ``num_videos_per_prompt`` rows per prompt; the negative embeds only when guidance is on."""
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
                num_videos_per_prompt,
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
        first_chunk_frames: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, _PromptSegment]]:
        """The first prompt's embeds (and negative embeds), and the later prompts of a schedule keyed by the index of
        the chunk they start at (the first chunk starting at or after their switch frame; chunks of a continued clip
        count, and its first chunk may be shorter, ``first_chunk_frames``)."""
        if switch_frames is None:
            return (*encode(prompt, prompt_embeds), {})
        prompts = prompt if prompt is not None else [None] * (len(switch_frames) + 1)
        embeds = prompt_embeds if prompt_embeds is not None else [None] * len(prompts)
        segments = [encode(p, e) for p, e in zip(prompts, embeds)]
        schedule = {
            self._first_chunk_from(frame, first_chunk_frames): (index, *segments[index])
            for index, frame in enumerate(switch_frames, start=1)
        }
        return (*segments[0], schedule)

    def _first_chunk_from(self, output_frame: int, first_chunk_frames: int | None = None) -> int:
        """Index of the first chunk that starts at or after output frame ``output_frame``; the chunks start at latent
        frames 0, ``first_chunk_frames`` (default: the chunk size), then every chunk."""
        latent = self.latent_frames_for(output_frame) if output_frame > 0 else 0
        first = first_chunk_frames or self.chunk_frames
        return 0 if latent == 0 else 1 + -(-max(latent - first, 0) // self.chunk_frames)

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
        prefix_latent_frames: int = 0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_scale_2: float | None = None,
    ) -> None:
        """Turn every bad argument into one clear ``ValueError``. ``prefix_latent_frames``: the latent length of a clip
        being continued (``num_frames`` then counts the whole video, clip included)."""
        if guidance_scale_2 is not None:
            raise ValueError(
                "`guidance_scale_2` is the guidance of Wan 2.2's second (low-noise) transformer; this pipeline has one "
                "transformer (as WanPipeline without `boundary_ratio`): leave it None and set `guidance_scale`."
            )
        if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, int) or (
            num_videos_per_prompt < 1
        ):
            raise ValueError(f"`num_videos_per_prompt` must be a positive integer, got {num_videos_per_prompt!r}.")
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
            p = prefix_latent_frames
            if p and (latent <= p or (latent - p) % chunk):
                examples = " or ".join(str(1 + t * (p + chunk * n - 1)) for n in (1, 2))
                raise ValueError(
                    f"`num_frames` counts the whole video, the given clip included: the clip is {p} latent frames "
                    f"({frames_for_latents(p, 0, t)} frames), so `num_frames` must be 1 + {t}·({p} + {chunk}·n − 1), "
                    f"e.g. {examples}; got {num_frames}."
                )
            if not p and latent % chunk:
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
        first = prompt_embeds if prompt_embeds is not None else prompt  # the embeds win, as in `encode_prompt`
        first = first[0] if switch_frames is not None else first  # a schedule: its first segment
        batch = (1 if isinstance(first, str) else len(first)) * num_videos_per_prompt
        if isinstance(generator, (list, tuple)) and len(generator) not in (1, batch):
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators for a batch of {batch} videos (prompts × "
                "`num_videos_per_prompt`): give one generator, or one per video."
            )
        if latents is not None:
            h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
            frames = None if num_frames is None else self.latent_frames_for(num_frames)
            expected = (batch, self.transformer.config.in_channels, frames, h, w)
            if num_frames is None or tuple(latents.shape) != expected:
                raise ValueError(f"`latents` must have shape {list(expected)} (and `num_frames` must be set).")

    # ------------------------------------------------------------------ a clip to continue
    def clip_capacity(self, window_frames: int | None) -> int | None:
        """Latent frames of a given clip the first generated chunk can see: ``window_frames`` minus the chunk, or
        ``None`` (no limit) without a window. A longer clip is cut to its last frames."""
        chunk = self.chunk_frames
        if isinstance(window_frames, int) and not isinstance(window_frames, bool) and window_frames > chunk:
            return window_frames - chunk
        return None

    def clip_frames_kept(self, num_clip_frames: int, window_frames: int | None = None) -> tuple[int, int]:
        """``(frames, latent frames)`` that :meth:`stream` keeps of a clip of ``num_clip_frames`` pixel frames: its
        last ``1 + t·k`` frames (what the VAE encodes), within :meth:`clip_capacity`."""
        t = self.vae_scale_factor_temporal
        latent = (num_clip_frames - 1) // t + 1 if num_clip_frames > 0 else 0
        capacity = self.clip_capacity(window_frames)
        if capacity is not None:
            latent = min(latent, capacity)
        return (1 + t * (latent - 1) if latent else 0), latent

    def prepare_prefix(
        self,
        video: Any,
        video_latents: torch.Tensor | None,
        height: int,
        width: int,
        window_frames: int | None,
    ) -> _Prefix | None:
        """Check a clip to continue and cut it to what will be used (``None`` without one).

        Pixel frames are resized to ``height`` × ``width`` and cut to their last ``1 + t·k`` frames (what the VAE
        encodes); with a window, a clip is cut to its last ``window_frames − chunk`` latent frames, all the first
        generated chunk can see. Resizing and cuts are logged as warnings; bad input is a ``ValueError`` naming it.
        """
        if video is None and video_latents is None:
            return None
        if video is not None and video_latents is not None:
            raise ValueError("Give the clip to continue as `video` (frames) or as `video_latents`, not both.")
        chunk, t = self.chunk_frames, self.vae_scale_factor_temporal
        capacity = self.clip_capacity(window_frames)
        window_note = (
            f"the window ({window_frames} latent frames, counting the {chunk}-frame chunk) shows the first generated "
            f"chunk at most {capacity} latent frames"
        )

        if video_latents is not None:
            h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
            channels = self.transformer.config.in_channels
            if not isinstance(video_latents, torch.Tensor) or video_latents.ndim != 5:
                raise ValueError(f"`video_latents` must be a tensor [B, {channels}, P, {h}, {w}], got {video_latents!r}.")
            if video_latents.shape[1] != channels or tuple(video_latents.shape[3:]) != (h, w):
                raise ValueError(
                    f"`video_latents` must be [B, {channels}, P, {h}, {w}] for {height}×{width} frames, got "
                    f"{list(video_latents.shape)}; latents cannot be resized: pass `height` / `width` that match them."
                )
            latents = video_latents
            if latents.shape[2] == 0:
                raise ValueError("`video_latents` has no frames: the clip to continue needs at least one.")
            if capacity is not None and latents.shape[2] > capacity:
                logger.warning(
                    f"`video_latents` has {latents.shape[2]} latent frames but {window_note}: continuing from its last "
                    f"{capacity}."
                )
                latents = latents[:, :, -capacity:]
            return _Prefix(pixels=None, latents=latents, num_latent_frames=latents.shape[2])

        pixels = self._video_tensor(video, height, width)
        total = pixels.shape[2]
        keep, latent = self.clip_frames_kept(total, window_frames)
        reasons = []
        if (total - 1) % t:
            reasons.append(f"the VAE encodes 1 + {t}·k frames")
        if latent < (total - 1) // t + 1:
            reasons.append(window_note)
        if keep < total:
            logger.warning(
                f"`video` has {total} frames; continuing from its last {keep} ({latent} latent frames): "
                + "; ".join(reasons) + "."
            )
            pixels = pixels[:, :, total - keep :]
        return _Prefix(pixels=pixels, latents=None, num_latent_frames=latent)

    def _video_tensor(self, video: Any, height: int, width: int) -> torch.Tensor:
        """``video`` in any form diffusers' video pipelines take, as ``[B, 3, F, height, width]`` in [-1, 1]."""
        forms = (
            "a list of PIL images, a list of such lists, [F, H, W, 3] / [B, F, H, W, 3] arrays or [F, 3, H, W] / "
            "[B, F, 3, H, W] tensors (float in [0, 1] or uint8)"
        )
        if isinstance(video, PIL.Image.Image):
            video = [video]  # one image: an image-to-video start
        if isinstance(video, (list, tuple)):
            if not video or (isinstance(video[0], (list, tuple)) and not video[0]):
                raise ValueError("`video` has no frames: the clip to continue needs at least one.")
            nested = isinstance(video[0], (list, tuple))
            items = [frame for clip in video for frame in clip] if nested else list(video)
            if all(isinstance(frame, PIL.Image.Image) for frame in items):
                size = items[0].size[::-1]
                if any(frame.size[::-1] != size for frame in items):
                    raise ValueError("The frames of `video` do not all have the same size.")
                rgb = [[frame.convert("RGB") for frame in clip] for clip in video] if nested else [
                    frame.convert("RGB") for frame in video
                ]
                return self._resized(rgb, size, height, width)
            arrays = all(isinstance(x, (np.ndarray, torch.Tensor)) for x in items) and len({x.ndim for x in items}) == 1
            if arrays and not nested and items[0].ndim in (3, 4):  # a list of frames, or a batch of [F, ...] clips
                if any(tuple(x.shape) != tuple(items[0].shape) for x in items):
                    raise ValueError("The frames (or clips) of `video` do not all have the same shape.")
                video = np.stack(items) if isinstance(items[0], np.ndarray) else torch.stack(items)
            else:
                raise ValueError(f"`video` must be {forms}; got a list of {type(items[0]).__name__}.")
        if isinstance(video, np.ndarray):
            if video.ndim not in (4, 5) or video.shape[-1] != 3:
                raise ValueError(f"A `video` array must be [F, H, W, 3] or [B, F, H, W, 3], got {list(video.shape)}.")
            video = torch.from_numpy(np.ascontiguousarray(video)).movedim(-1, -3)
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"`video` must be {forms}; got {type(video).__name__}.")
        if video.ndim not in (4, 5) or video.shape[-3] != 3:
            raise ValueError(f"A `video` tensor must be [F, 3, H, W] or [B, F, 3, H, W], got {list(video.shape)}.")
        if video.shape[-4] == 0:
            raise ValueError("`video` has no frames: the clip to continue needs at least one.")
        if video.dtype == torch.uint8:
            video = video.float() / 255
        elif not video.is_floating_point():
            raise ValueError(f"`video` must be float in [0, 1] or uint8, got {video.dtype}.")
        video = video.float()
        if video.min() < 0 or video.max() > 1:
            raise ValueError(
                f"`video` values must lie in [0, 1] (or be uint8), got [{float(video.min()):.3g}, "
                f"{float(video.max()):.3g}]."
            )
        return self._resized(video.cpu(), tuple(video.shape[-2:]), height, width)

    def _resized(self, video: Any, size: tuple[int, int], height: int, width: int) -> torch.Tensor:
        """Preprocess ``video`` (PIL lists, or a float tensor in [0, 1] with frames ``[..., F, 3, H, W]``) to
        ``[B, 3, F, height, width]`` in [-1, 1], saying so when the frames are resized."""
        if tuple(size) != (height, width):
            logger.warning(
                f"The frames of `video` are {size[0]}×{size[1]} pixels; they are resized to {height}×{width}, the size "
                "of the generated frames (pass `height` / `width` to generate at another size)."
            )
        return self.video_processor.preprocess_video(video, height=height, width=width)

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
        signature, with the step counted over the whole stream and the step's entry of ``scheduler.timesteps``).
        Returned ``latents`` replace the step's output; returned ``prompt_embeds`` / ``negative_prompt_embeds`` serve
        the passes after it (the cached text keys and values are dropped)."""
        timesteps = self.scheduler.timesteps
        num_steps = len(timesteps)

        def step_end(chunk_index: int, step: int, timestep: float, latents: torch.Tensor) -> torch.Tensor:
            progress.update()
            if callback_on_step_end is None:
                return latents
            tensors = {
                "latents": latents,
                "prompt_embeds": denoiser.prompt_embeds,
                "negative_prompt_embeds": denoiser.negative_prompt_embeds,
            }
            outputs = callback_on_step_end(
                self,
                chunk_index * num_steps + step,
                timesteps[step],
                {name: tensors[name] for name in callback_on_step_end_tensor_inputs},
            )
            outputs = dict(outputs or {})
            for name in ("prompt_embeds", "negative_prompt_embeds"):
                new = outputs.pop(name, tensors[name])
                if new is tensors[name]:
                    continue
                if tensors[name] is None or new is None or new.shape != tensors[name].shape:
                    shape = None if tensors[name] is None else list(tensors[name].shape)
                    raise ValueError(
                        f"`callback_on_step_end` returned `{name}` of shape "
                        f"{None if new is None else list(new.shape)}; it must keep the stream's shape {shape}."
                    )
                setattr(denoiser, name, new.to(tensors[name].device, tensors[name].dtype))
                denoiser.kv_cache.reset_text()
            return outputs.pop("latents", latents)

        return step_end

    def _progress(self, num_latent_frames: int | None, prefix_frames: int = 0) -> tqdm:
        """A bar over every step of the video (the chunks after a continued clip), or a counter without a total for an
        endless stream."""
        if num_latent_frames is None:
            return tqdm(total=None, **getattr(self, "_progress_bar_config", {}))
        num_chunks = self._num_generated_chunks(num_latent_frames, prefix_frames)
        return self.progress_bar(total=len(self.scheduler.timesteps) * num_chunks)

    def _num_generated_chunks(self, num_latent_frames: int, prefix_frames: int = 0) -> int:
        """Chunks sampled for a video of ``num_latent_frames`` after a clip of ``prefix_frames`` (not counted)."""
        return -(-(num_latent_frames - prefix_frames) // self.chunk_frames)

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
            sampler.recache(state.denoiser, state.contexts, self.chunk_frames, state.first_chunk_frames)

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

    def _prefill_chunks(
        self,
        prefix: _Prefix,
        sampler: ChunkSampler,
        denoiser: CacheDenoiser,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Iterator[ChunkTrajectory]:
        """The chunks of a clip to continue, one at a time: encoded with the streaming VAE encoder (its causal cache
        kept between chunks) unless given as latents, then written to the cache by a context pass."""
        encoder = StreamingVAEEncoder(self.vae) if prefix.pixels is not None else None
        frame = pixel = 0
        for size in _chunk_sizes(prefix.num_latent_frames, self.chunk_frames):
            if encoder is None:
                clean = prefix.latents[:, :, frame : frame + size]
            else:
                count = frames_for_latents(size, frame, self.vae_scale_factor_temporal)
                raw = encoder.encode(prefix.pixels[:, :, pixel : pixel + count].to(self.vae.dtype))
                clean = normalize_latents(raw, self.vae)
                pixel += count
            yield sampler.prefill(denoiser, clean.to(device, dtype), frame, generator)
            frame += size

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
        """Per chunk: switch prompt if due → sample the chunk (``sampled``, the sampler's own loop; the chunks of a
        continued clip are written, not sampled) → keep its contexts → decode → yield (the clip's chunks only with
        ``return_prefix``; they are decoded anyway, for the decoder's causal cache)."""
        with progress:
            while state.num_latent_frames is None or state.frame < state.num_latent_frames:
                self._switch_prompt_if_due(state, sampler, prompt_schedule)
                trajectory = next(sampled)
                trajectory.prompt_index = state.prompt_index
                self._keep_contexts(state, trajectory)
                frames = self._decode_chunk(state.decoder, trajectory.clean, output_type)
                num_frames = trajectory.clean.shape[2]
                is_prefix = state.frame < state.prefix_frames
                if state.return_prefix or not is_prefix:
                    yield CausalVideoChunk(
                        frames=frames,
                        latents=trajectory.clean,
                        chunk_index=state.chunk_index,
                        frame_start=state.output_frame,
                        latent_frame_start=state.frame,
                        prompt_index=state.prompt_index,
                        trajectory=trajectory if return_trajectory else None,
                        is_prefix=is_prefix,
                    )
                state.output_frame += frames_for_latents(num_frames, state.frame, self.vae_scale_factor_temporal)
                state.frame += num_frames
                state.chunk_index += 1
                if self._interrupt and not is_prefix:  # the sampler stopped in this chunk: the video ends here
                    break
            self._current_timestep = None

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
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
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
        video: Any = None,
        video_latents: torch.Tensor | None = None,
        return_prefix: bool = True,
    ) -> CausalVideoStream:
        r"""Generate a video chunk by chunk, yielding each decoded chunk as soon as it is ready.

        The inputs are checked, the prompts encoded and the cache, decoder and sampler prepared at once; each chunk is
        made when the returned :class:`CausalVideoStream` is asked for it (a continued clip's chunks are encoded and
        written to the cache as the stream reaches them). Its ``switch_prompt()`` changes the prompt interactively.

        Args:
        """
        # 1. Check inputs (a clip to continue first: its length sets the chunks and the valid `num_frames`)
        if video_latents is not None and isinstance(video_latents, torch.Tensor) and video_latents.ndim == 5:
            height = height or video_latents.shape[3] * self.vae_scale_factor_spatial
            width = width or video_latents.shape[4] * self.vae_scale_factor_spatial
        height = height or self.default_height
        width = width or self.default_width
        switch_frames = list(switch_frames) if switch_frames is not None else None
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prefix = self.prepare_prefix(video, video_latents, height, width, window_frames)
        prefix_frames = prefix.num_latent_frames if prefix is not None else 0
        first_chunk_frames = _chunk_sizes(prefix_frames, self.chunk_frames)[0] if prefix_frames else None
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
            prefix_frames,
            num_videos_per_prompt,
            generator,
            guidance_scale_2,
        )

        # 2. Encode the prompt (and the later prompts of a schedule; the negative prompt serves every prompt)
        encode = partial(
            self._encode_stream_prompt,
            negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            num_videos_per_prompt=num_videos_per_prompt,
        )
        prompt_embeds, negative_prompt_embeds, prompt_schedule = self._encode_prompt_schedule(
            encode, prompt, prompt_embeds, switch_frames, first_chunk_frames
        )

        # 3. Prepare the schedule, the latents, the cache, the decoder, the sampler (and the clip's chunks)
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
        denoiser = _PipelineDenoiser(
            self, self.transformer, kv_cache, prompt_embeds, negative_prompt_embeds, guidance_scale, attention_kwargs
        )
        num_steps = len(self.scheduler.timesteps)
        run = _RunState(
            guidance_scale=guidance_scale,
            attention_kwargs=attention_kwargs,
            num_timesteps=None if num_latent_frames is None else num_steps * self._num_generated_chunks(
                num_latent_frames, prefix_frames
            ),
        )
        run.enter(self)
        state = _StreamState(
            denoiser,
            StreamingVAEDecoder(self.vae),
            num_latent_frames,
            prefix_frames=prefix_frames,
            first_chunk_frames=first_chunk_frames,
            return_prefix=return_prefix,
        )
        sampler = ChunkSampler(self.scheduler, context_noise)
        progress = self._progress(num_latent_frames, prefix_frames)
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
            interrupt=lambda: self._interrupt,
            first_frame=prefix_frames,
            device=device,
            dtype=dtype,
        )
        if prefix is not None:  # the clip's chunks first (their context noise drawn before any chunk's noise)
            prefix = prefix.expand(batch_size, num_videos_per_prompt)
            sampled = itertools.chain(
                self._prefill_chunks(prefix, sampler, denoiser, generator, device, dtype), sampled
            )

        # 4. The chunk loop, run as the stream is read
        chunks = self._chunk_loop(state, sampler, sampled, prompt_schedule, output_type, return_trajectory, progress)
        return CausalVideoStream(chunks, state, encode, self, run)

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
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
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
        video: Any = None,
        video_latents: torch.Tensor | None = None,
        return_prefix: bool = True,
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
            guidance_scale_2=guidance_scale_2,
            num_videos_per_prompt=num_videos_per_prompt,
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
            video=video,
            video_latents=video_latents,
            return_prefix=return_prefix,
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
