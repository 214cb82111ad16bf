"""The KV cache of a streaming causal video transformer (METHOD.md §2).

A cache holds, for every transformer block, the self-attention keys and values of the latent frames written so far,
and the cross-attention keys and values of the current prompt. Frames are the unit of bookkeeping: a frame is
``tokens_per_frame`` tokens, and the cache decides, for a chunk starting at frame ``s``, which earlier frames that
chunk may see (global history, or a window of ``window_frames`` frames with ``sink_frames`` attention sinks, or a
KVPO routing).

Storage is a buffer of frame *slots* per layer, ``[batch, slots, tokens_per_frame, heads, head_dim]``:

- global cache: slot ``i`` holds frame ``i``; the buffer grows by doubling;
- windowed cache: slots ``[0, sink_frames)`` hold the sink frames and ``pool_frames - sink_frames`` more slots hold the
  most recent other frames. A new frame takes a free slot, else the slot of the oldest held frame that is neither a
  sink nor pinned by a routing. Memory is constant however long the stream runs. By default the pool is what the
  window needs (``window_frames - 1`` frames); a larger pool keeps older frames for KVPO routing to choose from.

Routing (:meth:`KVCache.route`) replaces the window of the next chunks by ``[sinks] + selected older frames + the m
most recent frames``, where ``m`` counts the chunk's own frames (METHOD §2). The selected frames are pinned while the
routing lasts, so the cache keeps them however far the stream goes; the lookup is by frame id, never by slot.

Keys are stored after rotary embedding at their absolute frame index (``rope="absolute"``, as Self Forcing does),
or before it (``rope="relative"``): then the attention applies positions relative to the visible frames (their
order in the visible sequence, routed or not), so a stream can run past the model's RoPE table.

``snapshot()`` is O(1): it keeps references to the buffers and marks them shared, and the next write copies a shared
buffer before writing into it (copy on write), so a snapshot never sees later writes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

_ROPE_MODES = ("absolute", "relative")


def visible_history(frame_start: int, chunk_frames: int, window_frames: int | None, sink_frames: int) -> range | list:
    """Frames before ``frame_start`` that a chunk of ``chunk_frames`` frames starting there attends to (METHOD §2).

    Global attention (``window_frames=None``) sees every earlier frame. With a window of ``W`` frames counting the
    current chunk and ``S`` sinks, it sees the first ``S`` frames and the ``W - S - chunk_frames`` most recent ones.
    """
    if window_frames is None:
        return range(frame_start)
    recent = max(window_frames - sink_frames - chunk_frames, 0)
    sinks = list(range(min(sink_frames, frame_start)))
    first_recent = max(frame_start - recent, len(sinks))
    return sinks + list(range(first_recent, frame_start))


def check_window(window_frames: int | None, sink_frames: int, chunk_frames: int) -> None:
    """Validate a window/sink setting against the chunk size (clear errors naming the argument)."""
    if not isinstance(sink_frames, int) or sink_frames < 0:
        raise ValueError(f"`sink_frames` must be a non-negative integer, got {sink_frames!r}.")
    if window_frames is None:
        if sink_frames:
            raise ValueError("`sink_frames` needs a window: set `window_frames` too (or `sink_frames=0`).")
        return
    if not isinstance(window_frames, int) or window_frames < chunk_frames + sink_frames:
        raise ValueError(
            f"`window_frames` ({window_frames!r}) must be an integer of at least the chunk size plus the sink frames "
            f"({chunk_frames} + {sink_frames} = {chunk_frames + sink_frames})."
        )


def check_pool(pool_frames: int | None, window_frames: int | None) -> None:
    """Validate a pool size: the frames a windowed cache holds, at least the ``window_frames - 1`` its window needs."""
    if pool_frames is None:
        return
    if window_frames is None:
        raise ValueError(
            "`pool_frames` needs a window: a global cache (`window_frames=None`) already keeps every frame."
        )
    if isinstance(pool_frames, bool) or not isinstance(pool_frames, int) or pool_frames < window_frames - 1:
        raise ValueError(
            f"`pool_frames` ({pool_frames!r}) must be an integer of at least what the window needs, "
            f"`window_frames - 1` = {window_frames - 1} (the sinks and the most recent frames)."
        )


@dataclass(frozen=True)
class RoutingPlan:
    """The history of routed chunks (METHOD §2): the sink frames, the ``selected`` older frames (pinned in the cache
    while the plan lasts) and the ``recent_frames`` most recent frames, a count that includes the chunk's own frames."""

    selected: tuple[int, ...]
    recent_frames: int


