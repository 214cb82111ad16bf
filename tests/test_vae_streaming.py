"""Chunked Wan VAE decoding (``StreamingVAEDecoder``) must equal one-shot ``vae.decode`` frame for frame.

Tolerance. ``vae.decode`` itself runs the decoder one latent frame at a time with a causal-conv cache, and the
streaming decoder runs exactly the same per-frame decoder calls on the same cache contents, so decoding the whole
video as one chunk is bitwise identical (asserted below with ``torch.equal``). The one op whose input shape changes
with the chunking is ``post_quant_conv``: a 1x1x1 convolution (a per-position channel mix) that sees ``f`` frames
instead of all of them. oneDNN/BLAS may tile that GEMM differently for a different number of rows and sum in a
different order, giving ~1 ulp differences (measured 1.2e-7 with one CPU thread, 0 with two). The decoder (random
init, unnormalised weights, ~20 conv layers) amplifies this to at most ~2.5e-6 in the output (measured, 1 thread),
so we compare with ``atol=1e-5, rtol=0`` -- about 80 float32 ulps at |x| ~ 1, far below any real bug (resetting the
cache between chunks loses 3 frames per chunk and changes values by O(1), see
``test_naive_per_chunk_decode_differs``).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from diffusers_raven.pipelines.vae_streaming import (
    StreamingVAEDecoder,
    StreamingVAEEncoder,
    denormalize_latents,
    frames_for_latents,
    latents_for_frames,
    normalize_latents,
)

NUM_LATENT_FRAMES = 7
ATOL = 1e-5

# Wan 2.1 layout (temporal upsampling x4) and a Wan 2.2-like layout (residual up blocks + patchify, patch_size=2).
CONFIGS = {
    "wan21": dict(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    ),
    "wan22_patch": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tensors are tiny: one intra-op thread is faster and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make_vae(name: str) -> AutoencoderKLWan:
    torch.manual_seed(0)
    z_dim = CONFIGS[name]["z_dim"]
    stats = dict(latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.5 * i for i in range(z_dim)])
    return AutoencoderKLWan(**CONFIGS[name], **stats).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request) -> tuple[AutoencoderKLWan, torch.Tensor, torch.Tensor]:
    vae = _make_vae(request.param)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, vae.config.z_dim, NUM_LATENT_FRAMES, 2, 2, generator=gen)
    with torch.no_grad():
        ref = vae.decode(z).sample
    return vae, z, ref


def _decode_chunks(stream: StreamingVAEDecoder, z: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [stream.decode(c) for c in z.split(sizes, dim=2)]


@pytest.mark.parametrize("sizes", [[3, 3, 1], [1, 3, 2, 1], [7], [1] * 7])
def test_chunked_matches_one_shot(setup, sizes: list[int]) -> None:
    vae, z, ref = setup
    stream = StreamingVAEDecoder(vae)
    outs = _decode_chunks(stream, z, sizes)

    # Frame counts: 1 + 4 (f - 1) for the first chunk, 4 f afterwards.
    expected = [1 + 4 * (sizes[0] - 1)] + [4 * s for s in sizes[1:]]
    assert [o.shape[2] for o in outs] == expected
    done = 0
    for s, o in zip(sizes, outs):
        assert frames_for_latents(s, done) == o.shape[2]
        done += s
    assert stream.num_latent_frames == NUM_LATENT_FRAMES

    out = torch.cat(outs, dim=2)
    scale = 8 * (vae.config.patch_size or 1)
    assert out.shape == ref.shape == (2, 3, 1 + 4 * (NUM_LATENT_FRAMES - 1), 2 * scale, 2 * scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert out.min() >= -1 and out.max() <= 1
    if sizes == [NUM_LATENT_FRAMES]:
        assert torch.equal(out, ref)  # identical op sequence and shapes: bitwise equal


def test_naive_per_chunk_decode_differs(setup) -> None:
    """Sanity check that the comparison is sensitive: ``vae.decode`` per chunk resets the cache and is wrong."""
    vae, z, ref = setup
    with torch.no_grad():
        naive = torch.cat([vae.decode(c).sample for c in z.split([3, 4], dim=2)], dim=2)
    assert naive.shape[2] != ref.shape[2] or (naive - ref).abs().max() > 1e-3


def test_interleaved_streams_are_independent(setup) -> None:
    vae, z, ref = setup
    z2 = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    sizes_a, sizes_b = [1, 3, 3], [2, 2, 3]
    with torch.no_grad():
        ref2 = vae.decode(z2).sample
    alone_a = torch.cat(_decode_chunks(StreamingVAEDecoder(vae), z, sizes_a), dim=2)
    alone_b = torch.cat(_decode_chunks(StreamingVAEDecoder(vae), z2, sizes_b), dim=2)

    a, b = StreamingVAEDecoder(vae), StreamingVAEDecoder(vae)
    outs_a, outs_b = [], []
    with torch.no_grad():
        for ca, cb in zip(z.split(sizes_a, dim=2), z2.split(sizes_b, dim=2)):
            outs_a.append(a.decode(ca))
            vae.decode(z2[:, :, :2])  # a one-shot decode in between must not disturb the streams
            outs_b.append(b.decode(cb))
    assert torch.equal(torch.cat(outs_a, 2), alone_a)
    assert torch.equal(torch.cat(outs_b, 2), alone_b)
    torch.testing.assert_close(alone_a, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(alone_b, ref2, rtol=0, atol=ATOL)


def test_explicit_state_objects(setup) -> None:
    vae, z, ref = setup
    dec = StreamingVAEDecoder(vae)
    s1, s2 = dec.new_state(), dec.new_state()
    with torch.no_grad():
        out1 = [dec.decode(c, state=s1) for c in z.split([4, 3], dim=2)]
        out2 = [dec.decode(c, state=s2) for c in z.split([2, 5], dim=2)]
    torch.testing.assert_close(torch.cat(out1, 2), ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.cat(out2, 2), ref, rtol=0, atol=ATOL)
    assert dec.num_latent_frames == 0  # the decoder's own state was untouched


def test_reset_restarts(setup) -> None:
    vae, z, ref = setup
    stream = StreamingVAEDecoder(vae)
    first = torch.cat(_decode_chunks(stream, z, [3, 4]), dim=2)
    stream.reset()
    assert stream.num_latent_frames == 0
    assert stream.frames_for_latents(3) == 9
    second = _decode_chunks(stream, z, [3, 4])
    assert second[0].shape[2] == 9
    torch.testing.assert_close(torch.cat(second, 2), first, rtol=0, atol=0)
    torch.testing.assert_close(first, ref, rtol=0, atol=ATOL)


def test_gradients_follow_caller(setup) -> None:
    vae, z, _ = setup
    zc = z[:1, :, :2].clone().requires_grad_(True)
    stream = StreamingVAEDecoder(vae, clamp=False)
    out = torch.cat([stream.decode(zc[:, :, :1]), stream.decode(zc[:, :, 1:])], dim=2)
    out.square().mean().backward()
    assert zc.grad is not None and zc.grad[:, :, 0].abs().sum() > 0  # chunk 2 backprops through the cache
    stream.state.detach()
    with torch.no_grad():
        assert not stream.decode(z[:1, :, 2:3]).requires_grad


def test_frames_for_latents() -> None:
    assert [frames_for_latents(n) for n in range(5)] == [0, 1, 5, 9, 13]
    assert frames_for_latents(3, already_decoded=2) == 12
    assert frames_for_latents(3, temporal_factor=2) == 5


# ---------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("latent_sizes", [[3, 3, 1], [1, 3, 3], [7], [2, 5], [1] * 7])
def test_chunked_encoding_matches_one_shot(setup, latent_sizes: list[int]) -> None:
    """Chunk-by-chunk encoding (pixel chunks of 1 + 4 (f - 1) frames, then 4 f) equals the mode of one-shot
    ``vae.encode``; one chunk is bitwise equal (the same calls on the same cache contents), other chunkings differ by
    the float rounding of ``quant_conv`` on a different number of frames."""
    vae, _, _ = setup
    pixels = torch.rand(2, 3, 1 + 4 * (NUM_LATENT_FRAMES - 1), 16, 16, generator=torch.Generator().manual_seed(3))
    pixels = pixels * 2 - 1
    with torch.no_grad():
        ref = vae.encode(pixels).latent_dist.mode()
        stream = StreamingVAEEncoder(vae)
        frame_sizes = [frames_for_latents(f, sum(latent_sizes[:i])) for i, f in enumerate(latent_sizes)]
        outs = [stream.encode(chunk) for chunk in pixels.split(frame_sizes, dim=2)]
    assert [o.shape[2] for o in outs] == latent_sizes
    assert stream.num_latent_frames == NUM_LATENT_FRAMES and stream.num_frames == pixels.shape[2]
    out = torch.cat(outs, dim=2)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    if latent_sizes == [NUM_LATENT_FRAMES]:
        assert torch.equal(out, ref)


def test_naive_per_chunk_encode_differs_and_reset_restarts(setup) -> None:
    """``vae.encode`` per chunk clears its cache (each chunk encoded as a new video): the comparison is sensitive.
    After ``reset`` the streaming encoder starts a new video."""
    vae, _, _ = setup
    pixels = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(pixels).latent_dist.mode()
        naive = torch.cat([vae.encode(c).latent_dist.mode() for c in pixels.split([5, 4], dim=2)], dim=2)
        stream = StreamingVAEEncoder(vae)
        stream.encode(pixels[:, :, :5])
        stream.reset()
        again = stream.encode(pixels)
    assert naive.shape != ref.shape or (naive - ref).abs().max() > 1e-3
    assert torch.equal(again, ref)


def test_encoder_frame_counts() -> None:
    assert [latents_for_frames(n) for n in (0, 1, 5, 9, 13)] == [0, 1, 2, 3, 4]
    assert latents_for_frames(12, already_encoded=9) == 3
    assert all(latents_for_frames(frames_for_latents(n, d), d) == n for n in range(5) for d in (0, 3))
    with pytest.raises(ValueError, match="1 \\+ 4"):
        latents_for_frames(4)
    with pytest.raises(ValueError, match="4·k"):
        latents_for_frames(5, already_encoded=9)
    stream = StreamingVAEEncoder(_make_vae("wan21"))
    with pytest.raises(ValueError, match="frames"):
        stream.encode(torch.zeros(1, 3, 2, 16, 16))


def test_normalize_roundtrip_matches_pipeline() -> None:
    vae = _make_vae("wan21")
    lat = torch.randn(1, 4, 2, 2, 3)
    # WanPipeline: latents_std = 1 / std; latents = latents / latents_std + latents_mean
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    assert torch.equal(denormalize_latents(lat, vae), lat / inv_std + mean)
    torch.testing.assert_close(normalize_latents(denormalize_latents(lat, vae), vae), lat)


def test_pipeline_with_patchified_vae_uses_its_spatial_factor() -> None:
    """A Wan 2.2-style VAE (2x2 patchify + two down-samplings) compresses 8x, not 2 ** len(temperal_downsample): the
    pipeline must size its latents from the patch too, and its streamed frames must equal ``vae.decode``."""
    from diffusers_raven import CausalVideoPipeline
    from diffusers_raven.pipelines.presets import random_tiny_pipeline
    from diffusers_raven.pipelines.vae_streaming import vae_spatial_factor, vae_temporal_factor

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
        is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=8,
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.0, 1.5, 0.5, 2.0],
    ).eval()
    assert (vae_spatial_factor(vae), vae_temporal_factor(vae)) == (8, 4)
    assert (vae_spatial_factor(_make_vae("wan21")), vae_spatial_factor(_make_vae("wan22_patch"))) == (8, 16)

    base = random_tiny_pipeline()
    pipe = CausalVideoPipeline(**{**base.components, "vae": vae})
    assert pipe.vae_scale_factor_spatial == 8
    out = pipe("a red circle", num_frames=21, height=32, width=32, output_type="latent", generator=torch.manual_seed(0))
    latents = out.frames
    assert latents.shape[-3:] == (6, 4, 4)
    video = pipe("a red circle", num_frames=21, height=32, width=32, output_type="pt", generator=torch.manual_seed(0))
    assert video.frames.shape[1:] == (21, 3, 32, 32)
    with torch.no_grad():
        ref = vae.decode(denormalize_latents(latents, vae)).sample  # [B, 3, F, H, W] in [-1, 1]
    torch.testing.assert_close(video.frames, (ref.permute(0, 2, 1, 3, 4) + 1) / 2, rtol=0, atol=1e-5)
