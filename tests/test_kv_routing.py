"""KVCache routing (KVPO, METHOD §2 and §7) against independent computations: a cache whose keys encode their frame
ids, and full-sequence passes whose attention is restricted by a hand-built frame mask."""

import pytest
import torch

import diffusers_raven.models.transformer_causal_wan as causal_wan
from diffusers_raven import CausalWanTransformer3DModel, KVCache
from diffusers_raven.models.kv_cache import RoutingPlan

TOL = 1e-5
CHUNK = 3
TOKENS = 2  # tokens per frame of the id-encoding caches


# ---------------------------------------------------------------------------------------------- id-encoding caches
def _id_cache(**kwargs) -> KVCache:
    return KVCache(num_layers=2, batch_size=1, num_heads=1, head_dim=2, chunk_frames=CHUNK, **kwargs)


def _write(cache: KVCache, start: int, mark: int = 0, frames: int = CHUNK) -> None:
    """Keys hold the frame id (plus 1000 per layer), values hold ``mark`` (e.g. a branch) times 10000 plus the id."""
    ids = torch.arange(start, start + frames, dtype=torch.float32).view(1, frames, 1, 1, 1)
    ids = ids.expand(1, frames, TOKENS, 1, 2)
    cache.write(start, {layer: (ids + 1000 * layer, ids + 10000 * mark) for layer in range(cache.num_layers)})


def _read(cache: KVCache, frame_start: int, frames: int = CHUNK, layer: int = 0) -> tuple[list[int], list[int]]:
    """The frame ids encoded in the keys a chunk reads, and the values' marks (one per frame)."""
    visible = cache.visible_frames(frame_start, frames)
    keys, values = cache.read(layer, visible, cache.locate(visible))
    keys = keys.view(len(visible), TOKENS, 2) - 1000 * layer
    values = values.view(len(visible), TOKENS, 2)
    assert torch.equal(keys, keys[:, :1].expand_as(keys))  # every token of a frame carries that frame's id
    ids = keys[:, 0, 0].long().tolist()
    marks = ((values[:, 0, 0] - keys[:, 0, 0]) / 10000).round().long().tolist()
    return ids, marks


def _window(frame_start: int, window: int, sinks: int, chunk: int = CHUNK) -> list[int]:
    """METHOD §2 by hand: the first ``sinks`` frames and the ``window - sinks - chunk`` frames before the chunk."""
    recent = window - sinks - chunk
    return list(range(min(sinks, frame_start))) + list(range(max(frame_start - recent, sinks), frame_start))


def test_unrouted_reads_are_the_window_with_and_without_pool():
    window, sinks = 12, 3
    pooled = _id_cache(window_frames=window, sink_frames=sinks, pool_frames=33)
    plain = _id_cache(window_frames=window, sink_frames=sinks)
    for start in range(0, 40 * CHUNK, CHUNK):  # far past the pool: every slot reused many times
        expected = _window(start, window, sinks)
        for cache in (pooled, plain):
            for layer in range(2):
                assert _read(cache, start, layer=layer)[0] == expected, (start, layer)
            _write(cache, start)
    assert pooled.cached_frames == [0, 1, 2] + list(range(40 * CHUNK - 30, 40 * CHUNK))
    assert len(plain.cached_frames) == window - 1


