"""The causal Wan video transformer (METHOD.md §2 and §4).

:class:`CausalWanTransformer3DModel` is a :class:`diffusers.WanTransformer3DModel` with the same configuration and
state-dict keys, so every Wan 2.1 checkpoint in diffusers layout loads into it. It adds, in ``forward``:

- per-frame timesteps ``[B, F]`` (each latent frame its own noise level);
- ``attention="full"`` (bidirectional, the parent's numbers) or ``"block_causal"`` (chunk-causal, the default), with an
  optional window (``window_frames``) and attention sinks (``sink_frames``);
- chunk-by-chunk inference through a :class:`~diffusers_raven.KVCache` (``kv_cache``, ``frame_offset``,
  ``update_cache``);
- the interleaved training-time-test pass (``history=``): noisy chunks and their clean twins in one sequence, each
  noisy chunk predicted exactly as cached inference would predict it, with gradients into the history.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.utils import apply_lora_scale

from .attention import (
    CausalAttentionContext,
    CausalWanAttnProcessor,
    _attend_planned_outside_graph,
    _text_kv_outside_graph,
    attention_groups,
    block_causal_frame_mask,
    interleaved_frame_mask,
    rope_at,
    rotary_tables,
)
from .kv_cache import KVCache, check_window

ATTENTION_MODES = ("full", "block_causal")


def _block_forward(block, hidden_states, encoder_hidden_states, modulation, context):
    """One Wan block with per-frame modulation (``modulation``: ``[B, frames, 6, dim]``, ``frames = 1`` when every
    frame shares it).

    The same element-wise operations as ``WanTransformerBlock.forward``, broadcast per frame instead of per video
    (dtype conversions that would be no-ops are skipped). Installed as each block's ``forward``
    (:meth:`CausalWanTransformer3DModel.route_blocks`), so that calling the block runs the hooks registered on it.
    In a cache-only pass (``context.cache_only``) the block whose layer is ``context.cache_only_layer`` returns its
    input once its keys and values are taken: nothing reads what would follow.
    """
    batch, frames = modulation.shape[:2]
    dtype = hidden_states.dtype
    fp32 = dtype == torch.float32
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        block.scale_shift_table + (modulation if modulation.dtype == torch.float32 else modulation.float())
    ).chunk(6, dim=2)
    dim = hidden_states.shape[-1]

    def per_frame(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, frames, -1, dim)

    h32 = hidden_states if fp32 else hidden_states.float()
    norm = per_frame(block.norm1(h32)) * (1 + scale_msa) + shift_msa
    norm = norm.reshape(batch, -1, dim)
    if torch.compiler.is_compiling():
        # Traced by torch.compile: the attention module's steps, with the attention plan run between two graphs from
        # this frame (a break inside the module's call would split every frame of the call stack). Hooks on the
        # attention modules themselves do not run on this path.
        attn, processor = block.attn1, block.attn1.processor
        query, key, value, raw_key = processor.project_qkv(attn, norm if fp32 else norm.to(dtype), context)
        attn_output = _attend_planned_outside_graph(processor, query, key, value, raw_key, context)
        if attn_output is not None:
            attn_output = processor.project_out(attn, attn_output, dtype)
    else:
        attn_output = block.attn1(norm if fp32 else norm.to(dtype), None, None, None, context=context)
    if attn_output is None:  # the last block of a cache-only pass: its keys and values are all that is needed
        if not context.use_text_cache and context.kv_cache is not None:
            text_kv = _text_kv_outside_graph if torch.compiler.is_compiling() else type(block.attn2.processor).text_kv
            text_kv(block.attn2.processor, block.attn2, encoder_hidden_states, context)
        return hidden_states
    hidden_states = (per_frame(h32) + per_frame(attn_output) * gate_msa).reshape(batch, -1, dim)
    if not fp32:
        hidden_states = hidden_states.to(dtype)

    norm = block.norm2(hidden_states if fp32 else hidden_states.float())
    norm = norm if fp32 else norm.type_as(hidden_states)
    if torch.compiler.is_compiling() and block.attn2.add_k_proj is None:
        attn, processor = block.attn2, block.attn2.processor
        query = attn.norm_q(attn.to_q(norm)).unflatten(2, (attn.heads, -1))
        key, value = _text_kv_outside_graph(processor, attn, encoder_hidden_states, context)
        hidden_states = hidden_states + processor.project_out(attn, processor._attend(query, key, value), dtype)
    else:
        hidden_states = hidden_states + block.attn2(norm, encoder_hidden_states, None, None, context=context)

    h32 = hidden_states if fp32 else hidden_states.float()
    norm = (per_frame(block.norm3(h32)) * (1 + c_scale_msa) + c_shift_msa).reshape(batch, -1, dim)
    ff_output = block.ffn(norm if fp32 else norm.to(dtype))
    hidden_states = per_frame(h32) + per_frame(ff_output if ff_output.dtype == torch.float32 else ff_output.float()) * (
        c_gate_msa
    )
    hidden_states = hidden_states.reshape(batch, -1, dim)
    return hidden_states if fp32 else hidden_states.to(dtype)


def _text_fingerprint(encoder_hidden_states: torch.Tensor) -> tuple:
    t = encoder_hidden_states
    return (t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t._version)


class CausalWanTransformer3DModel(WanTransformer3DModel):
    r"""A Wan transformer for streaming, chunk-causal video generation.

    Same parameters and state-dict keys as :class:`diffusers.WanTransformer3DModel`, plus:

    Args:
        num_frames_per_chunk (`int`, defaults to 3):
            Latent frames per chunk: the unit of causality, of the KV cache and of streaming.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        num_frames_per_chunk: int = 3,
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        if not isinstance(num_frames_per_chunk, int) or num_frames_per_chunk < 1:
            raise ValueError(f"`num_frames_per_chunk` must be a positive integer, got {num_frames_per_chunk!r}.")
        if num_frames_per_chunk % patch_size[0]:
            raise ValueError(
                f"`num_frames_per_chunk` ({num_frames_per_chunk}) must be a multiple of the temporal patch size "
                f"({patch_size[0]})."
            )
        self.install_causal_processors()
        self.route_blocks()

    # ------------------------------------------------------------------ helpers
    def route_blocks(self) -> None:
        """Make every block's ``forward`` the per-frame forward, so the model calls the blocks themselves
        (``block(...)``): hooks registered on a block then fire — FSDP2's all-gather and reshard of a sharded
        ``WanTransformerBlock``, activation-checkpoint wrappers, diffusers' block-level offloading. The block's
        parameters and state-dict keys are unchanged."""
        for block in self.blocks:
            block.forward = partial(_block_forward, block)

    def install_causal_processors(self) -> None:
        """(Re)install the cache-aware attention processors on every block (e.g. after ``set_attn_processor``)."""
        for index, block in enumerate(self.blocks):
            for attn in (block.attn1, block.attn2):
                backend = getattr(attn.processor, "_attention_backend", None)
                processor = CausalWanAttnProcessor(layer_idx=index)
                processor._attention_backend = backend
                attn.set_processor(processor)

    def _check_processors(self) -> None:
        for block in self.blocks:
            if type(block.attn1.processor) is not CausalWanAttnProcessor and not isinstance(
                block.attn1.processor, CausalWanAttnProcessor
            ):
                raise ValueError(
                    "The attention processors were replaced; causal attention needs `CausalWanAttnProcessor`. "
                    "Call `transformer.install_causal_processors()` to restore them."
                )

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        """What ``transformers.Trainer`` calls for ``gradient_checkpointing=True``: checkpoint every block."""
        if every_n_layers != 1 or offload:
            raise ValueError("Only `every_n_layers=1` without offload is supported for this model.")
        self.enable_gradient_checkpointing()

    @property
    def chunk_frames(self) -> int:
        """Latent frames per chunk after temporal patching."""
        return self.config.num_frames_per_chunk // self.config.patch_size[0]

    def _rope(self, positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width rotary tables (:func:`~.attention.rotary_tables`) for frame ``positions``, memoised (a streamed
        chunk reuses them for every sampler step)."""
        freqs = self.rope.freqs_cos
        key = (tuple(positions.tolist()), height, width, str(freqs.device), freqs.dtype)
        cache = self.__dict__.setdefault("_rope_tables", {})
        if key not in cache:
            if len(cache) >= 64:
                cache.pop(next(iter(cache)))
            cache[key] = rotary_tables(*rope_at(self.rope, positions, height, width))
        return cache[key]

    def _frame_timesteps(self, timestep, batch_size: int, frames: int, name: str, device) -> torch.Tensor:
        """Timesteps as ``[B, frames]`` (post-patch frames) from a scalar, ``[B]`` or ``[B, F]`` tensor."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=device)
        timestep = timestep.to(device)
        p_t = self.config.patch_size[0]
        if timestep.ndim == 0:
            return timestep.expand(batch_size, frames)
        if timestep.ndim == 1:
            if timestep.shape[0] not in (1, batch_size):
                raise ValueError(f"`{name}` has {timestep.shape[0]} entries for a batch of {batch_size}.")
            return timestep[:, None].expand(batch_size, frames)
        if timestep.ndim == 2:
            if timestep.shape[1] not in (frames, frames * p_t) or timestep.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"Per-frame `{name}` must be [batch, latent frames] = [{batch_size}, {frames * p_t}], "
                    f"got {list(timestep.shape)}."
                )
            timestep = timestep[:, ::p_t] if timestep.shape[1] != frames else timestep
            return timestep.expand(batch_size, frames)
        raise ValueError(f"`{name}` must be a scalar, [batch] or [batch, frames] tensor, got {timestep.ndim} dims.")

    def _embed_time(self, frame_timesteps: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame ``temb`` ``[B, F, dim]`` and block modulation ``[B, F, 6, dim]`` (Wan's condition embedder)."""
        embedder = self.condition_embedder
        batch, frames = frame_timesteps.shape
        proj = embedder.timesteps_proj(frame_timesteps.flatten())
        time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if proj.dtype != time_dtype and time_dtype != torch.int8:
            proj = proj.to(time_dtype)
        temb = embedder.time_embedder(proj).to(dtype)
        modulation = embedder.time_proj(embedder.act_fn(temb))
        return temb.unflatten(0, (batch, frames)), modulation.unflatten(0, (batch, frames)).unflatten(2, (6, -1))

    # ------------------------------------------------------------------ forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        attention: str | None = None,
        kv_cache: KVCache | None = None,
        frame_offset: int = 0,
        update_cache: bool = False,
        history: torch.Tensor | None = None,
        history_timestep: torch.Tensor | float = 0,
        window_frames: int | None = None,
        sink_frames: int = 0,
        cache_only: bool = False,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""Predict the flow velocity of ``hidden_states``.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, channels, frames, height, width)`):
                Noisy latents: the whole video (full-sequence passes) or one chunk (with ``kv_cache``).
            timestep (`torch.Tensor`):
                Scalar, ``[batch]`` or per-frame ``[batch, frames]`` timesteps (``1000·σ``).
            encoder_hidden_states (`torch.Tensor`):
                Text-encoder states ``[batch, tokens, text_dim]``. May be ``None`` when ``kv_cache`` already holds
                this prompt's cross-attention keys and values and no gradient is needed.
            attention (`str`, *optional*):
                ``"block_causal"`` (default: chunk ``c`` sees chunks ``≤ c``) or ``"full"`` (bidirectional, equal to
                :class:`~diffusers.WanTransformer3DModel`). Not used with ``kv_cache``.
            kv_cache (`KVCache`, *optional*):
                Chunk inference: ``hidden_states`` is one chunk starting at latent frame ``frame_offset`` and attends
                to itself and to the cache's visible frames.
            frame_offset (`int`):
                Index of the first latent frame of ``hidden_states`` in the stream (its RoPE position in absolute
                mode).
            update_cache (`bool`):
                Write this chunk's keys and values to ``kv_cache`` after the pass (the context pass).
            history (`torch.Tensor`, *optional*):
                Clean latents ``[batch, channels, frames', height, width]`` of the chunks before each noisy chunk (the
                training-time-test sequence of METHOD §4). ``frames'`` is the number of frames of ``hidden_states``
                or that minus the last chunk (so empty for a one-chunk video, whose pass is then the block-causal
                one). Gradients flow into ``history``.
            history_timestep (`float` or `torch.Tensor`):
                Timestep of the clean history tokens (the context-noise timestep, 0 by default).
            window_frames (`int`, *optional*), sink_frames (`int`):
                Attention window (latent frames, counting the current chunk) and attention sinks of full-sequence
                passes; chunk inference takes them from the cache.
            cache_only (`bool`):
                With ``update_cache=True``: only write the chunk's keys and values (the context pass, whose output
                nobody reads). The last block stops after its key/value projections and the output head is skipped;
                the cache is written exactly as by a full pass, and ``sample`` is empty (no frames).
        """
        if hidden_states.ndim != 5:
            raise ValueError(
                f"`hidden_states` must be [batch, channels, frames, height, width], got {list(hidden_states.shape)}."
            )
        self._check_processors()
        batch, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if num_frames % p_t or height % p_h or width % p_w:
            raise ValueError(
                f"`hidden_states` frames/height/width ({num_frames}, {height}, {width}) must be divisible by the "
                f"patch size {tuple(self.config.patch_size)}."
            )
        frames, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        tokens_per_frame = pph * ppw
        chunk = self.chunk_frames

        if history is not None and kv_cache is not None:
            raise ValueError("Pass either `history` (training-time-test pass) or `kv_cache` (chunk inference).")
        if attention is not None and attention not in ATTENTION_MODES:
            raise ValueError(f"`attention` must be one of {ATTENTION_MODES}, got {attention!r}.")
        if kv_cache is not None and attention == "full":
            raise ValueError("`attention='full'` cannot be combined with `kv_cache`: chunk inference is causal.")
        if history is not None and attention == "full":
            raise ValueError("`attention='full'` cannot be combined with `history`.")
        if not isinstance(frame_offset, int) or frame_offset < 0:
            raise ValueError(f"`frame_offset` must be a non-negative integer, got {frame_offset!r}.")
        if update_cache and kv_cache is None:
            raise ValueError("`update_cache=True` needs a `kv_cache`.")
        if cache_only and not update_cache:
            raise ValueError("`cache_only=True` writes the cache: it needs `update_cache=True` (and a `kv_cache`).")

        # 1. Frame bookkeeping: timesteps, positions and the attention plan.
        frame_t = self._frame_timesteps(timestep, batch, frames, "timestep", hidden_states.device)
        if history is None and (not torch.is_tensor(timestep) or timestep.ndim < 2):
            frame_t = frame_t[:, :1]  # one timestep for every frame: one modulation, broadcast over the frames
        history_frames = 0
        if history is not None:
            if history.shape[0] != batch or history.shape[1] != hidden_states.shape[1] or history.shape[3:] != (
                height,
                width,
            ):
                raise ValueError(
                    f"`history` must match `hidden_states` in batch, channels, height and width; got "
                    f"{list(history.shape)} for {list(hidden_states.shape)}."
                )
            history_frames = history.shape[2] // p_t
            last_start = ((frames - 1) // chunk) * chunk
            if history.shape[2] % p_t or history_frames not in (frames, last_start):
                raise ValueError(
                    f"`history` must hold the clean twins of every chunk ({frames} latent frames) or of every chunk "
                    f"but the last ({last_start}); got {history.shape[2]} latent frames."
                )
            history_t = self._frame_timesteps(
                history_timestep, batch, history_frames, "history_timestep", hidden_states.device
            )
            if history_frames == frames:  # the last clean chunk is seen by nobody
                history = history[:, :, : last_start * p_t]
                history_t = history_t[:, :last_start]
                history_frames = last_start
            if history_frames:
                frame_t = torch.cat([frame_t, history_t], dim=1)
            else:  # a one-chunk video: no clean chunk is seen, so the pass is the plain block-causal one
                history = None

        positions = torch.arange(frame_offset, frame_offset + frames)
        if history_frames:
            positions = torch.cat([positions, torch.arange(frame_offset, frame_offset + history_frames)])
        rope_limit = self.config.rope_max_seq_len
        context = CausalAttentionContext(mode="full", tokens_per_frame=tokens_per_frame, rope=None)  # type: ignore
        if kv_cache is not None:
            if kv_cache.batch_size != batch:
                raise ValueError(f"`kv_cache` was built for batch size {kv_cache.batch_size}, got {batch}.")
            if kv_cache.num_layers != len(self.blocks):
                raise ValueError(f"`kv_cache` has {kv_cache.num_layers} layers, the model {len(self.blocks)}.")
            context.mode = "cache"
            context.kv_cache = kv_cache
            context.update_cache = update_cache
            context.visible = kv_cache.visible_frames(frame_offset, frames)
            context.visible_slots = kv_cache.locate(context.visible)
            context.cache_only = cache_only
            context.cache_only_layer = len(self.blocks) - 1
            if kv_cache.rope == "relative":
                n_visible = len(context.visible)
                positions = torch.arange(n_visible, n_visible + frames)
                if n_visible:
                    context.rope_visible = self._rope(torch.arange(n_visible), pph, ppw)
        else:
            check_window(window_frames, sink_frames, chunk)
            if history is not None:
                context.mode = "grouped"
                context.frame_mask = interleaved_frame_mask(frames, history_frames, chunk, window_frames, sink_frames)
            elif attention in (None, "block_causal"):
                context.mode = "grouped"
                context.frame_mask = block_causal_frame_mask(frames, chunk, window_frames, sink_frames)
            elif window_frames is not None:
                raise ValueError("`window_frames` applies to causal attention, not to `attention='full'`.")
            if context.frame_mask is not None:
                context.groups = attention_groups(context.frame_mask)
        if int(positions.max()) >= rope_limit:
            raise ValueError(
                f"Latent frame {int(positions.max())} lies past the RoPE table ({rope_limit} positions). Build the "
                "cache with `rope='relative'` to stream past it (positions relative to the visible window), or "
                "raise `rope_max_seq_len`."
            )
        context.rope = self._rope(positions, pph, ppw)
        if kv_cache is not None:
            context.scratch = kv_cache.scratch_slots(
                context.visible, frame_offset, frames, tokens_per_frame)

        # 2. Embeddings.
        tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        if history is not None:
            tokens = torch.cat([tokens, self.patch_embedding(history).flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens.contiguous()
        text_dtype = encoder_hidden_states.dtype if encoder_hidden_states is not None else tokens.dtype
        temb, modulation = self._embed_time(frame_t, text_dtype)

        fingerprint = None
        if kv_cache is not None and encoder_hidden_states is not None:
            fingerprint = _text_fingerprint(encoder_hidden_states)
        if kv_cache is not None and not torch.is_grad_enabled() and not self.config.added_kv_proj_dim:
            context.use_text_cache = kv_cache.has_text(fingerprint) or (
                encoder_hidden_states is None and len(kv_cache.text) == len(self.blocks)
            )
        if context.use_text_cache:
            encoder_hidden_states = None
        elif encoder_hidden_states is None:
            raise ValueError("`encoder_hidden_states` is required (the KV cache holds no text for this prompt).")
        else:
            if encoder_hidden_states.shape[0] != batch:
                raise ValueError(
                    f"`encoder_hidden_states` has batch {encoder_hidden_states.shape[0]}, `hidden_states` {batch}."
                )
            encoder_hidden_states = self.condition_embedder.text_embedder(encoder_hidden_states)
            if encoder_hidden_states_image is not None:
                image = self.condition_embedder.image_embedder(encoder_hidden_states_image)
                encoder_hidden_states = torch.cat([image, encoder_hidden_states], dim=1)

        # 3. Blocks.
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(
                    partial(block, context=context), tokens, encoder_hidden_states, modulation
                )
            else:
                tokens = block(tokens, encoder_hidden_states, modulation, context=context)

        # 4. Cache writes happen after the pass (idempotent under gradient-checkpoint replays).
        if kv_cache is not None:
            if context.pending_text:
                kv_cache.text = dict(context.pending_text)
                kv_cache.text_fingerprint = fingerprint
            if update_cache:
                kv_cache.write(frame_offset, context.pending)

        if cache_only:  # no frames are predicted: an empty sample (a tensor, so wrappers such as DDP can carry it)
            empty = hidden_states.new_empty(batch, self.config.out_channels, 0, height, width)
            return Transformer2DModelOutput(sample=empty) if return_dict else (empty,)

        # 5. Output norm, projection and unpatchify (noisy frames only).
        tokens = tokens[:, : frames * tokens_per_frame]
        temb = temb[:, :frames]
        shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        tokens = tokens.unflatten(1, (frames, tokens_per_frame))
        if tokens.dtype == torch.float32:
            tokens = self.norm_out(tokens) * (1 + scale) + shift
        else:
            tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = self.proj_out(tokens)
        tokens = tokens.reshape(batch, frames, pph, ppw, p_t, p_h, p_w, -1)
        output = tokens.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


CausalWanTransformer3DModel.__module__ = "diffusers_raven"
