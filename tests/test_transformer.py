"""CausalWanTransformer3DModel against independent computations: the parent diffusers class, recomputation without a
cache, finite differences."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from conftest import TINY_TRANSFORMER
from diffusers_raven import CausalWanTransformer3DModel, KVCache

TOL = 1e-5
CHUNK = 3


def _inputs(batch=1, frames=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 8, 8, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    return x, text, t


def _cached_rollout(model, x, t, text, clean=None, **cache_kwargs):
    """Chunk-by-chunk inference; after each chunk its clean twin (or the chunk itself) is written to the cache."""
    cache = KVCache.for_model(model, x.shape[0], **cache_kwargs)
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[2], CHUNK):
            sl = slice(start, start + CHUNK)
            outs.append(model(x[:, :, sl], t[:, sl], text, kv_cache=cache, frame_offset=start).sample)
            ctx = (clean if clean is not None else x)[:, :, sl]
            model(ctx, torch.zeros(x.shape[0]), text, kv_cache=cache, frame_offset=start, update_cache=True)
    return torch.cat(outs, dim=2), cache


def test_full_attention_equals_parent(tiny_config):
    torch.manual_seed(0)
    parent = WanTransformer3DModel(**tiny_config).eval()
    model = CausalWanTransformer3DModel(**tiny_config).eval()
    model.load_state_dict(parent.state_dict())
    x, text, _ = _inputs(batch=2)
    t = torch.tensor([250.0, 800.0])
    with torch.no_grad():
        ref = parent(x, t, text).sample
        out = model(x, t, text, attention="full").sample
        out_per_frame = model(x, t[:, None].expand(2, 9), text, attention="full").sample
    assert (ref - out).abs().max() <= TOL
    assert (ref - out_per_frame).abs().max() <= TOL


def test_loads_parent_checkpoint_without_missing_keys(tmp_path, tiny_config):
    parent = WanTransformer3DModel(**tiny_config)
    parent.save_pretrained(tmp_path / "wan")
    model, info = CausalWanTransformer3DModel.from_pretrained(tmp_path / "wan", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_frames_per_chunk == 3
    for name, tensor in parent.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    model.save_pretrained(tmp_path / "causal")
    reloaded = CausalWanTransformer3DModel.from_pretrained(tmp_path / "causal")
    assert set(reloaded.state_dict()) == set(parent.state_dict())


@pytest.mark.parametrize(
    "window_frames,sink_frames", [(None, 0), (6, 1), (7, 3), (4, 1), (3, 0)], ids=["global", "w6s1", "w7s3", "w4s1", "w3"]
)
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_chunks_equal_block_causal_pass(causal_model, window_frames, sink_frames, batch):
    x, text, t = _inputs(batch=batch, frames=12)
    with torch.no_grad():
        full = causal_model(x, t, text, window_frames=window_frames, sink_frames=sink_frames).sample
    # In the full pass each chunk sees the earlier chunks at their own timesteps: write each chunk as it is run.
    cache = KVCache.for_model(causal_model, batch, window_frames=window_frames, sink_frames=sink_frames)
    outs = []
    with torch.no_grad():
        for start in range(0, 12, CHUNK):
            sl = slice(start, start + CHUNK)
            outs.append(causal_model(x[:, :, sl], t[:, sl], text, kv_cache=cache, frame_offset=start,
                                     update_cache=True).sample)
    for j, start in enumerate(range(0, 12, CHUNK)):
        diff = (outs[j] - full[:, :, start : start + CHUNK]).abs().max()
        assert diff <= TOL, f"chunk {j}: {diff}"


def test_block_causal_is_causal(causal_model):
    x, text, t = _inputs(frames=9)
    with torch.no_grad():
        a = causal_model(x, t, text).sample
        x2 = x.clone()
        x2[:, :, 6:] += 1.0  # change the last chunk only
        b = causal_model(x2, t, text).sample
    assert torch.equal(a[:, :, :6], b[:, :, :6])
    assert not torch.allclose(a[:, :, 6:], b[:, :, 6:])


@pytest.mark.parametrize("window_frames,sink_frames", [(None, 0), (6, 1), (7, 3)])
def test_history_pass_equals_cached_inference(causal_model, window_frames, sink_frames):
    x, text, _ = _inputs(frames=12)
    clean = torch.randn_like(x)
    t = torch.full((1, 12), 937.5)
    with torch.no_grad():
        out = causal_model(x, t, text, history=clean, window_frames=window_frames, sink_frames=sink_frames).sample
        out_short = causal_model(
            x, t, text, history=clean[:, :, :9], window_frames=window_frames, sink_frames=sink_frames
        ).sample
    ref, _ = _cached_rollout(causal_model, x, t, text, clean=clean, window_frames=window_frames, sink_frames=sink_frames)
    assert (out - ref).abs().max() <= TOL
    assert torch.equal(out, out_short)


def test_history_gradient_matches_finite_difference(causal_model):
    """Wan's norms run in float32, so the check uses float32 central differences on the largest entries."""
    x, text, _ = _inputs(frames=6)
    clean = torch.randn_like(x).requires_grad_(True)
    t = torch.full((1, 6), 600.0)
    weights = torch.randn_like(x)
    (causal_model(x, t, text, history=clean).sample * weights).sum().backward()
    grad = clean.grad
    assert grad[:, :, :3].abs().sum() > 0  # history of the first chunk reaches the second chunk's prediction
    assert torch.all(grad[:, :, 3:] == 0)  # the last clean chunk is seen by nobody
    eps = 1e-2
    for flat in grad.abs().flatten().topk(3).indices.tolist():
        index = torch.unravel_index(torch.tensor(flat), grad.shape)
        plus, minus = clean.detach().clone(), clean.detach().clone()
        plus[index] += eps
        minus[index] -= eps
        with torch.no_grad():
            fp = (causal_model(x, t, text, history=plus).sample * weights).sum()
            fm = (causal_model(x, t, text, history=minus).sample * weights).sum()
        numeric = (fp - fm).item() / (2 * eps)
        assert abs(numeric - grad[index].item()) <= 2e-2 * abs(grad[index].item()) + 1e-4