@pytest.mark.parametrize(
    "window,sinks,pool,recent,selected",
    [
        (12, 3, 33, 4, [90, 95, 101, 110, 116]),  # the reference setting: 5 older frames, the chunk + 1 frame
        (12, 3, 33, 6, [90, 92, 94]),  # the chunk + 3 earlier frames
        (12, 3, 33, 3, [100]),  # the chunk alone: no earlier recent frame
        (6, 1, 14, 4, [107, 111]),
        (9, 0, 20, 5, [100, 101, 102, 103]),
    ],
    ids=["w12s3p33m4", "m6", "m3", "w6s1p14", "no-sinks"],
)
def test_routed_chunks_read_exactly_the_planned_frames(window, sinks, pool, recent, selected):
    cache = _id_cache(window_frames=window, sink_frames=sinks, pool_frames=pool)
    fork = 40 * CHUNK  # 120 frames written: the pool has rolled over several times
    for start in range(0, fork, CHUNK):
        _write(cache, start)
    oldest_kept = fork - (pool - sinks)
    first_recent = fork - (recent - CHUNK)
    assert cache.routable_frames(recent) == list(range(max(oldest_kept, sinks), first_recent))
    cache.route(selected, recent_frames=recent)
    assert cache.routing == RoutingPlan(selected=tuple(selected), recent_frames=recent)
    stretch = 8  # more chunks than the pool's slack: unpinned, the oldest selected frames would be overwritten
    for start in range(fork, fork + stretch * CHUNK, CHUNK):
        expected = list(range(sinks)) + selected + list(range(start - (recent - CHUNK), start))
        for layer in range(2):
            assert _read(cache, start, layer=layer)[0] == expected, (start, layer)
        _write(cache, start)
    assert min(selected) < cache.num_frames - (pool - sinks)  # the selected frames outlived their place in the ring
    cache.route(None)
    end = cache.num_frames
    for start in range(end, end + 20 * CHUNK, CHUNK):  # back to the window, and the pinned frames leave the pool
        assert _read(cache, start)[0] == _window(start, window, sinks)
        _write(cache, start)
    assert cache.cached_frames == list(range(sinks)) + list(range(cache.num_frames - (pool - sinks), cache.num_frames))


def test_recent_frames_counts_the_chunk_and_global_caches_route_too():
    cache = _id_cache()  # global: no sinks, every frame kept
    for start in range(0, 12, CHUNK):
        _write(cache, start)
    for recent, tail in ((3, []), (4, [11]), (6, [9, 10, 11])):
        cache.route([1, 4], recent_frames=recent)
        assert _read(cache, 12)[0] == [1, 4, *tail]
    cache.route([1, 4], recent_frames=4)
    assert _read(cache, 12, frames=1)[0] == [1, 4, 9, 10, 11]  # a one-frame chunk: m - 1 = 3 earlier frames
    cache.route(None)
    assert _read(cache, 12)[0] == list(range(12))


def test_snapshot_restore_with_pool_and_routing():
    window, sinks, pool, recent = 12, 3, 33, 4
    cache = _id_cache(window_frames=window, sink_frames=sinks, pool_frames=pool)
    for start in range(0, 60, CHUNK):
        _write(cache, start)
    fork = cache.snapshot()
    plans = {1: [30, 35, 40, 45, 50], 2: [31, 36, 41, 46, 55]}
    reads = {}
    for branch, plan in plans.items():
        cache.restore(fork)
        assert cache.routing is None and cache.num_frames == 60
        cache.route(plan, recent_frames=recent)
        reads[branch] = []
        for start in range(60, 75, CHUNK):
            ids, marks = _read(cache, start)
            assert ids == [0, 1, 2, *plan, start - 1]
            # The shared prefix is the fork's; the stretch frames are this branch's own, never the other's.
            assert marks == [0] * (len(ids) - 1) + [0 if start == 60 else branch]
            reads[branch].append((ids, marks))
            _write(cache, start, mark=branch)
            if start == 66:
                middle = cache.snapshot()
    # A snapshot taken mid-stretch brings its routing back, and its pinned frames are still held.
    cache.restore(fork)
    cache.route(plans[1], recent_frames=recent)
    cache.restore(middle)
    assert cache.routing == RoutingPlan(selected=tuple(plans[2]), recent_frames=recent)
    assert _read(cache, 69) == reads[2][3]
    # Replaying branch 1 from the fork reads what it read the first time.
    cache.restore(fork)
    cache.route(plans[1], recent_frames=recent)
    for j, start in enumerate(range(60, 75, CHUNK)):
        assert _read(cache, start) == reads[1][j]
        _write(cache, start, mark=1)


def test_memory_is_bounded_by_the_pool():
    window, sinks, pool = 12, 3, 33
    cache = _id_cache(window_frames=window, sink_frames=sinks, pool_frames=pool)
    sizes = []
    for j in range(60):
        start = j * CHUNK
        if j == 20:
            cache.route([30, 35, 40, 45, 50], recent_frames=4)
        if j == 35:
            cache.route(None)
        _write(cache, start)
        sizes.append(cache.nbytes)
    per_frame = 2 * cache.num_layers * TOKENS * cache.num_heads * cache.head_dim * 4  # keys + values, float32
    assert set(sizes) == {pool * per_frame}  # allocated once, never grown, routing or not
    assert len(cache.cached_frames) == pool


