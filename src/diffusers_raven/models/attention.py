"""Attention for the causal Wan transformer: frame-level masks, attention plans, RoPE at given positions, and the
attention processor that reads and writes the KV cache.

One forward pass builds one :class:`CausalAttentionContext`, shared by every block. It says which key frames each
query frame attends to (a frame-level boolean mask, the single source of truth), and how to compute that:

- ``"full"``: one attention call over all tokens (bidirectional, as the parent Wan model);
- ``"grouped"``: the query frames are split into groups with identical visibility (a chunk, or the clean twin of a
  chunk) and each group attends to its visible key frames, gathered without a dense mask. This works with every
  attention backend and does less work than a masked dense call. With the ``flex`` backend the same mask becomes a
  ``BlockMask`` and one call is made;
- ``"cache"``: the current chunk attends to itself and to the visible frames of a :class:`~.kv_cache.KVCache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from .kv_cache import KVCache, visible_history

# ---------------------------------------------------------------------------------------------------- masks


def block_causal_frame_mask(
    num_frames: int, chunk_frames: int, window_frames: int | None = None, sink_frames: int = 0
) -> torch.Tensor:
    """``[F, F]`` boolean mask: frame ``q`` of chunk ``c`` sees chunk ``c`` and the visible history of chunk ``c``."""
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for start in range(0, num_frames, chunk_frames):
        end = min(start + chunk_frames, num_frames)
        mask[start:end, start:end] = True
        history = list(visible_history(start, end - start, window_frames, sink_frames))
        if history:
            mask[start:end, history] = True
    return mask


def interleaved_frame_mask(
    num_frames: int,
    num_history_frames: int,
    chunk_frames: int,
    window_frames: int | None = None,
    sink_frames: int = 0,
) -> torch.Tensor:
    """Mask of the training-time-test sequence ``[noisy frames | clean frames]`` (METHOD §4).

    Noisy chunk ``j`` sees itself and the visible clean frames before it; clean chunk ``j`` sees itself and the
    visible clean frames before it (exactly what the cache shows at inference); nothing sees another chunk's noisy
    tokens.
    """
    total = num_frames + num_history_frames
    mask = torch.zeros(total, total, dtype=torch.bool)
    for start in range(0, num_frames, chunk_frames):
        end = min(start + chunk_frames, num_frames)
        history = [num_frames + f for f in visible_history(start, end - start, window_frames, sink_frames)]
        mask[start:end, start:end] = True
        if history:
            mask[start:end, history] = True
        clean_end = min(end, num_history_frames)
        if start < clean_end:
            rows = slice(num_frames + start, num_frames + clean_end)
            mask[rows, num_frames + start : num_frames + clean_end] = True
            if history:
                mask[rows, history] = True
    return mask


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def attention_groups(frame_mask: torch.Tensor) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Split query frames into runs with identical mask rows: ``[(q_start, q_end, [(k_start, k_end), ...])]``."""
    groups = []
    rows = frame_mask.tolist()
    start = 0
    for q in range(1, len(rows) + 1):
        if q == len(rows) or rows[q] != rows[start]:
            groups.append((start, q, _runs(rows[start])))
            start = q
    return groups


# ---------------------------------------------------------------------------------------------------- RoPE