@pytest.mark.parametrize("batch", [1, 2])
def test_one_chunk_history_pass_equals_block_causal_pass(tiny_config, causal_model, batch):
    """A one-chunk video has an empty history (no chunk before it) and its clean twin is seen by nobody."""
    x, text, t = _inputs(batch=batch, frames=CHUNK)
    twin = torch.randn_like(x)
    with torch.no_grad():
        plain = causal_model(x, t, text).sample
        empty = causal_model(x, t, text, history=x[:, :, :0]).sample
        with_twin = causal_model(x, t, text, history=twin).sample
        with_twin_per_frame = causal_model(x, t, text, history=twin, history_timestep=torch.zeros(batch, CHUNK)).sample
        cache = KVCache.for_model(causal_model, batch)
        cached = causal_model(x, t, text, kv_cache=cache, frame_offset=0).sample
    for out in (empty, with_twin, with_twin_per_frame, cached):
        assert (out - plain).abs().max() <= TOL
    # One chunk sees only itself, so with one timestep per video it is the parent's bidirectional pass.
    parent = WanTransformer3DModel(**tiny_config).eval()
    parent.load_state_dict(causal_model.state_dict())
    t_video = t[:, 0]
    with torch.no_grad():
        ref = parent(x, t_video, text).sample
        out = causal_model(x, t_video, text, history=x[:, :, :0]).sample
    assert (out - ref).abs().max() <= TOL


def test_one_chunk_history_pass_gradients(causal_model):
    x, text, t = _inputs(frames=CHUNK)
    weights = torch.randn_like(x)

    def gradients(**kwargs):
        causal_model.zero_grad()
        noisy = x.clone().requires_grad_(True)
        (causal_model(noisy, t, text, **kwargs).sample * weights).sum().backward()
        params = torch.cat([p.grad.flatten() for p in causal_model.parameters() if p.grad is not None])
        return noisy.grad, params

    ref_x, ref_params = gradients()
    assert ref_x.abs().sum() > 0 and ref_params.abs().sum() > 0
    twin = torch.randn_like(x).requires_grad_(True)
    for history in (x[:, :, :0].clone().requires_grad_(True), twin):
        grad_x, grad_params = gradients(history=history)
        assert torch.allclose(grad_x, ref_x, atol=1e-6)
        assert torch.allclose(grad_params, ref_params, atol=1e-6)
    assert twin.grad is None or torch.all(twin.grad == 0)  # the clean twin of the only chunk is seen by nobody