@dataclass
class KVCacheSnapshot:
    """The state of a :class:`KVCache` at one moment (buffers are shared with the cache until it writes)."""

    keys: list
    values: list
    slot_frame: torch.Tensor
    num_frames: int
    text: dict
    text_fingerprint: Any
    routing: RoutingPlan | None = None


class KVCache:
    """Per-layer self-attention K/V of the frames written so far, plus the per-prompt cross-attention K/V.

    Build it from a model with :meth:`for_model`; every size comes from the model's config, and the number of tokens
    per frame is taken from the first chunk written (it depends on the video resolution).

    Args:
        num_layers: number of transformer blocks.
        batch_size: batch size of the stream (twice the prompts when classifier-free guidance is batched).
        num_heads, head_dim: attention geometry of the model.
        chunk_frames: latent frames per chunk (the model's ``num_frames_per_chunk``).
        window_frames: attention window in latent frames, counting the current chunk; ``None`` keeps all frames.
        sink_frames: number of first frames that stay visible forever (attention sinks); needs a window.
        pool_frames: frames a windowed cache holds, sinks included: the sinks and the ``pool_frames - sink_frames``
            most recent other frames. At least ``window_frames - 1`` (the default, what the window needs); a larger
            pool keeps older frames for :meth:`route` to choose from, with memory bounded by the pool.
        rope: ``"absolute"`` (keys cached after RoPE at their frame index) or ``"relative"`` (positions relative to
            the visible window, so streams may run past the RoPE table).
        max_rope_frames: size of the model's RoPE table in frames (``rope_max_seq_len``).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        chunk_frames: int = 3,
        window_frames: int | None = None,
        sink_frames: int = 0,
        pool_frames: int | None = None,
        rope: str = "absolute",
        max_rope_frames: int = 1024,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if rope not in _ROPE_MODES:
            raise ValueError(f"`rope` must be one of {_ROPE_MODES}, got {rope!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        check_window(window_frames, sink_frames, chunk_frames)
        check_pool(pool_frames, window_frames)
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.chunk_frames = chunk_frames
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.rope = rope
        self.max_rope_frames = max_rope_frames
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        # A window of W frames shows at most W - S - 1 recent frames (to a chunk of one frame): the default pool.
        if window_frames is not None and pool_frames is None:
            pool_frames = window_frames - 1
        self.pool_frames = pool_frames
        self.ring_frames = None if window_frames is None else pool_frames - sink_frames
        self.tokens_per_frame: int | None = None
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._shared = [False] * num_layers
        self.slot_frame = torch.empty(0, dtype=torch.long)
        self.num_frames = 0
        self.text: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_fingerprint: Any = None
        self._routing: RoutingPlan | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls,
        transformer,
        batch_size: int,
        window_frames: int | None = None,
        sink_frames: int = 0,
        pool_frames: int | None = None,
        rope: str = "absolute",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache shaped for ``transformer`` (a Wan-family model), with sizes read from its config."""
        config = transformer.config
        p_t = config.patch_size[0]
        return cls(
            num_layers=config.num_layers,
            batch_size=batch_size,
            num_heads=config.num_attention_heads,
            head_dim=config.attention_head_dim,
            chunk_frames=getattr(config, "num_frames_per_chunk", 3) // p_t,
            window_frames=window_frames,
            sink_frames=sink_frames,
            pool_frames=pool_frames,
            rope=rope,
            max_rope_frames=config.rope_max_seq_len,
            dtype=dtype if dtype is not None else transformer.dtype,
            device=device if device is not None else transformer.device,
        )

    # ------------------------------------------------------------------ state
    @property
    def is_windowed(self) -> bool:
        return self.window_frames is not None

    @property
    def num_slots(self) -> int:
        return int(self.slot_frame.numel())

    @property
    def cached_frames(self) -> list[int]:
        """Indices of the frames currently held, in increasing order."""
        return sorted(int(f) for f in self.slot_frame.tolist() if f >= 0)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (self-attention buffers and text K/V)."""
        total = sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
        total += sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.text.values())
        return total

    def reset(self) -> None:
        """Forget every frame and the prompt (keep the configuration)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self._shared = [False] * self.num_layers
        self.slot_frame = torch.empty(0, dtype=torch.long)
        self.num_frames = 0
        self.tokens_per_frame = None
        self.reset_text()
        self._routing = None

    def reset_text(self) -> None:
        """Drop the cross-attention K/V (a prompt switch); they are recomputed on the next forward."""
        self.text = {}
        self.text_fingerprint = None

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> KVCacheSnapshot:
        """A cheap copy of the state: the buffers are shared until the cache writes again (copy on write).

        The routing in force (if any) is part of the state."""
        self._shared = [True] * self.num_layers
        return KVCacheSnapshot(
            keys=list(self.keys),
            values=list(self.values),
            slot_frame=self.slot_frame.clone(),
            num_frames=self.num_frames,
            text=dict(self.text),
            text_fingerprint=self.text_fingerprint,
            routing=self._routing,
        )

    def restore(self, snapshot: KVCacheSnapshot) -> None:
        """Return to the state of ``snapshot``, routing included (the snapshot stays valid and can be restored again)."""
        self.keys = list(snapshot.keys)
        self.values = list(snapshot.values)
        self._shared = [True] * self.num_layers
        self.slot_frame = snapshot.slot_frame.clone()
        self.num_frames = snapshot.num_frames
        self.text = dict(snapshot.text)
        self.text_fingerprint = snapshot.text_fingerprint
        self._routing = snapshot.routing

    # ------------------------------------------------------------------ routing
    @property
    def routing(self) -> RoutingPlan | None:
        """The routing in force, or ``None`` (chunks see their window)."""
        return self._routing

    def _check_recent_frames(self, recent_frames: Any, chunk_frames: int) -> None:
        if isinstance(recent_frames, bool) or not isinstance(recent_frames, int) or recent_frames < chunk_frames:
            raise ValueError(
                f"`recent_frames` counts the chunk's own frames, so it must be an integer of at least the chunk size "
                f"({chunk_frames}), got {recent_frames!r}."
            )
        if self.is_windowed and recent_frames > self.window_frames - self.sink_frames:
            raise ValueError(
                f"`recent_frames` ({recent_frames}) must not exceed the recent part of the window, "
                f"`window_frames - sink_frames` = {self.window_frames - self.sink_frames}."
            )

    def routable_frames(self, recent_frames: int) -> list[int]:
        """The frames :meth:`route` accepts for the next chunk (it starts at frame ``num_frames``): the frames held that
        are neither sinks nor among the ``recent_frames`` most recent frames (counting the chunk's own). This is the
        pool KVPO's branch plans draw from."""
        self._check_recent_frames(recent_frames, self.chunk_frames)
        first_recent = self.num_frames - (recent_frames - self.chunk_frames)
        sinks = self.sink_frames  # 0 for a global cache
        return [f for f in self.cached_frames if sinks <= f < first_recent]

    def route(self, selected_frames: list[int] | None, recent_frames: int | None = None) -> None:
        """Route the history of the next chunks (KVPO, METHOD §2 and §7), until ``route(None)``.

        Every chunk run while routed, starting at frame ``s`` with ``f`` frames, sees
        ``[sink frames] + selected_frames + [frames s - (recent_frames - f) .. s - 1]`` in that order (increasing frame
        index) instead of its window: ``recent_frames`` (``m``) counts the chunk's own frames, as in the reference
        code (``m = 4`` with 3-frame chunks is the chunk and one earlier frame). The plan holds for every chunk of a
        routed stretch: the selected frames are pinned, so the cache keeps them while newer frames roll through the
        pool, and they are looked up by frame id. ``route(None)`` ends the routing and unpins them.

        Args:
            selected_frames: the older frames to attend to (see :meth:`routable_frames`): distinct frames the cache
                holds, neither sinks nor among the ``recent_frames`` most recent frames of the next chunk (which
                starts at frame ``num_frames``). ``None`` returns to the window.
            recent_frames: ``m``, from the chunk size to ``window_frames - sink_frames`` (windowed caches).

        A windowed cache needs a pool of at least ``window_frames - 1 + len(selected_frames)`` frames, so that the
        pinned frames never push the window's own frames out.
        """
        if selected_frames is None:
            self._routing = None
            return
        if recent_frames is None:
            raise ValueError(
                "`recent_frames` is required: the number of most recent frames, counting the chunk's own."
            )
        self._check_recent_frames(recent_frames, self.chunk_frames)
        if isinstance(selected_frames, torch.Tensor):
            selected_frames = selected_frames.tolist()
        try:
            selected = list(selected_frames)
        except TypeError:
            raise ValueError(
                f"`selected_frames` must be a sequence of frame indices, got {selected_frames!r}."
            ) from None
        try:
            if any(isinstance(f, bool) for f in selected):
                raise TypeError
            selected = [operator.index(f) for f in selected]
        except TypeError:
            raise ValueError(f"`selected_frames` must hold integer frame indices, got {selected!r}.") from None
        if len(set(selected)) != len(selected):
            raise ValueError(f"`selected_frames` names a frame more than once: {selected}.")
        unwritten = [f for f in selected if f < 0 or f >= self.num_frames]
        if unwritten:
            raise ValueError(
                f"`selected_frames` names frames that are not written yet: {unwritten} "
                f"(frames 0..{self.num_frames - 1} are written)."
            )
        sinks = self.sink_frames  # 0 for a global cache
        if any(f < sinks for f in selected):
            raise ValueError(
                f"`selected_frames` names sink frames {[f for f in selected if f < sinks]}: sinks are always visible."
            )
        first_recent = self.num_frames - (recent_frames - self.chunk_frames)
        if any(f >= first_recent for f in selected):
            raise ValueError(
                f"`selected_frames` names frames {[f for f in selected if f >= first_recent]} that are among the "
                f"`recent_frames={recent_frames}` most recent frames of the next chunk (from frame {first_recent})."
            )
        held = set(self.cached_frames)
        missing = [f for f in selected if f not in held]
        if missing:
            raise ValueError(
                f"`selected_frames` names frames that are no longer in the pool: {missing}. "
                f"Routable now: {self.routable_frames(recent_frames)}."
            )
        if self.is_windowed and len(selected) > self.pool_frames - (self.window_frames - 1):
            raise ValueError(
                f"`selected_frames` pins {len(selected)} frames but `pool_frames={self.pool_frames}` leaves room for "
                f"{self.pool_frames - (self.window_frames - 1)} beyond the window's {self.window_frames - 1}; build the "
                "cache with a larger pool."
            )
        self._routing = RoutingPlan(selected=tuple(sorted(selected)), recent_frames=recent_frames)

    # ------------------------------------------------------------------ visibility
    def visible_frames(self, frame_start: int, chunk_frames: int) -> list[int]:
        """The cached frames a chunk of ``chunk_frames`` frames starting at ``frame_start`` attends to, in order."""
        held = {f for f in self.slot_frame.tolist() if 0 <= f < frame_start}
        routing = self._routing
        if routing is not None:
            if chunk_frames > routing.recent_frames:
                raise ValueError(
                    f"The routing's `recent_frames={routing.recent_frames}` counts the chunk's own frames, but this "
                    f"chunk has {chunk_frames}; route with `recent_frames` of at least the chunk size."
                )
            sinks = self.sink_frames  # 0 for a global cache
            first_recent = max(frame_start - (routing.recent_frames - chunk_frames), 0)
            wanted = [*range(min(sinks, frame_start)), *(f for f in routing.selected if f < first_recent)]
            wanted += range(max(first_recent, sinks), frame_start)
        else:
            wanted = visible_history(frame_start, chunk_frames, self.window_frames, self.sink_frames)
        # Frames outside the cache (e.g. before a re-cache after a prompt switch) are simply not visible.
        return [f for f in wanted if f in held]

    def locate(self, frames: list[int]) -> slice | torch.Tensor:
        """Where ``frames`` sit in the buffers: a slice when they are a prefix in order (read as a view), else the
        slot indices. Compute once per forward and pass to :meth:`read` for every layer."""
        lookup = {int(f): i for i, f in enumerate(self.slot_frame.tolist()) if f >= 0}
        slots = [lookup[f] for f in frames]
        if slots == list(range(len(slots))):
            return slice(0, len(slots))
        return torch.tensor(slots, dtype=torch.long)

    def read(
        self, layer: int, frames: list[int], slots: slice | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``frames`` at ``layer`` as ``[batch, len(frames) * tokens_per_frame, heads, dim]``."""
        keys, values = self.keys[layer], self.values[layer]
        if not frames or keys is None:
            shape = (self.batch_size, 0, self.num_heads, self.head_dim)
            empty = torch.empty(shape, dtype=self.dtype, device=self.device)
            return empty, empty
        slots = self.locate(frames) if slots is None else slots
        if isinstance(slots, slice):  # a prefix of the buffer: a view, no copy
            k, v = keys[:, slots], values[:, slots]
        else:
            slots = slots.to(keys.device)
            k, v = keys.index_select(1, slots), values.index_select(1, slots)
        return k.flatten(1, 2), v.flatten(1, 2)

    def scratch_slots(
        self, visible: list[int], frame_start: int, chunk_frames: int, tokens_per_frame: int
    ) -> slice | None:
        """Where a chunk pass may put the chunk's own keys and values so that attention reads ``[visible | chunk]`` as
        one view of the buffer (:meth:`read_with_chunk`), or ``None`` when it cannot.

        Only a global cache in absolute-RoPE mode whose visible frames are the buffer's first slots, in order, with
        the chunk's frames next, in slots that hold no frame, qualifies (then nothing any reader sees is touched: a
        state that shares the buffer, a snapshot, holds no frame there either), and only without gradients. The
        buffer grows if needed, as the chunk's context pass would make it."""
        if (
            self.is_windowed
            or self.rope != "absolute"
            or torch.is_grad_enabled()
            or not visible
            or self.keys[0] is None
            or self.tokens_per_frame != tokens_per_frame
            or visible[-1] != len(visible) - 1
            or frame_start != len(visible)
        ):
            return None
        end = frame_start + chunk_frames
        held = self.slot_frame[frame_start:end]
        if bool((held >= 0).any()) or int(self.slot_frame[frame_start - 1]) != frame_start - 1:
            return None
        self._ensure_capacity(end, self.keys[0])
        return slice(frame_start, end)

    def read_with_chunk(
        self, layer: int, slots: slice, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Put a chunk's keys and values ``[batch, frames, tokens_per_frame, heads, dim]`` in the free ``slots`` of
        :meth:`scratch_slots` and return ``[visible frames | chunk]`` as views of the buffers,
        ``[batch, (visible + frames) * tokens_per_frame, heads, dim]``: the values ``torch.cat([read(...), chunk])``
        would give, without copying the history. The slots stay free (no frame is marked written there). The chunk
        must have the buffer's dtype."""
        keys, values = self.keys[layer], self.values[layer]
        keys[:, slots].copy_(key)
        values[:, slots].copy_(value)
        return keys[:, : slots.stop].flatten(1, 2), values[:, : slots.stop].flatten(1, 2)

    # ------------------------------------------------------------------ writing
    def _place(self, frames: list[int]) -> list[tuple[int, int]]:
        """``(slot, row)`` for each frame of a chunk (``row`` = its index in the chunk); frames that get no slot are
        left out. A held frame keeps its slot; a new one takes a free slot, else the slot of the oldest held frame that
        is neither a sink nor pinned by the routing (a frame older than that one is not stored: the pool keeps the most
        recent frames)."""
        if not self.is_windowed:
            return [(frame, row) for row, frame in enumerate(frames)]
        sinks, ring = self.sink_frames, max(self.ring_frames, 0)
        owner = self.slot_frame.tolist() + [-1] * (sinks + ring - self.num_slots)
        pinned = set(self._routing.selected) if self._routing is not None else set()
        placement = []
        for row, frame in enumerate(frames):
            if frame < sinks:
                slot = frame
            elif frame in owner[sinks:]:
                slot = sinks + owner[sinks:].index(frame)
            elif -1 in owner[sinks:]:
                slot = sinks + owner[sinks:].index(-1)
            else:
                evictable = [(f, i) for i, f in enumerate(owner) if i >= sinks and f not in pinned]
                if not evictable or min(evictable)[0] > frame:
                    continue
                _, slot = min(evictable)
            owner[slot] = frame
            placement.append((slot, row))
        return placement

    def _ensure_capacity(self, slots_needed: int, like: torch.Tensor) -> None:
        if self.tokens_per_frame is None:
            self.tokens_per_frame = like.shape[2]
            self.dtype = like.dtype
            self.device = like.device
        if slots_needed <= self.num_slots:
            return
        if self.is_windowed:
            new_slots = self.sink_frames + max(self.ring_frames, 0)
        else:
            new_slots = max(slots_needed, 2 * self.num_slots, self.chunk_frames)
        grow = new_slots - self.num_slots
        self.slot_frame = torch.cat([self.slot_frame, torch.full((grow,), -1, dtype=torch.long)])
        for layer in range(self.num_layers):
            for store in (self.keys, self.values):
                old = store[layer]
                shape = (self.batch_size, new_slots, self.tokens_per_frame, self.num_heads, self.head_dim)
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old is not None:
                    new[:, : old.shape[1]] = old
                store[layer] = new
            self._shared[layer] = False

    def write(self, frame_start: int, layer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write the K/V of a chunk of frames starting at ``frame_start`` for every layer in ``layer_kv``.

        Tensors are ``[batch, frames, tokens_per_frame, heads, head_dim]``; keys are post-RoPE (absolute mode) or
        pre-RoPE (relative mode), as the model's attention produced them. Written under ``no_grad`` semantics: the
        cache stores detached values.
        """
        if not layer_kv:
            return
        sample = next(iter(layer_kv.values()))[0]
        batch, frames, tokens = sample.shape[:3]
        if batch != self.batch_size:
            raise ValueError(f"The cache was built for batch size {self.batch_size}, the chunk has {batch}.")
        if self.tokens_per_frame is not None and tokens != self.tokens_per_frame:
            raise ValueError(
                f"The cache holds {self.tokens_per_frame} tokens per frame, the chunk has {tokens}: "
                "the resolution changed mid-stream; call `reset()` first."
            )
        placement = self._place(list(range(frame_start, frame_start + frames)))
        # Within a chunk a later frame wins a slot shared with an earlier one (pool shorter than a chunk).
        by_slot = dict(placement)
        if by_slot:
            self._ensure_capacity(max(by_slot) + 1, sample)
        slots = torch.tensor(list(by_slot), dtype=torch.long)
        rows = torch.tensor(list(by_slot.values()), dtype=torch.long)
        for layer, (k, v) in layer_kv.items():
            if not by_slot:
                break
            if self._shared[layer]:
                self.keys[layer] = self.keys[layer].clone()
                self.values[layer] = self.values[layer].clone()
                self._shared[layer] = False
            dev_slots, dev_rows = slots.to(k.device), rows.to(k.device)
            self.keys[layer].index_copy_(1, dev_slots, k.detach().index_select(1, dev_rows).to(self.dtype))
            self.values[layer].index_copy_(1, dev_slots, v.detach().index_select(1, dev_rows).to(self.dtype))
        if by_slot:
            self.slot_frame = self.slot_frame.clone()
            for slot, row in by_slot.items():
                self.slot_frame[slot] = frame_start + row
        self.num_frames = max(self.num_frames, frame_start + frames)

    # ------------------------------------------------------------------ text
    def has_text(self, fingerprint: Any) -> bool:
        return self.text_fingerprint == fingerprint and len(self.text) == self.num_layers

    def __repr__(self) -> str:
        window = "global" if self.window_frames is None else f"window={self.window_frames}, sink={self.sink_frames}"
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch_size}, {window}, rope={self.rope!r}, "
            f"frames_written={self.num_frames}, held={len(self.cached_frames)}, nbytes={self.nbytes})"
        )
