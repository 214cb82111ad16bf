"""The per-pass shortcuts of chunk inference and the compiled path.

- the cache-only context pass writes exactly the cache a full pass writes;
- reading ``[visible | chunk]`` as one view of a global cache's buffer gives what concatenating them gives;
- the full-width rotary embedding is bit-identical to the half-table one;
- weight updates reach the next pass (nothing computed from the weights is kept between passes);
- regional ``torch.compile`` of the blocks compiles every graph within the first two chunks of a stream and nothing
  after (global and windowed caches), and matches eager numbers.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_raven import CausalWanTransformer3DModel, KVCache
from diffusers_raven.models.attention import apply_rotary, apply_rotary_full, rotary_tables

TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)


def _text(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(3))


def _chunks(num_chunks: int, batch: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randn(batch, 4, 3, 8, 8, generator=generator) for _ in range(num_chunks)]


def _stream(model, cache, chunks, text, cache_only: bool, first_chunk: int = 0) -> list[torch.Tensor]:
    """The chunk loop of the pipeline: 4 steps on each chunk, then its context pass (full or cache-only)."""
    outputs = []
    for index, x in enumerate(chunks, start=first_chunk):
        offset = 3 * index
        for t in TIMESTEPS:
            outputs.append(model(x, torch.full((x.shape[0],), t), text, kv_cache=cache, frame_offset=offset).sample)
        out = model(
            x, torch.zeros(x.shape[0]), text, kv_cache=cache, frame_offset=offset, update_cache=True,
            cache_only=cache_only,
        ).sample
        assert (out.shape[2] == 0) == cache_only  # a cache-only pass predicts no frames
    return outputs


def _assert_same_cache(a: KVCache, b: KVCache) -> None:
    assert a.num_frames == b.num_frames and a.cached_frames == b.cached_frames
    for layer in range(a.num_layers):
        held = [i for i, f in enumerate(a.slot_frame.tolist()) if f >= 0]
        assert torch.equal(a.slot_frame, b.slot_frame)
        assert torch.equal(a.keys[layer][:, held], b.keys[layer][:, held])
        assert torch.equal(a.values[layer][:, held], b.values[layer][:, held])
    assert sorted(a.text) == sorted(b.text) == list(range(a.num_layers))
    for layer in a.text:
        assert torch.equal(a.text[layer][0], b.text[layer][0]) and torch.equal(a.text[layer][1], b.text[layer][1])


@pytest.mark.parametrize(
    "cache_kwargs",
    [{}, {"window_frames": 6, "sink_frames": 3}, {"window_frames": 9, "rope": "relative"}],
    ids=["global", "window-sinks", "window-relative"],
)
@torch.no_grad()
def test_cache_only_context_pass_writes_the_same_cache(causal_model, cache_kwargs):
    text, chunks = _text(2), _chunks(4, batch=2)
    full = KVCache.for_model(causal_model, 2, **cache_kwargs)
    short = KVCache.for_model(causal_model, 2, **cache_kwargs)
    reference = _stream(causal_model, full, chunks, text, cache_only=False)
    outputs = _stream(causal_model, short, chunks, text, cache_only=True)
    _assert_same_cache(full, short)
    for a, b in zip(reference, outputs):
        assert torch.equal(a, b)


@torch.no_grad()
def test_cache_only_first_pass_writes_every_layers_text(causal_model):
    """A cache-only pass that is the first of a prompt (a prefill, a re-cache) still writes the last layer's text K/V."""
    text, (x,) = _text(), _chunks(1)
    full, short = KVCache.for_model(causal_model, 1), KVCache.for_model(causal_model, 1)
    causal_model(x, torch.zeros(1), text, kv_cache=full, update_cache=True)
    output = causal_model(x, torch.zeros(1), text, kv_cache=short, update_cache=True, cache_only=True, return_dict=False)
    assert len(output) == 1 and output[0].shape == (1, 4, 0, 8, 8)
    _assert_same_cache(full, short)


def test_cache_only_needs_update_cache(causal_model):
    cache = KVCache.for_model(causal_model, 1)
    with pytest.raises(ValueError, match="cache_only"):
        causal_model(_chunks(1)[0], torch.zeros(1), _text(), kv_cache=cache, cache_only=True)


@torch.no_grad()
def test_contiguous_cache_view_equals_concatenation(causal_model, monkeypatch):
    """The global cache's ``[visible | chunk]`` view gives the numbers of ``torch.cat`` (bit for bit), and leaves a
    snapshot's reads untouched."""
    text, chunks = _text(), _chunks(4)
    viewed = KVCache.for_model(causal_model, 1)
    fast = _stream(causal_model, viewed, chunks[:3], text, cache_only=True)
    snapshot = viewed.snapshot()
    fast += _stream(causal_model, viewed, chunks[3:], text, cache_only=True, first_chunk=3)
    viewed.restore(snapshot)
    replay = _stream(causal_model, viewed, chunks[3:], text, cache_only=True, first_chunk=3)

    calls = []
    original = KVCache.scratch_slots

    def no_scratch(self, *args):
        calls.append(original(self, *args) is not None)
        return None

    monkeypatch.setattr(KVCache, "scratch_slots", no_scratch)
    concatenated = KVCache.for_model(causal_model, 1)
    slow = _stream(causal_model, concatenated, chunks, text, cache_only=True)
    assert any(calls)  # the view was used by the fast stream
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert all(torch.equal(a, b) for a, b in zip(replay, slow[-len(replay) :]))