def test_history_timestep_per_frame_for_the_whole_twin(causal_model):
    x, text, _ = _inputs(frames=12)
    clean = torch.randn_like(x)
    t = torch.full((1, 12), 937.5)
    context_t = torch.linspace(0, 100, 12)[None]
    with torch.no_grad():
        whole = causal_model(x, t, text, history=clean, history_timestep=context_t).sample
        short = causal_model(x, t, text, history=clean[:, :, :9], history_timestep=context_t[:, :9]).sample
        zero = causal_model(x, t, text, history=clean, history_timestep=torch.zeros(1, 12)).sample
    ref, _ = _cached_rollout(causal_model, x, t, text, clean=clean)
    assert torch.equal(whole, short)
    assert (zero - ref).abs().max() <= TOL


def test_relative_rope_equals_absolute_without_gaps(causal_model):
    x, text, t = _inputs(frames=9)
    a, _ = _cached_rollout(causal_model, x, t, text, rope="absolute")
    r, _ = _cached_rollout(causal_model, x, t, text, rope="relative")
    assert (a - r).abs().max() <= TOL


def test_relative_rope_streams_past_table_and_absolute_refuses(causal_model):
    x, text, _ = _inputs(frames=3)
    zero = torch.zeros(1)
    relative = KVCache.for_model(causal_model, 1, window_frames=9, sink_frames=3, rope="relative")
    absolute = KVCache.for_model(causal_model, 1, window_frames=9, sink_frames=3, rope="absolute")
    limit = causal_model.config.rope_max_seq_len
    with torch.no_grad():
        for start in range(0, limit + 9, CHUNK):
            causal_model(x, zero, text, kv_cache=relative, frame_offset=start, update_cache=True)
        with pytest.raises(ValueError, match="relative"):
            for start in range(0, limit + 9, CHUNK):
                causal_model(x, zero, text, kv_cache=absolute, frame_offset=start, update_cache=True)
    assert relative.num_frames > limit


def test_windowed_cache_memory_is_flat(causal_model):
    x, text, _ = _inputs(frames=3)
    cache = KVCache.for_model(causal_model, 1, window_frames=9, sink_frames=3, rope="relative")
    sizes = []
    with torch.no_grad():
        for j in range(40):
            causal_model(x, torch.zeros(1), text, kv_cache=cache, frame_offset=3 * j, update_cache=True)
            sizes.append(cache.nbytes)
    assert len(set(sizes[3:])) == 1
    assert len(cache.cached_frames) == 3 + (9 - 3 - 1)


def test_snapshot_restore_branches(causal_model):
    x, text, t = _inputs(frames=9)
    cache = KVCache.for_model(causal_model, 1)
    with torch.no_grad():
        causal_model(x[:, :, :3], t[:, :3], text, kv_cache=cache, update_cache=True)
        snap = cache.snapshot()
        keys_before = [k.clone() for k in snap.keys]
        causal_model(x[:, :, 3:6], t[:, 3:6], text, kv_cache=cache, frame_offset=3, update_cache=True)
        branch_a = causal_model(x[:, :, 6:9], t[:, 6:9], text, kv_cache=cache, frame_offset=6).sample
        for before, after in zip(keys_before, snap.keys):
            assert torch.equal(before, after)  # the snapshot did not see the later write
        cache.restore(snap)
        assert cache.num_frames == 3
        causal_model(-x[:, :, 3:6], t[:, 3:6], text, kv_cache=cache, frame_offset=3, update_cache=True)
        branch_b = causal_model(x[:, :, 6:9], t[:, 6:9], text, kv_cache=cache, frame_offset=6).sample
        cache.restore(snap)
        causal_model(x[:, :, 3:6], t[:, 3:6], text, kv_cache=cache, frame_offset=3, update_cache=True)
        again = causal_model(x[:, :, 6:9], t[:, 6:9], text, kv_cache=cache, frame_offset=6).sample
    assert torch.equal(branch_a, again)
    assert not torch.allclose(branch_a, branch_b)


