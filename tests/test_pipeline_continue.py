"""Continuing a clip (``video=`` / ``video_latents=``) against independent computations: the uninterrupted stream with
the same noise, a cache-less recomputation whose chunk layout is a hand-built frame mask, one-shot ``vae.encode`` and
``vae.decode``; and bad input."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch

import diffusers_raven.models.transformer_causal_wan as causal_wan
from diffusers_raven.pipelines import denormalize_latents
from test_pipeline import SIGMAS, SIZE, gen, make_pipeline

CHUNK = 3


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


@pytest.fixture(scope="module")
def video(pipe):
    """A 33-frame video of the pipeline (9 latent frames, 3 chunks): latents, and the noise it was sampled from."""
    noise = torch.randn(1, 4, 9, 4, 4, generator=gen(7))
    latents = pipe("a red circle", num_frames=33, latents=noise, generator=gen(3), output_type="latent", **SIZE).frames
    return latents, noise


def _pipeline_logs(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("diffusers_raven")]


# ---------------------------------------------------------------------------------------------- exactness


def _uninterrupted(pipe, noise, prefix_chunks, **kwargs):
    """The uninterrupted stream's latents and the generator state at the start of chunk ``prefix_chunks`` (the stream
    yields a chunk once its context is written, so nothing of the next chunk has been drawn yet)."""
    generator = gen(3)
    stream = pipe.stream(latents=noise, generator=generator, output_type="latent", **kwargs)
    chunks, state = [], None
    for chunk in stream:
        chunks.append(chunk.latents)
        if len(chunks) == prefix_chunks:
            state = generator.get_state()
    return torch.cat(chunks, dim=2), state


SETTINGS = {
    "global": dict(),
    "window+sinks": dict(window_frames=9, sink_frames=3),
    "window, relative rope": dict(window_frames=9, rope="relative"),
    "prompt switch in the clip": dict(prompt=["a red circle", "a blue square"], switch_frames=[9]),
    "prompt switch after the clip": dict(prompt=["a red circle", "a blue square"], switch_frames=[33],
                                         window_frames=9, sink_frames=3),
    "guidance": dict(guidance_scale=3.0),
}


@pytest.mark.parametrize("prefix_chunks", [1, 2])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_continuing_from_latents_equals_the_uninterrupted_stream(pipe, setting, prefix_chunks):
    """A clip the pipeline generated, continued from its latents with the same noise (``latents=``, and the generator
    in the state the uninterrupted stream had when the chunk after the clip started), gives the same later chunks,
    bit for bit, with windows, sinks, relative RoPE, prompt switches and guidance (context noise 0, which draws
    nothing). The output starts with the clip, or leaves it out."""
    kwargs = dict(prompt="a red circle", num_frames=57, **SIZE)
    kwargs.update(SETTINGS[setting])
    noise = torch.randn(1, 4, 15, 4, 4, generator=gen(11))
    full, state = _uninterrupted(pipe, noise, prefix_chunks, **kwargs)
    clip = full[:, :, : CHUNK * prefix_chunks]
    for return_prefix in (True, False):
        generator = torch.Generator().manual_seed(0)
        generator.set_state(state)
        out = pipe(latents=noise, generator=generator, output_type="latent", video_latents=clip,
                   return_prefix=return_prefix, **kwargs).frames
        expected = full if return_prefix else full[:, :, clip.shape[2] :]
        assert out.shape == expected.shape
        assert torch.equal(out, expected), (out - expected).abs().max()


def _hand_mask(sizes, window=None, sinks=0):
    """Frame mask of chunks of the given sizes, written by hand: a frame sees its chunk, and the first ``sinks`` frames
    plus the ``window - sinks - f`` frames before its chunk (``f`` its chunk's size), or every earlier frame."""
    total = sum(sizes)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for f in sizes:
        rows = slice(start, start + f)
        mask[rows, rows] = True
        if window is None:
            mask[rows, :start] = True
        else:
            mask[rows, : min(sinks, start)] = True
            mask[rows, max(start - (window - sinks - f), sinks) : start] = True
        start += f
    return mask


def _recomputed_continuation(pipe, clip, noise, prompts, seed, context_t, monkeypatch, window=None, sinks=0):
    """METHOD §1 after a given clip, without a cache: the clip's chunks (a first chunk of ``P mod 3`` frames, then
    whole chunks) are the first history, noised to ``context_t`` with noise drawn first; then every step of chunk ``j``
    is one pass over [history at the context timestep, noisy chunk] under chunk ``j``'s prompt, with the chunk layout
    as a hand-built frame mask. Returns the generated chunks."""
    model = pipe.transformer
    g = gen(seed)
    sigma_ctx = context_t / 1000
    p = clip.shape[2]
    sizes = ([p % CHUNK] if p % CHUNK else []) + [CHUNK] * (p // CHUNK)

    def context(x):
        eps = torch.randn(x.shape, generator=g) if context_t > 0 else torch.zeros_like(x)
        return (1 - sigma_ctx) * x + sigma_ctx * eps

    history = []
    start = 0
    for f in sizes:
        history.append(context(clip[:, :, start : start + f]))
        start += f
    cleans = []
    with torch.no_grad():
        for j, prompt in enumerate(prompts):
            text = pipe.encode_prompt(prompt, max_sequence_length=16)[0]
            x = noise[:, :, p + j * CHUNK : p + (j + 1) * CHUNK]
            past = torch.cat(history, dim=2)
            mask = _hand_mask(sizes + [CHUNK] * (j + 1), window, sinks)
            monkeypatch.setattr(causal_wan, "block_causal_frame_mask", lambda *a, mask=mask, **k: mask)
            for k, sigma in enumerate(SIGMAS):
                seq = torch.cat([past, x], dim=2)
                t = torch.cat([torch.full((1, past.shape[2]), context_t), torch.full((1, CHUNK), 1000 * sigma)], 1)
                v = model(seq, t, text).sample[:, :, -CHUNK:]
                x0 = x - sigma * v
                if k + 1 < len(SIGMAS):
                    x = (1 - SIGMAS[k + 1]) * x0 + SIGMAS[k + 1] * torch.randn(x.shape, generator=g)
                else:
                    x = x0
            cleans.append(x)
            if j + 1 < len(prompts):
                history.append(context(x))
    monkeypatch.undo()
    return torch.cat(cleans, dim=2)


@pytest.mark.parametrize("clip_frames", [1, 2, 4, 6])
@pytest.mark.parametrize("context_noise", [0.0, 250.0])
def test_continuation_equals_a_cacheless_recomputation(pipe, video, monkeypatch, clip_frames, context_noise):
    """Clips of 1 (an image-to-video start), 2, 4 and 6 latent frames: the first chunk of the clip has ``P mod 3``
    frames and generation continues after the clip in whole chunks. The clip's context noise is drawn first, then
    every chunk's as usual."""
    latents, _ = video
    clip = latents[:, :, :clip_frames]
    noise = torch.randn(1, 4, clip_frames + 6, 4, 4, generator=gen(21))
    num_frames = 1 + 4 * (clip_frames + 6 - 1)
    out = pipe("a red circle", num_frames=num_frames, latents=noise, generator=gen(5), output_type="latent",
               context_noise=context_noise, video_latents=clip, return_prefix=False, **SIZE).frames
    ref = _recomputed_continuation(pipe, clip, noise, ["a red circle"] * 2, 5, context_noise, monkeypatch)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("setting", ["window", "switch"])
def test_short_first_chunk_with_windows_and_switches(pipe, video, monkeypatch, setting):
    """A 4-latent-frame clip (chunks of 1 and 3), then three chunks: with a window of 9 frames and 1 sink the chunks
    see what the hand-built windowed mask shows; with a prompt switch at output frame 25 (the second generated chunk),
    the re-cache regroups the clip's frames into the chunks they were written in (1, then 3) and the result equals the
    recomputation whose history is encoded under the new prompt, context noise included."""
    latents, _ = video
    clip = latents[:, :, :4]
    noise = torch.randn(1, 4, 13, 4, 4, generator=gen(22))
    kwargs = dict(num_frames=49, latents=noise, generator=gen(6), output_type="latent", video_latents=clip,
                  return_prefix=False, **SIZE)
    if setting == "window":
        out = pipe("a red circle", window_frames=9, sink_frames=1, **kwargs).frames
        ref = _recomputed_continuation(pipe, clip, noise, ["a red circle"] * 3, 6, 0.0, monkeypatch, window=9,
                                       sinks=1)
    else:
        out = pipe(["a red circle", "a blue square"], switch_frames=[25], context_noise=250, **kwargs).frames
        ref = _recomputed_continuation(pipe, clip, noise, ["a red circle", "a blue square", "a blue square"], 6,
                                       250.0, monkeypatch)
    assert (out - ref).abs().max() <= 1e-5


def test_continuing_from_pixels_encodes_chunk_by_chunk(pipe, video):
    """From pixel frames, the clip is what one-shot ``vae.encode`` makes of them (the posterior's mean, normalised by
    hand): the continuation equals the one from those latents, and the returned clip is their decoding (one-shot
    ``vae.decode`` of the clip's latents and the generated ones together)."""
    latents, _ = video
    with torch.no_grad():
        pixels = pipe.vae.decode(denormalize_latents(latents[:, :, :5], pipe.vae)).sample  # 17 frames in [-1, 1]
    frames = ((pixels[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).numpy()  # [17, H, W, 3] in [0, 1]
    with torch.no_grad():
        raw = pipe.vae.encode(torch.from_numpy(frames).permute(3, 0, 1, 2)[None] * 2 - 1).latent_dist.mean
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    encoded = (raw - mean) / std
    kwargs = dict(num_frames=29, **SIZE)  # 5 + 3 latent frames
    out = pipe("a red circle", video=frames, output_type="pt", return_trajectory=True, generator=gen(8), **kwargs)
    from_latents = pipe("a red circle", video_latents=encoded, output_type="latent", generator=gen(8), **kwargs).frames
    clip_latents = torch.cat([r.clean for r in out.trajectory[:2]], dim=2)  # the clip's chunks: 2 frames, then 3
    assert [r.clean.shape[2] for r in out.trajectory] == [2, 3, 3]
    assert all(r.noisy is None and r.transitions == [] for r in out.trajectory[:2])
    assert (clip_latents - encoded).abs().max() <= 1e-4
    generated = torch.cat([r.clean for r in out.trajectory[2:]], dim=2)
    assert (generated - from_latents[:, :, 5:]).abs().max() <= 1e-4
    with torch.no_grad():
        decoded = pipe.vae.decode(denormalize_latents(torch.cat([clip_latents, generated], 2), pipe.vae)).sample
    assert out.frames.shape == (1, 29, 3, 32, 32)
    assert (out.frames - (decoded.permute(0, 2, 1, 3, 4) + 1) / 2).abs().max() <= 1e-5


@pytest.mark.parametrize("form", ["pil", "uint8", "float array", "tensor [F, 3, H, W]", "batch tensor",
                                  "list of arrays", "list of clips"])
def test_video_forms_give_the_same_clip(pipe, form):
    """The forms diffusers' video pipelines accept (PIL images, arrays [F, H, W, 3] uint8 or float in [0, 1], tensors
    [F, 3, H, W] or [B, F, 3, H, W], lists of frames or of clips) encode to the same clip as the float array."""
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, size=(9, 32, 32, 3), dtype=np.uint8)
    as_float = uint8.astype(np.float32) / 255
    given = {
        "pil": [PIL.Image.fromarray(frame) for frame in uint8],
        "uint8": uint8,
        "float array": as_float,
        "tensor [F, 3, H, W]": torch.from_numpy(as_float).permute(0, 3, 1, 2),
        "batch tensor": torch.from_numpy(as_float).permute(0, 3, 1, 2)[None],
        "list of arrays": list(uint8),
        "list of clips": [as_float],
    }[form]
    kwargs = dict(num_frames=21, output_type="latent", return_trajectory=True, **SIZE)  # the clip is not random
    ref = pipe("a red circle", video=as_float, **kwargs).trajectory[0].clean
    out = pipe("a red circle", video=given, **kwargs).trajectory[0].clean
    assert (out - ref).abs().max() <= 1e-5


def test_single_image_starts_a_video(pipe):
    """One PIL image is a clip of one latent frame (a first chunk of one frame): image-to-video."""
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    chunks = list(pipe.stream("a red circle", num_frames=13, video=image, generator=gen(2), **SIZE))
    assert [(c.latent_frame_start, c.frames.shape[1], c.is_prefix) for c in chunks] == [(0, 1, True), (1, 12, False)]
    assert [c.frame_start for c in chunks] == [0, 1]


def test_stream_chunks_and_call_agree(pipe, video):
    """``stream`` yields the clip's chunks (``is_prefix``) then the generated ones, numbered in the whole video; put
    end to end they are ``__call__``'s frames; ``return_prefix=False`` leaves the clip's chunks out."""
    latents, _ = video
    kwargs = dict(num_frames=37, video_latents=latents[:, :, :4], **SIZE)  # 4 + 3 + 3 latent frames
    chunks = list(pipe.stream("a red circle", generator=gen(4), **kwargs))
    assert [(c.chunk_index, c.latent_frame_start, c.frame_start, c.is_prefix) for c in chunks] == [
        (0, 0, 0, True), (1, 1, 1, True), (2, 4, 13, False), (3, 7, 25, False)
    ]
    full = pipe("a red circle", generator=gen(4), **kwargs).frames
    assert full.shape[1] == 37
    assert np.array_equal(np.concatenate([c.frames for c in chunks], axis=1), full)
    later = list(pipe.stream("a red circle", return_prefix=False, generator=gen(4), **kwargs))
    assert [c.chunk_index for c in later] == [2, 3]
    assert np.array_equal(np.concatenate([c.frames for c in later], axis=1), full[:, 13:])


def test_endless_stream_after_a_clip(pipe, video):
    latents, _ = video
    stream = pipe.stream("a red circle", window_frames=9, sink_frames=3, video_latents=latents[:, :, :5],
                         generator=gen(1), output_type="latent", return_prefix=False, **SIZE)
    sizes, starts = [], []
    for chunk in stream:
        sizes.append(stream.cache.nbytes)
        starts.append(chunk.latent_frame_start)
        if len(starts) == 9:
            break
    assert starts == [5 + CHUNK * i for i in range(9)]
    assert len(set(sizes[2:])) == 1 and stream.cache.rope == "relative"


# ---------------------------------------------------------------------------------------------- input handling


def test_clip_longer_than_the_window_keeps_its_last_frames(pipe, video, caplog):
    """The first generated chunk sees at most ``window - chunk`` latent frames: a longer clip is cut to its last ones,
    with a warning, for latents and pixels alike."""
    latents, _ = video
    kwargs = dict(num_frames=33, window_frames=6, sink_frames=1, output_type="latent", **SIZE)
    with caplog.at_level(logging.WARNING):
        cut = pipe("a red circle", video_latents=latents[:, :, :7], generator=gen(2), **kwargs).frames
    assert any("7 latent frames" in m and "last 3" in m for m in _pipeline_logs(caplog)), caplog.text
    explicit = pipe("a red circle", video_latents=latents[:, :, 4:7], generator=gen(2), **kwargs).frames
    assert cut.shape[2] == 9 and torch.equal(cut, explicit)
    caplog.clear()
    frames = np.random.default_rng(2).random((29, 32, 32, 3), dtype=np.float32)  # 8 latent frames
    with caplog.at_level(logging.WARNING):
        cut = pipe("a red circle", video=frames, generator=gen(2), **kwargs).frames
    assert any("29 frames" in m and "last 9" in m and "window" in m for m in _pipeline_logs(caplog)), caplog.text
    assert torch.equal(cut, pipe("a red circle", video=frames[20:], generator=gen(2), **kwargs).frames)


def test_clip_length_and_size_are_adapted_with_a_warning(pipe, caplog):
    """A clip of 11 frames keeps its last 9 (1 + 4·k); frames of 64×48 pixels are resized to the generation size."""
    rng = np.random.default_rng(3)
    frames = rng.random((11, 32, 32, 3), dtype=np.float32)
    kwargs = dict(num_frames=21, output_type="latent", **SIZE)
    with caplog.at_level(logging.WARNING):
        out = pipe("a red circle", video=frames, generator=gen(2), **kwargs).frames
    assert any("11 frames" in m and "last 9" in m and "1 + 4·k" in m for m in _pipeline_logs(caplog)), caplog.text
    assert torch.equal(out, pipe("a red circle", video=frames[2:], generator=gen(2), **kwargs).frames)
    caplog.clear()
    large = [PIL.Image.fromarray((rng.random((64, 48, 3)) * 255).astype(np.uint8)) for _ in range(9)]
    with caplog.at_level(logging.WARNING):
        pipe("a red circle", video=large, **kwargs)
    assert any("64×48" in m and "resized to 32×32" in m for m in _pipeline_logs(caplog)), caplog.text


@pytest.mark.parametrize("kwargs,match", [
    (dict(video=np.zeros((0, 32, 32, 3), np.float32)), "no frames"),
    (dict(video=[]), "no frames"),
    (dict(video_latents=torch.zeros(1, 4, 0, 4, 4)), "no frames"),
    (dict(video=np.zeros((9, 32, 32, 4), np.float32)), r"\[F, H, W, 3\]"),
    (dict(video=torch.zeros(9, 1, 32, 32)), r"\[F, 3, H, W\]"),
    (dict(video=np.full((9, 32, 32, 3), 2.0, np.float32)), r"\[0, 1\]"),
    (dict(video="clip.mp4"), "`video` must be"),
    (dict(video=[1, 2, 3]), "`video` must be"),
    (dict(video_latents=torch.zeros(1, 4, 3, 8, 8)), "cannot be resized"),
    (dict(video_latents=torch.zeros(1, 3, 3, 4, 4)), "video_latents"),
    (dict(video_latents=torch.zeros(2, 4, 3, 4, 4)), "one per prompt"),
    (dict(video_latents=torch.zeros(1, 4, 3, 4, 4), video=np.zeros((9, 32, 32, 3), np.float32)), "not both"),
    (dict(video_latents=torch.zeros(1, 4, 3, 4, 4), num_frames=9), "counts the whole video"),
    (dict(video_latents=torch.zeros(1, 4, 4, 4, 4), num_frames=21), r"e\.g\. 25 or 37"),
])
def test_bad_clip_input(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", "num_frames": 21, "output_type": "latent", **SIZE, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


# ---------------------------------------------------------------------------------------------- the bundled model


def test_pixel_continuation_with_the_bundled_model_differs_by_the_vae_round_trip(capsys):
    """With the bundled model (a trained VAE), a 21-frame clip of its own continued from its decoded pixels: the clip
    comes back through the VAE (encode, decode) and the later chunks differ from the uninterrupted stream's about as
    much (PSNR above 28 dB; measured over six prompts by ``benchmarks/continue_clip.py``: 33.3 dB for the clip, 33.7
    and 35.5 dB for the next two chunks). From the clip's latents the later chunks are the uninterrupted ones."""
    from diffusers_raven.pipelines.presets import bundled_model_available, load_pipeline

    if not bundled_model_available():
        pytest.skip("the bundled model is not installed")
    model, _ = load_pipeline("bundled")
    model.set_progress_bar_config(disable=True)
    prompt = "a yellow circle moving down on a gray background"
    noise = torch.randn(1, 16, 12, 8, 8, generator=gen(103))
    generator = gen(3)
    chunks, state = [], None
    for chunk in model.stream(prompt, num_frames=45, latents=noise, generator=generator, output_type="np"):
        chunks.append(chunk)
        if len(chunks) == 2:
            state = generator.get_state()
    video = np.concatenate([c.frames[0] for c in chunks])
    latents = torch.cat([c.latents for c in chunks], dim=2)

    def continued(**clip):
        g = torch.Generator()
        g.set_state(state)
        return model(prompt, num_frames=45, latents=noise, generator=g, **clip).frames[0]

    assert torch.equal(continued(video_latents=latents[:, :, :6], output_type="latent"), latents[0])
    from_pixels = continued(video=video[:21])

    def psnr(a, b):
        return float(10 * np.log10(1 / np.mean((a - b) ** 2)))

    clip, chunk3, chunk4 = (psnr(from_pixels[a:b], video[a:b]) for a, b in ((0, 21), (21, 33), (33, 45)))
    with capsys.disabled():
        print(f"\ncontinued from pixels, PSNR to the uninterrupted stream: clip {clip:.1f} dB (the VAE round trip), "
              f"chunk 3 {chunk3:.1f} dB, chunk 4 {chunk4:.1f} dB")
    assert min(clip, chunk3, chunk4) > 28
