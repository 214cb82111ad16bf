"""CausalVideoPipeline: streaming text-to-video generation with a causal Wan transformer and a KV cache.

The algorithm (METHOD.md §1–§2), per chunk of ``num_frames_per_chunk`` latent frames:

1. draw the chunk's noise ``x_{σ_0}``;
2. for every step of the consistency schedule, predict ``x̂0`` with the transformer attending to the KV cache, and
   step to the next sigma with fresh noise (the last step returns ``x̂0``);
3. run the finished chunk once more at the context-noise timestep with ``update_cache=True`` (the only pass that
   writes the cache; skipped for the last chunk of a finite video, which nothing reads);
4. decode the chunk with the streaming VAE decoder (its causal-convolution cache persists between chunks).

``__call__`` returns a whole video; :meth:`CausalVideoPipeline.stream` yields decoded chunks as they are made, for a
fixed length or endlessly (``num_frames=None``), and can switch prompt mid-stream (LongLive re-cache, METHOD §2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from ..models import CausalWanTransformer3DModel, KVCache
from ..models.kv_cache import check_window, visible_history
from ..schedulers import ConsistencyFlowMatchScheduler, FlowMatchSDEScheduler
from ..utils.text import encode_prompts
from .vae_streaming import StreamingVAEDecoder, denormalize_latents, vae_spatial_factor, vae_temporal_factor

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class ChunkTrajectory(BaseOutput):
    """What one chunk's sampling did: the record trainers replay (METHOD §1, §4, §6).

    Attributes:
        sigmas: the schedule ``[σ_0, …, σ_{S-1}, 0]``.
        noisy: ``[S, B, C, f, h, w]``, the input ``x_{σ_k}`` of every step.
        pred_original: ``[S, B, C, f, h, w]``, the prediction ``x̂0`` of every step.
        transitions: one :class:`GaussianTransition` per non-final step (``None`` for the last step).
        clean: ``[B, C, f, h, w]``, the chunk's output (the last ``x̂0``).
        frame_start: the chunk's first latent frame.
        prompt_index: index of the prompt in effect (prompt schedules).
    """

    sigmas: torch.Tensor
    noisy: torch.Tensor
    pred_original: torch.Tensor
    transitions: list
    clean: torch.Tensor
    frame_start: int
    prompt_index: int = 0


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
    """Mutable state of one stream (everything a chunk needs from the chunks before it)."""

    cache: KVCache
    decoder: StreamingVAEDecoder
    embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    latent_shape: tuple[int, int, int, int]
    total_latent_frames: int | None
    generator: Any
    frame: int = 0
    chunk_index: int = 0
    output_frames: int = 0
    prompt_index: int = 0
    clean: dict[int, torch.Tensor] = field(default_factory=dict)
    pending_prompt: tuple[int, torch.Tensor, torch.Tensor | None] | None = None


class CausalVideoStream:
    """An iterator over the chunks of a stream, with a handle to switch prompt mid-stream.

    Returned by :meth:`CausalVideoPipeline.stream`. ``switch_prompt(prompt)`` makes the next chunk (and the ones after
    it) follow ``prompt``: the text cache is dropped and the self-attention cache is rebuilt from the clean frames it
    showed (METHOD §2).
    """

    def __init__(self, pipeline: CausalVideoPipeline, chunks: Iterator[CausalVideoChunk], state: _StreamState, **enc):
        self._pipeline = pipeline
        self._chunks = chunks
        self._state = state
        self._encode = enc

    def __iter__(self) -> CausalVideoStream:
        return self

    def __next__(self) -> CausalVideoChunk:
        with torch.no_grad():  # inference only, without changing the caller's grad mode between chunks
            return next(self._chunks)

    @property
    def cache(self) -> KVCache:
        return self._state.cache

    @property
    def latent_frame(self) -> int:
        """Latent frames generated so far."""
        return self._state.frame

    def switch_prompt(self, prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None) -> None:
        """Switch to a new prompt from the next chunk on."""
        embeds, negative = self._pipeline._encode_for_stream(prompt, prompt_embeds, **self._encode)
        if embeds.shape[0] != self._state.embeds.shape[0]:
            raise ValueError(
                f"The new prompt has batch {embeds.shape[0]}, the stream {self._state.embeds.shape[0]}."
            )
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
        scheduler ([`ConsistencyFlowMatchScheduler`] or [`FlowMatchSDEScheduler`]): the chunk sampler.
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

    def _encode_for_stream(
        self, prompt, prompt_embeds, negative_prompt, guidance_scale, max_sequence_length, negative_prompt_embeds=None
    ):
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give `prompt` or `prompt_embeds`.")
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError("`prompt` is empty.")
        with torch.no_grad():
            return self.encode_prompt(
                prompt,
                negative_prompt,
                guidance_scale > 1.0,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                max_sequence_length=max_sequence_length,
                dtype=self.transformer.dtype,
            )

    # ------------------------------------------------------------------ checks
    @property
    def chunk_frames(self) -> int:
        return self.transformer.config.num_frames_per_chunk

    def latent_frames_for(self, num_frames: int) -> int:
        """Latent frames of a video of ``num_frames`` output frames."""
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1

    def check_inputs(
        self,
        prompt,
        prompt_embeds,
        height: int,
        width: int,
        num_frames: int | None,
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
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )
        if not 0 <= context_noise < self.scheduler.config.num_train_timesteps:
            raise ValueError(f"`context_noise` is a timestep in [0, 1000), got {context_noise!r}.")
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

    def _switch_chunk(self, output_frame: int) -> int:
        """Index of the first chunk that starts at or after output frame ``output_frame``."""
        t, chunk = self.vae_scale_factor_temporal, self.chunk_frames
        latent = 0 if output_frame <= 0 else (output_frame - 1) // t + 1
        return -(-latent // chunk)

    # ------------------------------------------------------------------ the chunk loop
    def _prepare_stream(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_frames,
        generator,
        prompt_embeds,
        negative_prompt_embeds,
        guidance_scale,
        max_sequence_length,
        window_frames,
        sink_frames,
        rope,
        switch_frames,
    ) -> tuple[_StreamState, dict[int, tuple[int, torch.Tensor, torch.Tensor | None]]]:
        schedule = {}
        if switch_frames is not None:
            prompts = prompt if prompt is not None else [None] * (len(switch_frames) + 1)
            embeds_list = prompt_embeds if prompt_embeds is not None else [None] * len(prompts)
            encoded = [
                self._encode_for_stream(p, e, negative_prompt, guidance_scale, max_sequence_length)
                for p, e in zip(prompts, embeds_list)
            ]
            for index, frame in enumerate(switch_frames, start=1):
                schedule[self._switch_chunk(frame)] = (index, *encoded[index])
            embeds, negative = encoded[0]
        else:
            embeds, negative = self._encode_for_stream(
                prompt, prompt_embeds, negative_prompt, guidance_scale, max_sequence_length, negative_prompt_embeds
            )
        batch = embeds.shape[0]
        if rope is None:
            rope = "relative" if num_frames is None else "absolute"
        cache = KVCache.for_model(
            self.transformer,
            batch * (2 if guidance_scale > 1.0 else 1),
            window_frames=window_frames,
            sink_frames=sink_frames,
            rope=rope,
        )
        h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        state = _StreamState(
            cache=cache,
            decoder=StreamingVAEDecoder(self.vae),
            embeds=embeds,
            negative_embeds=negative,
            latent_shape=(batch, self.transformer.config.in_channels, h, w),
            total_latent_frames=None if num_frames is None else self.latent_frames_for(num_frames),
            generator=generator,
        )
        return state, schedule

    def _model_embeds(self, state: _StreamState) -> torch.Tensor:
        if state.negative_embeds is None:
            return state.embeds
        return torch.cat([state.negative_embeds, state.embeds])

    def _predict(self, state, latents, timestep, guidance_scale, frame, attention_kwargs, update_cache=False):
        batched = torch.cat([latents, latents]) if state.negative_embeds is not None else latents
        t = torch.full((batched.shape[0],), float(timestep), device=latents.device)
        velocity = self.transformer(
            batched,
            t,
            self._model_embeds(state),
            kv_cache=state.cache,
            frame_offset=frame,
            update_cache=update_cache,
            attention_kwargs=attention_kwargs,
        ).sample
        if state.negative_embeds is None:
            return velocity
        uncond, cond = velocity.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _recache(self, state: _StreamState, context_timestep: float, attention_kwargs) -> None:
        """Prompt switch (LongLive re-cache): rebuild the self-attention cache of the visible clean frames."""
        cache = state.cache
        frames = list(visible_history(state.frame, self.chunk_frames, cache.window_frames, cache.sink_frames))
        frames = [f for f in frames if f in state.clean]
        cache.reset()
        chunk = self.chunk_frames
        for start in range(0, state.frame, chunk):
            run = [f for f in frames if start <= f < start + chunk]
            if not run:
                continue
            latents = torch.cat([state.clean[f] for f in run], dim=2)
            self._predict(state, latents, context_timestep, 1.0, run[0], attention_kwargs, update_cache=True)

    def _chunks(
        self,
        state: _StreamState,
        schedule: dict,
        num_inference_steps: int | None,
        sigmas: list[float] | None,
        guidance_scale: float,
        context_noise: float,
        latents: torch.Tensor | None,
        output_type: str,
        return_trajectory: bool,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
        attention_kwargs: dict | None,
        progress,
    ) -> Iterator[CausalVideoChunk]:
        device = self._execution_device
        dtype = self.transformer.dtype
        chunk = self.chunk_frames
        batch, channels, h, w = state.latent_shape
        keep = None if state.cache.window_frames is None else state.cache.window_frames
        step_counter = 0
        while state.total_latent_frames is None or state.frame < state.total_latent_frames:
            # Prompt switches take effect at chunk boundaries.
            switch = schedule.get(state.chunk_index) or state.pending_prompt
            if switch is not None:
                state.pending_prompt = None
                state.prompt_index, state.embeds, state.negative_embeds = switch
                state.cache.reset_text()
                if state.frame:
                    self._recache(state, context_noise, attention_kwargs)

            frames = chunk
            if state.total_latent_frames is not None:
                frames = min(chunk, state.total_latent_frames - state.frame)
            shape = (batch, channels, frames, h, w)
            if latents is not None:
                x = latents[:, :, state.frame : state.frame + frames].to(device, dtype)
            else:
                x = randn_tensor(shape, generator=state.generator, device=device, dtype=dtype)

            self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
            timesteps = self.scheduler.timesteps
            record_noisy, record_x0, transitions = [], [], []
            for t in timesteps:
                velocity = self._predict(state, x, t, guidance_scale, state.frame, attention_kwargs)
                out = self.scheduler.step(velocity, t, x, generator=state.generator)
                if return_trajectory:
                    record_noisy.append(x)
                    record_x0.append(out.pred_original_sample)
                    transitions.append(out.transition)
                x = out.prev_sample
                if callback_on_step_end is not None:
                    kwargs = {"latents": x, "prompt_embeds": state.embeds}
                    outputs = callback_on_step_end(
                        self, step_counter, t, {k: kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    x = outputs.pop("latents", x)
                step_counter += 1
                progress.update()
            clean = x

            # Context pass: the only pass that writes the cache. The last chunk of a finite video has no reader.
            last = state.total_latent_frames is not None and state.frame + frames >= state.total_latent_frames
            if not last:
                context = clean
                if context_noise > 0:
                    sigma = context_noise / self.scheduler.config.num_train_timesteps
                    noise = randn_tensor(shape, generator=state.generator, device=device, dtype=dtype)
                    context = (1 - sigma) * clean + sigma * noise
                self._predict(state, context, context_noise, 1.0, state.frame, attention_kwargs, update_cache=True)

            for i in range(frames):
                state.clean[state.frame + i] = clean[:, :, i : i + 1]
            if keep is not None:
                visible = set(visible_history(state.frame + frames, chunk, keep, state.cache.sink_frames))
                state.clean = {f: v for f, v in state.clean.items() if f in visible}

            decoded = None
            if output_type != "latent":
                pixels = state.decoder.decode(denormalize_latents(clean.to(self.vae.dtype), self.vae))
                decoded = self.video_processor.postprocess_video(pixels, output_type=output_type)
            trajectory = None
            if return_trajectory:
                trajectory = ChunkTrajectory(
                    sigmas=torch.tensor(self.scheduler.schedule_sigmas),
                    noisy=torch.stack(record_noisy),
                    pred_original=torch.stack(record_x0),
                    transitions=transitions,
                    clean=clean,
                    frame_start=state.frame,
                    prompt_index=state.prompt_index,
                )
            frame_start = state.output_frames
            n_out = (1 + self.vae_scale_factor_temporal * (frames - 1)) if state.frame == 0 else (
                self.vae_scale_factor_temporal * frames
            )
            yield CausalVideoChunk(
                frames=decoded,
                latents=clean,
                chunk_index=state.chunk_index,
                frame_start=frame_start,
                latent_frame_start=state.frame,
                prompt_index=state.prompt_index,
                trajectory=trajectory,
            )
            state.output_frames += n_out
            state.frame += frames
            state.chunk_index += 1

    # ------------------------------------------------------------------ public entry points
    def _start(self, kwargs: dict) -> tuple[Iterator[CausalVideoChunk], _StreamState, dict]:
        height, width = kwargs["height"], kwargs["width"]
        height = height or self.default_height
        width = width or self.default_width
        output_type = kwargs["output_type"]
        switch_frames = list(kwargs["switch_frames"]) if kwargs["switch_frames"] is not None else None
        tensor_inputs = kwargs["callback_on_step_end_tensor_inputs"] or ["latents"]
        callback = kwargs["callback_on_step_end"]
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        self.check_inputs(
            kwargs["prompt"],
            kwargs["prompt_embeds"],
            height,
            width,
            kwargs["num_frames"],
            kwargs["window_frames"],
            kwargs["sink_frames"],
            switch_frames,
            output_type,
            tensor_inputs,
            kwargs["context_noise"],
        )
        if kwargs["num_frames"] is None and kwargs["window_frames"] is None:
            raise ValueError("An endless stream (`num_frames=None`) needs `window_frames` to keep memory bounded.")
        latents = kwargs["latents"]
        state, schedule = self._prepare_stream(
            kwargs["prompt"],
            kwargs["negative_prompt"],
            height,
            width,
            kwargs["num_frames"],
            kwargs["generator"],
            kwargs["prompt_embeds"],
            kwargs["negative_prompt_embeds"],
            kwargs["guidance_scale"],
            kwargs["max_sequence_length"],
            kwargs["window_frames"],
            kwargs["sink_frames"],
            kwargs["rope"],
            switch_frames,
        )
        if latents is not None:
            expected = (state.latent_shape[0], state.latent_shape[1], state.total_latent_frames, *state.latent_shape[2:])
            if state.total_latent_frames is None or tuple(latents.shape) != expected:
                raise ValueError(f"`latents` must have shape {list(expected)} (and `num_frames` must be set).")
        steps = kwargs["num_inference_steps"]
        self.scheduler.set_timesteps(steps, sigmas=kwargs["sigmas"])
        total_steps = None
        if state.total_latent_frames is not None:
            total_steps = len(self.scheduler.timesteps) * (-(-state.total_latent_frames // self.chunk_frames))
        if total_steps is None:  # an endless stream: a counter without a total
            progress = tqdm(total=None, **getattr(self, "_progress_bar_config", {}))
        else:
            progress = self.progress_bar(total=total_steps)
        chunks = self._chunks(
            state,
            schedule,
            steps,
            kwargs["sigmas"],
            kwargs["guidance_scale"],
            kwargs["context_noise"],
            latents,
            output_type,
            kwargs["return_trajectory"],
            callback,
            tensor_inputs,
            kwargs["attention_kwargs"],
            progress,
        )
        return chunks, state, dict(
            negative_prompt=kwargs["negative_prompt"],
            guidance_scale=kwargs["guidance_scale"],
            max_sequence_length=kwargs["max_sequence_length"],
        )

    @property
    def default_height(self) -> int:
        """``sample_height`` of the config, else 8 patches of latent height."""
        sample = getattr(self.config, "sample_height", None)
        return sample or 8 * self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]

    @property
    def default_width(self) -> int:
        sample = getattr(self.config, "sample_width", None)
        return sample or 8 * self.vae_scale_factor_spatial * self.transformer.config.patch_size[2]

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

        Takes the arguments of :meth:`__call__`. With ``num_frames=None`` the stream runs until the caller stops
        iterating (``window_frames`` is then required and RoPE defaults to ``"relative"``), with constant memory.
        The returned :class:`CausalVideoStream` also offers ``switch_prompt()`` for interactive prompt changes.
        """
        kwargs = dict(locals())
        kwargs.pop("self")
        chunks, state, enc = self._start(kwargs)
        return CausalVideoStream(self, chunks, state, **enc)

    @torch.no_grad()
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
        r"""Generate a whole video.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); with ``switch_frames``, a schedule of prompts, one per segment.
            negative_prompt (`str` or `list[str]`, *optional*): used only when ``guidance_scale > 1``.
            height, width (`int`, *optional*): output size in pixels (multiples of VAE factor × patch size).
            num_frames (`int`): output frames, ``1 + 4·(chunk·n − 1)`` (e.g. 21 or 81 for 3-frame chunks).
            num_inference_steps (`int`, *optional*): steps per chunk (default: the scheduler's 4-step schedule).
            sigmas (`list[float]`, *optional*): explicit sigmas per chunk (overrides ``num_inference_steps``).
            guidance_scale (`float`): classifier-free guidance; 1 (distilled models) runs a single branch.
            generator (`torch.Generator`, *optional*): for reproducible noise.
            latents (`torch.Tensor`, *optional*): the initial noise of every chunk, ``[B, C, F_latent, h, w]``.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed text-encoder states.
            output_type (`str`): ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`): return a :class:`CausalVideoPipelineOutput` (else a tuple).
            callback_on_step_end (`Callable`, *optional*): called after every step as
                ``callback(pipe, step, timestep, callback_kwargs)``; may return a modified ``latents``.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed in ``callback_kwargs``.
            max_sequence_length (`int`, *optional*): padded text tokens; default: the tokenizer's ``model_max_length``
                when at most 512 (what the bundled model was trained with), else 512.
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. LoRA ``scale``).
            window_frames, sink_frames (`int`, *optional*): attention window and sinks, in latent frames (METHOD §2).
            context_noise (`float`): timestep of the context pass that writes the cache (0 = clean).
            switch_frames (`list[int]`, *optional*): output frames at which the next prompt of the schedule takes
                over; a switch applies from the first chunk starting at or after that frame.
            rope (`str`, *optional*): ``"absolute"`` or ``"relative"`` cache positions (see :class:`KVCache`).
            return_trajectory (`bool`): also return the per-chunk, per-step sampling record.
        """
        kwargs = dict(locals())
        for key in ("self", "return_dict"):
            kwargs.pop(key)
        kwargs.pop("__class__", None)
        chunks, _, _ = self._start(kwargs)
        collected = list(chunks)
        self.maybe_free_model_hooks()

        trajectory = [c.trajectory for c in collected] if return_trajectory else None
        if output_type == "latent":
            frames = torch.cat([c.latents for c in collected], dim=2)
        elif output_type == "np":
            frames = np.concatenate([c.frames for c in collected], axis=1)
        elif output_type == "pt":
            frames = torch.cat([c.frames for c in collected], dim=1)
        else:
            frames = [sum((c.frames[b] for c in collected), []) for b in range(len(collected[0].frames))]
        if not return_dict:
            return (frames, trajectory) if return_trajectory else (frames,)
        return CausalVideoPipelineOutput(frames=frames, trajectory=trajectory)


for _cls in (CausalVideoPipeline, CausalVideoPipelineOutput, CausalVideoChunk):
    _cls.__module__ = "diffusers_raven"

__all__ = [
    "CausalVideoChunk",
    "CausalVideoPipeline",
    "CausalVideoPipelineOutput",
    "CausalVideoStream",
    "ChunkTrajectory",
]