def test_full_width_rotary_is_bit_identical():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 3, 16, generator=generator)
    cos, sin = torch.randn(1, 20, 1, 8, generator=generator), torch.randn(1, 20, 1, 8, generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(apply_rotary(x.to(dtype), cos, sin), apply_rotary_full(x.to(dtype), *rotary_tables(cos, sin)))


@torch.no_grad()
def test_weight_updates_reach_the_next_pass(causal_model, tiny_config):
    """Nothing computed from the weights is kept between passes: in-place updates, also through ``.data`` (which
    leaves version counters alone, as EMA copies do), change the next pass as they change a fresh model's."""
    x, text = _chunks(1)[0], _text()
    cache = KVCache.for_model(causal_model, 1)
    before = causal_model(x, torch.full((1,), 500.0), text, kv_cache=cache).sample
    causal_model.condition_embedder.time_proj.weight.mul_(1.5)
    causal_model.condition_embedder.time_embedder.linear_1.weight.data.mul_(0.5)
    after = causal_model(x, torch.full((1,), 500.0), text, kv_cache=cache).sample
    fresh = CausalWanTransformer3DModel(**tiny_config).eval()
    fresh.load_state_dict(causal_model.state_dict())
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(x, torch.full((1,), 500.0), text, kv_cache=KVCache.for_model(fresh, 1)).sample)


# ---------------------------------------------------------------------------------------------------- compile


class CountingBackend:
    """A ``torch.compile`` backend that runs graphs eagerly and counts the graphs it is given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("cache_kwargs", [{}, {"window_frames": 6, "sink_frames": 3}], ids=["global", "windowed"])
@torch.no_grad()
def test_compiled_blocks_do_not_recompile_from_chunk_to_chunk(tiny_config, cache_kwargs):
    torch._dynamo.reset()
    model = CausalWanTransformer3DModel(**tiny_config).eval()
    backend = CountingBackend()
    model.compile_repeated_blocks(backend=backend)
    text, chunks = _text(), _chunks(10)
    cache = KVCache.for_model(model, 1, **cache_kwargs)
    reference_cache = KVCache.for_model(model, 1, **cache_kwargs)
    new_graphs = []
    for index, x in enumerate(chunks):
        before = backend.graphs
        compiled = _stream(model, cache, [x], text, cache_only=True, first_chunk=index)
        new_graphs.append(backend.graphs - before)
        with torch.compiler.set_stance("force_eager"):
            eager = _stream(model, reference_cache, [x], text, cache_only=False, first_chunk=index)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the eager backend runs the very same operations
    assert sum(new_graphs[:2]) > 0
    assert new_graphs[2:] == [0] * 8, new_graphs
    torch._dynamo.reset()


@torch.no_grad()
def test_inductor_compiled_blocks_match_eager(tiny_config):
    torch._dynamo.reset()
    model = CausalWanTransformer3DModel(**tiny_config).eval()
    text, chunks = _text(), _chunks(2)
    eager = _stream(model, KVCache.for_model(model, 1), chunks, text, cache_only=True)
    model.compile_repeated_blocks()  # inductor, diffusers' entry point
    compiled = _stream(model, KVCache.for_model(model, 1), chunks, text, cache_only=True)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@torch.no_grad()
def test_pipeline_compile_switch_matches_eager():
    from diffusers_raven.pipelines.presets import load_pipeline

    torch._dynamo.reset()
    pipe, _ = load_pipeline("random-tiny")
    pipe.set_progress_bar_config(disable=True)

    def video():
        return pipe("a red circle", num_frames=21, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="pt").frames

    eager = video()
    backend = CountingBackend()
    assert not pipe.is_compiled
    pipe.enable_compile(backend=backend)
    assert pipe.is_compiled
    compiled = video()
    assert backend.graphs > 0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    pipe.disable_compile()
    assert not pipe.is_compiled
    graphs = backend.graphs
    torch.testing.assert_close(video(), eager, rtol=0, atol=0)
    assert backend.graphs == graphs
    torch._dynamo.reset()


def test_cli_compile_flag(tmp_path, monkeypatch):
    from diffusers_raven import CausalVideoPipeline
    from diffusers_raven.cli import main

    calls = []
    original = CausalVideoPipeline.enable_compile

    def enable_compile(self, **kwargs):
        calls.append(kwargs)
        original(self, backend="eager")

    monkeypatch.setattr(CausalVideoPipeline, "enable_compile", enable_compile)
    torch._dynamo.reset()
    output = tmp_path / "video.gif"
    argv = ["generate", "--model", "random-tiny", "--prompt", "a blue square", "--height", "32", "--width", "32", "--frames", "9", "--compile"]
    assert main([*argv, "--output", str(output), "--quiet"]) == 0
    assert calls == [{}] and output.exists()
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_cache_only_first_pass_writes_the_same_cache(tiny_config):
    """A prefill (a cache-only pass that is the prompt's first) under compilation writes the eager cache."""
    torch._dynamo.reset()
    model = CausalWanTransformer3DModel(**tiny_config).eval()
    text, chunks = _text(), _chunks(2)
    eager = KVCache.for_model(model, 1)
    for index, x in enumerate(chunks):
        model(x, torch.zeros(1), text, kv_cache=eager, frame_offset=3 * index, update_cache=True)
    model.compile_repeated_blocks(backend=CountingBackend())
    compiled = KVCache.for_model(model, 1)
    for index, x in enumerate(chunks):
        model(x, torch.zeros(1), text, kv_cache=compiled, frame_offset=3 * index, update_cache=True, cache_only=True)
    _assert_same_cache(eager, compiled)
    torch._dynamo.reset()