def rope_at(rope, frame_positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-D rotary tables for frames at the given (temporal) positions, as the halves that
    :func:`apply_rotary` uses: ``cos`` at even and ``sin`` at odd channels, each ``[1, n·h·w, 1, head_dim / 2]``.

    Equal to ``WanRotaryPosEmbed.forward`` (then sliced) for positions ``0..n-1``; any positions inside the table are
    allowed.
    """
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    n = frame_positions.numel()
    tables = []
    for freqs, offset in ((rope.freqs_cos, 0), (rope.freqs_sin, 1)):
        f_t, f_h, f_w = freqs.split(split, dim=1)
        f_t = f_t[frame_positions.to(f_t.device)].view(n, 1, 1, -1).expand(n, height, width, -1)
        f_h = f_h[:height].view(1, height, 1, -1).expand(n, height, width, -1)
        f_w = f_w[:width].view(1, 1, width, -1).expand(n, height, width, -1)
        table = torch.cat([f_t, f_h, f_w], dim=-1).reshape(1, n * height * width, 1, -1)
        tables.append(table[..., offset::2].contiguous())
    return tables[0], tables[1]


def apply_rotary(hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``hidden_states`` ``[B, L, heads, dim]`` (the convention of Wan's processor) with
    the half tables of :func:`rope_at`."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(hidden_states)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half tables of :func:`rope_at` at full width for :func:`apply_rotary_full`: ``cos`` repeated per pair and
    ``sin`` signed per pair (``−sin`` at even, ``+sin`` at odd channels), each ``[1, L, 1, head_dim]``."""
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rotary_full(hidden_states: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` with the full-width tables of :func:`rotary_tables`, in fewer operations: ``x·cos +
    swap(x)·signed_sin``, where ``swap`` exchanges the two channels of every pair. Bit-identical to
    :func:`apply_rotary`: per pair it computes ``x1·cos + x2·(−sin)`` and ``x2·cos + x1·sin``, the same roundings as
    ``x1·cos − x2·sin`` and ``x1·sin + x2·cos``."""
    b, length, heads, dim = hidden_states.shape
    swapped = hidden_states.reshape(b, length, heads, dim // 2, 2).flip(-1).reshape(b, length, heads, dim)
    out = hidden_states * cos + swapped * signed_sin
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


# ---------------------------------------------------------------------------------------------------- context


@dataclass
class CausalAttentionContext:
    """What every block needs to know about one forward pass (built by the model, read by the processors).

    ``rope`` and ``rope_visible`` are the full-width tables of :func:`rotary_tables`. ``cache_only`` (a context pass
    whose output nobody reads) makes the block ``cache_only_layer`` stop once its keys and values are taken.
    ``scratch`` (global cache, absolute RoPE, no gradient) is the slice of buffer slots right after the visible frames
    where each layer puts the chunk's own keys and values, so that attention reads one contiguous view of the buffer
    instead of concatenating the history to the chunk at every pass."""

    mode: str  # "full" | "grouped" | "cache"
    tokens_per_frame: int
    rope: tuple[torch.Tensor, torch.Tensor]
    frame_mask: torch.Tensor | None = None
    groups: list | None = None
    kv_cache: KVCache | None = None
    visible: list[int] = field(default_factory=list)
    visible_slots: Any = None
    rope_visible: tuple[torch.Tensor, torch.Tensor] | None = None
    update_cache: bool = False
    use_text_cache: bool = False
    cache_only: bool = False
    cache_only_layer: int = -1
    scratch: slice | None = None
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    pending_text: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _block_masks: dict = field(default_factory=dict)

    def flex_block_mask(self, device: torch.device) -> Any:
        """The frame mask as a flex-attention ``BlockMask`` (built once per forward)."""
        key = str(device)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            frame_mask = self.frame_mask.to(device)
            tpf = self.tokens_per_frame

            def mask_mod(batch, head, q_idx, kv_idx):
                return frame_mask[q_idx // tpf, kv_idx // tpf]

            length = frame_mask.shape[0] * tpf
            self._block_masks[key] = create_block_mask(mask_mod, None, None, length, length, device=device)
        return self._block_masks[key]


def _active_backend(processor) -> AttentionBackendName:
    if processor._attention_backend is not None:
        return AttentionBackendName(processor._attention_backend)
    return _AttentionBackendRegistry.get_active_backend()[0]


def _native_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What diffusers' ``native`` backend computes (``[B, L, heads, dim]`` in and out), without the dispatch."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3)
    )
    return out.permute(0, 2, 1, 3)


class CausalWanAttnProcessor:
    """Attention processor of :class:`CausalWanTransformer3DModel` (self- and cross-attention of one block).

    Without a context it computes exactly what ``WanAttnProcessor`` computes. With one, self-attention follows the
    context's plan (full, grouped block-causal, or against the KV cache) and cross-attention reuses the cached text
    keys and values when the cache holds them for the current prompt.

    The per-token work (projections, norms, rotary embedding, output projection) is separate from the attention
    plan (:meth:`_attend_planned`: the cache reads and writes, the groups), which reads Python state that changes
    from chunk to chunk. Under ``torch.compile`` the plan runs outside the graph, so a compiled block is traced once
    for every chunk of a stream.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx
        self._fallback = WanAttnProcessor()

    def _attend(self, query, key, value, attn_mask=None) -> torch.Tensor:
        if attn_mask is None and self._parallel_config is None and not _AttentionBackendRegistry._checks_enabled:
            backend = self._attention_backend
            if backend is None:
                backend = _AttentionBackendRegistry.get_active_backend()[0]
            if backend == AttentionBackendName.NATIVE or backend == "native":
                return _native_sdpa(query, key, value)
        return dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: CausalAttentionContext | None = None,
    ) -> torch.Tensor | None:
        if context is None or (attn.is_cross_attention and attn.add_k_proj is not None):
            self._fallback._attention_backend = self._attention_backend
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attn.is_cross_attention:
            out = self._cross_attention(attn, hidden_states, encoder_hidden_states, context)
        else:
            out = self._self_attention(attn, hidden_states, context)
            if out is None:  # a cache-only pass stops here
                return None
        return self.project_out(attn, out, hidden_states.dtype)

    def project_out(self, attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The output projection of attention ``out`` ``[B, L, heads, dim]``."""
        out = out.flatten(2, 3)
        if out.dtype != dtype:
            out = out.to(dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def text_kv(self, attn, encoder_hidden_states, context) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values of the prompt: the cache's, or computed (and kept in ``context`` for
        the cache)."""
        if context.use_text_cache:
            return context.kv_cache.text[self.layer_idx]
        if encoder_hidden_states is None:
            raise ValueError("`encoder_hidden_states` is required: the KV cache holds no text for this prompt.")
        if attn.fused_projections:
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if context.kv_cache is not None:
            context.pending_text[self.layer_idx] = (key.detach(), value.detach())
        return key, value

    def _cross_attention(self, attn, hidden_states, encoder_hidden_states, context) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        if torch.compiler.is_compiling():  # the layer's entry of the cache: looked up outside the graph
            key, value = _text_kv_outside_graph(self, attn, encoder_hidden_states, context)
        else:
            key, value = self.text_kv(attn, encoder_hidden_states, context)
        return self._attend(query, key, value)

    def project_qkv(self, attn, hidden_states, context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention ``query``, ``key`` (both rotated), ``value`` and the key before rotation, ``[B, L, heads,
        dim]``: the per-token part of self-attention."""
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cos, signed_sin = context.rope
        return apply_rotary_full(query, cos, signed_sin), apply_rotary_full(key, cos, signed_sin), value, key

    def _self_attention(self, attn, hidden_states, context) -> torch.Tensor | None:
        query, key, value, raw_key = self.project_qkv(attn, hidden_states, context)
        if torch.compiler.is_compiling():
            return _attend_planned_outside_graph(self, query, key, value, raw_key, context)
        return self._attend_planned(query, key, value, raw_key, context)

    def _attend_planned(self, query, key, value, raw_key, context) -> torch.Tensor | None:
        """Self-attention of rotated ``query``/``key`` and ``value`` following the context's plan (cache reads and
        writes included); ``None`` when the pass is cache-only and this is its last layer."""
        if context.mode == "cache":
            cache = context.kv_cache
            tpf = context.tokens_per_frame
            if context.update_cache:
                stored = raw_key if cache.rope == "relative" else key
                context.pending[self.layer_idx] = (stored.unflatten(1, (-1, tpf)), value.unflatten(1, (-1, tpf)))
            if context.cache_only and self.layer_idx == context.cache_only_layer:
                return None
            if context.scratch is not None and key.dtype == cache.dtype:
                key, value = cache.read_with_chunk(
                    self.layer_idx, context.scratch, key.unflatten(1, (-1, tpf)), value.unflatten(1, (-1, tpf))
                )
                return self._attend(query, key, value)
            cached_key, cached_value = cache.read(self.layer_idx, context.visible, context.visible_slots)
            if cached_key.shape[1]:
                if cache.rope == "relative":
                    cached_key = apply_rotary_full(cached_key, *context.rope_visible)
                key = torch.cat([cached_key.to(key.dtype), key], dim=1)
                value = torch.cat([cached_value.to(value.dtype), value], dim=1)
            return self._attend(query, key, value)

        if context.mode == "full":
            return self._attend(query, key, value)

        if _active_backend(self) == AttentionBackendName.FLEX:
            return self._attend(query, key, value, attn_mask=context.flex_block_mask(query.device))

        tpf = context.tokens_per_frame
        outputs = []
        for q_start, q_end, key_runs in context.groups:
            q = query[:, q_start * tpf : q_end * tpf]
            if len(key_runs) == 1:
                (k0, k1), = key_runs
                k, v = key[:, k0 * tpf : k1 * tpf], value[:, k0 * tpf : k1 * tpf]
            else:
                k = torch.cat([key[:, a * tpf : b * tpf] for a, b in key_runs], dim=1)
                v = torch.cat([value[:, a * tpf : b * tpf] for a, b in key_runs], dim=1)
            outputs.append(self._attend(q, k, v))
        return torch.cat(outputs, dim=1)


# Under torch.compile the attention plan (cache reads and writes, groups, a visible length that grows from chunk to
# chunk) runs eagerly between two compiled graphs: nothing in a graph depends on the chunk's position in the stream.
# The text keys and values (the cache's entry for the layer, or computed once per prompt) are looked up there too:
# read inside a graph, the layer index would specialise it per block.
_attend_planned_outside_graph = torch.compiler.disable(CausalWanAttnProcessor._attend_planned, recursive=True)
_text_kv_outside_graph = torch.compiler.disable(CausalWanAttnProcessor.text_kv, recursive=True)