def test_text_cache_reused_and_refreshed(causal_model):
    x, text, t = _inputs(frames=3)
    cache = KVCache.for_model(causal_model, 1)
    with torch.no_grad():
        first = causal_model(x, t, text, kv_cache=cache).sample
        assert len(cache.text) == causal_model.config.num_layers
        cached = cache.text[0][0]
        again = causal_model(x, t, None, kv_cache=cache).sample  # prompt taken from the cache
        assert cache.text[0][0] is cached
        other = causal_model(x, t, text * 2, kv_cache=cache).sample  # a new prompt is recomputed
        assert cache.text[0][0] is not cached
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_routing_sees_only_the_chosen_frames(causal_model):
    x, text, t = _inputs(frames=15)
    cache = KVCache.for_model(causal_model, 1)
    with torch.no_grad():
        for start in range(0, 12, CHUNK):
            causal_model(x[:, :, start : start + 3], t[:, start : start + 3], text, kv_cache=cache,
                         frame_offset=start, update_cache=True)
        cache.route([1, 4], recent_frames=6)
        assert cache.visible_frames(12, 3) == [1, 4, 9, 10, 11]
        routed = causal_model(x[:, :, 12:], t[:, 12:], text, kv_cache=cache, frame_offset=12).sample
        # Independent: a cache holding exactly those frames' keys and values.
        manual = KVCache.for_model(causal_model, 1)
        for frame in [1, 4, 9, 10, 11]:
            layer_kv = {}
            for layer in range(causal_model.config.num_layers):
                k, v = cache.read(layer, [frame])
                layer_kv[layer] = (k.unflatten(1, (1, -1)), v.unflatten(1, (1, -1)))
            manual.write(frame, layer_kv)
        ref = causal_model(x[:, :, 12:], t[:, 12:], text, kv_cache=manual, frame_offset=12).sample
        cache.route(None)
        unrouted = causal_model(x[:, :, 12:], t[:, 12:], text, kv_cache=cache, frame_offset=12).sample
    assert (routed - ref).abs().max() <= TOL
    assert not torch.allclose(routed, unrouted)


def test_gradient_checkpointing_same_gradients(tiny_config):
    x, text, t = _inputs(frames=6)
    clean = torch.randn_like(x)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = CausalWanTransformer3DModel(**tiny_config).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, text, history=clean).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_adapter_round_trip(tmp_path, tiny_config):
    pytest.importorskip("peft")
    from peft import LoraConfig

    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**tiny_config).eval()
    x, text, t = _inputs(frames=6)
    with torch.no_grad():
        base = model(x, t, text).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    with torch.no_grad():
        adapted = model(x, t, text).sample
    assert not torch.allclose(base, adapted)
    model.save_lora_adapter(tmp_path / "lora")
    torch.manual_seed(0)
    fresh = CausalWanTransformer3DModel(**tiny_config).eval()
    fresh.load_lora_adapter(tmp_path / "lora", prefix=None, use_safetensors=True)
    with torch.no_grad():
        reloaded = fresh(x, t, text).sample
    assert (reloaded - adapted).abs().max() <= TOL


def test_flex_backend_matches_native(causal_model):
    x, text, t = _inputs(frames=9)
    clean = torch.randn_like(x)
    with torch.no_grad():
        native = causal_model(x, t, text, window_frames=6, sink_frames=1).sample
        native_hist = causal_model(x, t, text, history=clean).sample
        causal_model.set_attention_backend("flex")
        try:
            flex = causal_model(x, t, text, window_frames=6, sink_frames=1).sample
            flex_hist = causal_model(x, t, text, history=clean).sample
        finally:
            causal_model.set_attention_backend("native")
    assert (native - flex).abs().max() <= TOL
    assert (native_hist - flex_hist).abs().max() <= TOL


def test_bad_inputs_raise_clear_errors(causal_model):
    x, text, t = _inputs(frames=9)
    with pytest.raises(ValueError, match="window_frames"):
        KVCache.for_model(causal_model, 1, window_frames=3, sink_frames=1)
    with pytest.raises(ValueError, match="window_frames"):
        causal_model(x, t, text, window_frames=2)
    with pytest.raises(ValueError, match="sink_frames"):
        KVCache.for_model(causal_model, 1, sink_frames=2)
    with pytest.raises(ValueError, match="rope"):
        KVCache.for_model(causal_model, 1, rope="sliding")
    with pytest.raises(ValueError, match="divisible"):
        causal_model(torch.randn(1, 4, 9, 7, 8), t, text)
    with pytest.raises(ValueError, match="attention"):
        causal_model(x, t, text, attention="causal")
    with pytest.raises(ValueError, match="history"):
        causal_model(x, t, text, history=torch.randn(1, 4, 4, 8, 8))
    with pytest.raises(ValueError, match="timestep"):
        causal_model(x, torch.rand(1, 5), text)
    with pytest.raises(ValueError, match="num_frames_per_chunk"):
        CausalWanTransformer3DModel(**TINY_TRANSFORMER, num_frames_per_chunk=0)