# ---------------------------------------------------------------------------------------------- the transformer
def _inputs(frames: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, frames, 8, 8, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    t = torch.rand(1, frames, generator=g) * 1000
    return x, text, t


def _stream(model, cache, x, t, text, routes: dict, first: int = 0, end: int | None = None) -> list[torch.Tensor]:
    """Chunks ``first, first + 3, ...`` one by one, each written as it is run (at its own timesteps, so that the
    stream is comparable with one full-sequence pass). ``routes`` maps a chunk start to the routing that begins there:
    ``(selected_frames, recent_frames)``, or ``None`` for the window."""
    outs = []
    with torch.no_grad():
        for start in range(first, x.shape[2] if end is None else end, CHUNK):
            if start in routes:
                cache.route(*(routes[start] or (None,)))
            sl = slice(start, start + CHUNK)
            outs.append(
                model(x[:, :, sl], t[:, sl], text, kv_cache=cache, frame_offset=start, update_cache=True).sample
            )
    return outs


def _history_by_hand(start: int, window: int, sinks: int, routes: dict) -> list[int]:
    """What the chunk at ``start`` may see: the window, or (inside a routed stretch) sinks + plan + m - f recent."""
    plan = None
    for begin in sorted(routes):
        if begin <= start:
            plan = routes[begin]
    if plan is None:
        return _window(start, window, sinks)
    selected, recent = plan
    return list(range(sinks)) + list(selected) + list(range(start - (recent - CHUNK), start))


def _mask_by_hand(frames: int, window: int, sinks: int, routes) -> torch.Tensor:
    mask = torch.zeros(frames, frames, dtype=torch.bool)
    for start in range(0, frames, CHUNK):
        rows = slice(start, start + CHUNK)
        mask[rows, rows] = True
        mask[rows, _history_by_hand(start, window, sinks, routes)] = True
    return mask


@pytest.mark.parametrize("rope", ["absolute", "relative"])
def test_pool_does_not_change_unrouted_outputs(causal_model, rope):
    window, sinks, frames = 6, 1, 30
    x, text, t = _inputs(frames)
    pooled, plain = (
        _stream(
            causal_model,
            KVCache.for_model(causal_model, 1, window_frames=window, sink_frames=sinks, pool_frames=pool, rope=rope),
            x,
            t,
            text,
            {},
        )
        for pool in (14, None)
    )
    for a, b in zip(pooled, plain):
        assert torch.equal(a, b)  # the same frames in the same order: bit-identical
    if rope == "absolute":  # and both are the windowed block-causal pass
        with torch.no_grad():
            full = causal_model(x, t, text, window_frames=window, sink_frames=sinks).sample
        for j, out in enumerate(pooled):
            assert (out - full[:, :, CHUNK * j : CHUNK * (j + 1)]).abs().max() <= TOL


def test_routed_chunks_equal_a_masked_full_sequence_pass(causal_model, monkeypatch):
    """Absolute RoPE, two layers: the routed stream equals one block-causal pass whose frame mask (built by hand)
    lets each chunk see exactly the window, or the sinks, its branch's plan and the m - f most recent frames."""
    window, sinks, pool, recent, frames = 6, 1, 14, 4, 30
    x, text, t = _inputs(frames)
    fork = 15  # the pool (1 sink + 13 slots) is full and frame 1 has left it; frame 2 is the next to go
    branches = {"a": [2, 6], "b": [4, 9, 12]}
    cache = KVCache.for_model(causal_model, 1, window_frames=window, sink_frames=sinks, pool_frames=pool)
    _stream(causal_model, cache, x, t, text, {}, end=fork)
    snap = cache.snapshot()
    results = {}
    for name, plan in branches.items():
        cache.restore(snap)
        routes = {fork: (plan, recent), fork + 4 * CHUNK: None}  # four routed chunks, then the window again
        tail = _stream(causal_model, cache, x, t, text, routes, first=fork)
        mask = _mask_by_hand(frames, window, sinks, routes)
        with monkeypatch.context() as patch:
            patch.setattr(causal_wan, "block_causal_frame_mask", lambda *args, mask=mask, **kwargs: mask)
            with torch.no_grad():
                full = causal_model(x, t, text).sample
        for j, out in enumerate(tail):
            start = fork + CHUNK * j
            diff = (out - full[:, :, start : start + CHUNK]).abs().max()
            assert diff <= TOL, f"branch {name}, chunk at {start}: {diff}"
        results[name] = tail
    assert not torch.allclose(results["a"][0], results["b"][0])  # the branches differ by their routing alone
    cache.restore(snap)
    again = _stream(causal_model, cache, x, t, text, {fork: (branches["a"], recent), fork + 4 * CHUNK: None}, fork)
    for a, b in zip(again, results["a"]):
        assert torch.equal(a, b)


def test_relative_rope_routes_with_positions_in_visible_order(tiny_config):
    """Relative RoPE, one layer (so a frame's keys depend only on its own input): each chunk's output equals a pass
    over just [its visible frames' inputs, the chunk], at positions 0, 1, 2, ... in that order."""
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**{**tiny_config, "num_layers": 1}, num_frames_per_chunk=3).eval()
    window, sinks, pool, recent, frames = 6, 1, 14, 4, 30
    x, text, t = _inputs(frames)
    routes = {15: ([2, 6], recent), 27: None}
    cache = KVCache.for_model(model, 1, window_frames=window, sink_frames=sinks, pool_frames=pool, rope="relative")
    outs = _stream(model, cache, x, t, text, routes)
    for j, out in enumerate(outs):
        start = CHUNK * j
        seen = _history_by_hand(start, window, sinks, routes)
        order = seen + list(range(start, start + CHUNK))
        with torch.no_grad():
            ref = model(x[:, :, order], t[:, order], text, attention="full").sample[:, :, -CHUNK:]
        assert (out - ref).abs().max() <= TOL, f"chunk at {start}"


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(causal_model):
    with pytest.raises(ValueError, match="pool_frames"):
        KVCache.for_model(causal_model, 1, pool_frames=20)  # no window
    with pytest.raises(ValueError, match="pool_frames"):
        KVCache.for_model(causal_model, 1, window_frames=12, sink_frames=3, pool_frames=10)  # < window - 1
    with pytest.raises(ValueError, match="pool_frames"):
        KVCache.for_model(causal_model, 1, window_frames=12, sink_frames=3, pool_frames=20.5)

    cache = _id_cache(window_frames=12, sink_frames=3, pool_frames=20)
    for start in range(0, 60, CHUNK):
        _write(cache, start)
    # Held: sinks 0-2 and frames 43-59; routable with m = 4: 43-58.
    assert cache.routable_frames(4) == list(range(43, 59))
    cases = [
        (dict(selected_frames=[45]), "recent_frames"),  # m missing
        (dict(selected_frames=[45], recent_frames=2), "recent_frames"),  # smaller than the chunk
        (dict(selected_frames=[45], recent_frames=10), "recent_frames"),  # more than window - sinks
        (dict(selected_frames=[45], recent_frames=True), "recent_frames"),
        (dict(selected_frames=[45.0], recent_frames=4), "selected_frames"),
        (dict(selected_frames=45, recent_frames=4), "selected_frames"),
        (dict(selected_frames=[45, 45], recent_frames=4), "more than once"),
        (dict(selected_frames=[60], recent_frames=4), "not written"),
        (dict(selected_frames=[-1], recent_frames=4), "not written"),
        (dict(selected_frames=[10], recent_frames=4), "no longer in the pool"),
        (dict(selected_frames=[1], recent_frames=4), "sink"),
        (dict(selected_frames=[59], recent_frames=4), "most recent"),
        (dict(selected_frames=[57], recent_frames=6), "most recent"),
        (dict(selected_frames=list(range(43, 53)), recent_frames=4), "pool_frames"),  # 10 pins > 20 - 11
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            cache.route(**kwargs)
        assert cache.routing is None
    with pytest.raises(ValueError, match="recent_frames"):
        cache.routable_frames(2)
    cache.route(list(range(43, 52)), recent_frames=4)  # 9 pins: exactly the slack of the pool
    with pytest.raises(ValueError, match="recent_frames"):
        cache.visible_frames(60, 5)  # a chunk larger than m


def test_model_refuses_a_routing_whose_m_is_smaller_than_the_chunk(causal_model):
    x, text, t = _inputs(9)
    cache = KVCache.for_model(causal_model, 1)
    with torch.no_grad():
        causal_model(x[:, :, :3], t[:, :3], text, kv_cache=cache, update_cache=True)
        cache.route([0], recent_frames=3)
        with pytest.raises(ValueError, match="recent_frames"):
            causal_model(x[:, :, 3:7], t[:, 3:7], text, kv_cache=cache, frame_offset=3)
