"""CausalVideoPipeline against independent computations: a cache-less recomputation of the sampler, one-shot VAE
decoding, a save/load round trip."""

import inspect
import json
import re

import numpy as np
import pytest
import torch

from diffusers_raven import CausalVideoPipeline, CausalWanTransformer3DModel, ConsistencyFlowMatchScheduler
from diffusers_raven.pipelines import denormalize_latents
from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_transformer_config, tiny_vae

SIZE = dict(height=32, width=32, max_sequence_length=16)
SIGMAS = [1.0, 0.9375, 0.8333333333333334, 0.625]


def make_pipeline(seed=0, **transformer_overrides):
    torch.manual_seed(seed)
    tok = build_word_tokenizer()
    transformer = CausalWanTransformer3DModel(**{**tiny_transformer_config(), **transformer_overrides}).eval()
    pipe = CausalVideoPipeline(
        tokenizer=tok,
        text_encoder=tiny_text_encoder(len(tok), seed=seed),
        transformer=transformer,
        vae=tiny_vae(seed=seed),
        scheduler=ConsistencyFlowMatchScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def manual_rollout(pipe, prompts_per_chunk, noise, seed, context_t=0.0):
    """The sampler of METHOD §1 recomputed without a cache: every step of chunk j runs one block-causal pass over
    [history chunks < j at the context timestep, noisy chunk j] and keeps chunk j's prediction. After chunk j's steps,
    if another chunk follows, history chunk j is ``(1 − σ_ctx)·x̂0 + σ_ctx·ε`` with ``ε`` drawn from the same generator
    (``σ_ctx = context_t / 1000``). Every pass encodes the whole history under chunk j's prompt, which is what the cache
    must hold after a prompt switch. Returns the clean video and the history chunks."""
    model = pipe.transformer
    g = gen(seed)
    chunk = model.config.num_frames_per_chunk
    sigma_ctx = context_t / 1000
    cleans, history = [], []
    with torch.no_grad():
        for j, prompt in enumerate(prompts_per_chunk):
            text = pipe.encode_prompt(prompt, max_sequence_length=16)[0]
            x = noise[:, :, j * chunk : (j + 1) * chunk]
            for k, sigma in enumerate(SIGMAS):
                past = torch.cat(history, dim=2) if history else x[:, :, :0]
                seq = torch.cat([past, x], dim=2)
                t = torch.cat([torch.full((1, past.shape[2]), context_t), torch.full((1, chunk), 1000 * sigma)], 1)
                v = model(seq, t, text).sample[:, :, -chunk:]
                x0 = x - sigma * v
                if k + 1 < len(SIGMAS):
                    eps = torch.randn(x.shape, generator=g)
                    x = (1 - SIGMAS[k + 1]) * x0 + SIGMAS[k + 1] * eps
                else:
                    x = x0
            cleans.append(x)
            if j + 1 < len(prompts_per_chunk):
                eps = torch.randn(x.shape, generator=g) if context_t > 0 else torch.zeros_like(x)
                history.append((1 - sigma_ctx) * x + sigma_ctx * eps)
    return torch.cat(cleans, dim=2), history


@pytest.mark.parametrize("context_noise", [0.0, 250.0])
def test_sampler_equals_cacheless_recomputation(pipe, context_noise):
    noise = torch.randn(1, 4, 9, 4, 4, generator=gen(7))
    out = pipe("a red circle", num_frames=33, latents=noise, generator=gen(3), output_type="latent",
               context_noise=context_noise, **SIZE).frames
    ref, _ = manual_rollout(pipe, ["a red circle"] * 3, noise, seed=3, context_t=context_noise)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("context_noise", [0.0, 250.0])
def test_trajectory_context_is_the_written_history(pipe, context_noise):
    """Each chunk's ``context`` is the history the later chunks attended to (the recomputation's), ``None`` for the
    last chunk of the video, which nothing reads."""
    noise = torch.randn(1, 4, 9, 4, 4, generator=gen(7))
    out = pipe("a red circle", num_frames=33, latents=noise, generator=gen(3), output_type="latent",
               context_noise=context_noise, return_trajectory=True, **SIZE)
    _, history = manual_rollout(pipe, ["a red circle"] * 3, noise, seed=3, context_t=context_noise)
    contexts = [record.context for record in out.trajectory]
    assert contexts[-1] is None and len(history) == 2
    for context, ref in zip(contexts, history):
        assert (context - ref).abs().max() <= 1e-5
    if context_noise == 0:
        assert all(torch.equal(r.context, r.clean) for r in out.trajectory[:-1])


def test_stream_concatenation_equals_call(pipe):
    full = pipe("a blue square", num_frames=33, generator=gen(1), **SIZE).frames
    chunks = list(pipe.stream("a blue square", num_frames=33, generator=gen(1), **SIZE))
    streamed = np.concatenate([c.frames for c in chunks], axis=1)
    assert streamed.shape == full.shape == (1, 33, 32, 32, 3)
    assert np.array_equal(streamed, full)
    assert [c.frame_start for c in chunks] == [0, 9, 21]
    assert [c.latent_frame_start for c in chunks] == [0, 3, 6]


def test_chunked_decoding_matches_one_shot(pipe):
    """Chunk-by-chunk decoding equals one-shot ``vae.decode`` up to float32 rounding (the 1x1x1 post-quant conv
    sees a different number of frames, which may change the summation order of the CPU kernels)."""
    latents = pipe("a green triangle", num_frames=33, generator=gen(2), output_type="latent", **SIZE).frames
    frames = pipe("a green triangle", num_frames=33, generator=gen(2), output_type="pt", **SIZE).frames
    with torch.no_grad():
        pixels = pipe.vae.decode(denormalize_latents(latents, pipe.vae)).sample
    one_shot = pipe.video_processor.postprocess_video(pixels, output_type="pt")
    assert frames.shape == one_shot.shape
    assert (frames - one_shot).abs().max() <= 1e-5


def test_trajectory_records_the_gaussian_transitions(pipe):
    noise = torch.randn(1, 4, 6, 4, 4, generator=gen(4))
    out = pipe("a red circle", num_frames=21, latents=noise, generator=gen(5), return_trajectory=True,
               output_type="latent", **SIZE)
    assert len(out.trajectory) == 2
    for j, record in enumerate(out.trajectory):
        assert torch.allclose(record.sigmas, torch.tensor(SIGMAS + [0.0]))
        assert torch.equal(record.noisy[0], noise[:, :, 3 * j : 3 * j + 3])
        assert torch.equal(record.pred_original[-1], record.clean)
        assert torch.equal(record.clean, out.frames[:, :, 3 * j : 3 * j + 3])
        assert record.transitions[-1] is None and all(t is not None for t in record.transitions[:-1])
        for k, transition in enumerate(record.transitions[:-1]):
            sigma_next = SIGMAS[k + 1]
            assert torch.allclose(transition.mean, (1 - sigma_next) * record.pred_original[k])
            assert torch.allclose(transition.std, torch.tensor(sigma_next))
            # the next recorded input is a draw from this transition
            z = (record.noisy[k + 1] - transition.mean) / sigma_next
            lp = torch.distributions.Normal(transition.mean, sigma_next).log_prob(record.noisy[k + 1]).sum()
            assert torch.allclose(transition.log_prob(record.noisy[k + 1]).double().sum(), lp.double(), rtol=1e-5)
            assert z.abs().max() < 10


@pytest.mark.parametrize("context_noise", [0.0, 250.0])
def test_prompt_switch_recaches_with_the_new_prompt(pipe, context_noise):
    """After a switch the cache holds the history re-encoded under the new prompt: the contexts the stream wrote,
    context noise included (the recomputation's history)."""
    noise = torch.randn(1, 4, 9, 4, 4, generator=gen(8))
    kwargs = dict(num_frames=33, latents=noise, output_type="latent", context_noise=context_noise, **SIZE)
    switched = pipe(["a red circle", "a blue square"], switch_frames=[9], generator=gen(9), **kwargs).frames
    plain = pipe("a red circle", generator=gen(9), **kwargs).frames
    assert torch.equal(switched[:, :, :3], plain[:, :, :3])
    ref, _ = manual_rollout(pipe, ["a red circle", "a blue square", "a blue square"], noise, seed=9,
                            context_t=context_noise)
    assert (switched - ref).abs().max() <= 1e-5


def test_interactive_switch_equals_the_recomputation(pipe):
    noise = torch.randn(1, 4, 9, 4, 4, generator=gen(12))
    stream = pipe.stream("a red circle", num_frames=33, latents=noise, generator=gen(13), output_type="latent",
                         context_noise=250, **SIZE)
    latents = []
    for chunk in stream:
        latents.append(chunk.latents)
        if chunk.chunk_index == 0:
            stream.switch_prompt("a blue square")
    ref, _ = manual_rollout(pipe, ["a red circle", "a blue square", "a blue square"], noise, seed=13, context_t=250)
    assert (torch.cat(latents, dim=2) - ref).abs().max() <= 1e-5


def test_interactive_switch_prompt(pipe):
    stream = pipe.stream("a red circle", window_frames=9, sink_frames=3, generator=gen(1), **SIZE)
    indices = []
    for i, chunk in enumerate(stream):
        indices.append(chunk.prompt_index)
        if i == 1:
            stream.switch_prompt("a blue square")
        if i == 3:
            break
    assert indices == [0, 0, 1, 1]


def test_endless_window_stream_has_flat_memory(pipe):
    stream = pipe.stream("a red circle", window_frames=9, sink_frames=3, generator=gen(1), output_type="latent",
                         **SIZE)
    sizes = []
    for i, _ in enumerate(stream):
        sizes.append((stream.cache.nbytes, len(stream._state.contexts)))
        if i == 24:
            break
    assert len(set(sizes[4:])) == 1
    assert stream.cache.rope == "relative"


def test_callback_on_step_end(pipe):
    calls = []

    def callback(p, step, timestep, kwargs):
        calls.append((step, float(timestep)))
        return {"latents": kwargs["latents"]}

    pipe("a red circle", num_frames=21, generator=gen(0), callback_on_step_end=callback, output_type="latent", **SIZE)
    assert [c[0] for c in calls] == list(range(8))
    assert [c[1] for c in calls[:4]] == pytest.approx([1000 * s for s in SIGMAS])


@pytest.mark.parametrize("output_type,check", [
    ("np", lambda f: isinstance(f, np.ndarray) and f.shape == (2, 9, 32, 32, 3)),
    ("pt", lambda f: torch.is_tensor(f) and f.shape == (2, 9, 3, 32, 32)),
    ("pil", lambda f: len(f) == 2 and len(f[0]) == 9 and f[0][0].size == (32, 32)),
    ("latent", lambda f: torch.is_tensor(f) and f.shape == (2, 4, 3, 4, 4)),
])
def test_output_types(pipe, output_type, check):
    frames = pipe(["a red circle", "a blue square"], num_frames=9, generator=gen(0), output_type=output_type,
                  **SIZE).frames
    assert check(frames)


def test_guidance_batches_the_negative_prompt(pipe):
    a = pipe("a red circle", num_frames=9, generator=gen(0), output_type="latent", **SIZE).frames
    b = pipe("a red circle", num_frames=9, generator=gen(0), guidance_scale=3.0, output_type="latent", **SIZE).frames
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_negative_prompt_embeds_serve_every_prompt_and_need_guidance(pipe):
    """``negative_prompt_embeds`` act as the ``negative_prompt`` text they encode, for every prompt of a schedule, and
    are ignored without guidance (``guidance_scale=1``), as ``negative_prompt`` is."""
    negative = pipe.encode_prompt("a blue square", max_sequence_length=16)[0]
    kwargs = dict(switch_frames=[9], num_frames=21, guidance_scale=3.0, output_type="latent", **SIZE)
    prompts = ["a red circle", "a green triangle"]
    by_text = pipe(prompts, negative_prompt="a blue square", generator=gen(0), **kwargs).frames
    by_embeds = pipe(prompts, negative_prompt_embeds=negative, generator=gen(0), **kwargs).frames
    assert (by_text - by_embeds).abs().max() <= 1e-5  # the text encoder's batch of one against ours: rounding
    plain = pipe("a red circle", num_frames=9, generator=gen(1), output_type="latent", **SIZE).frames
    ignored = pipe("a red circle", num_frames=9, generator=gen(1), output_type="latent", negative_prompt_embeds=negative,
                   **SIZE).frames
    assert torch.equal(plain, ignored)


def test_call_and_stream_take_the_same_arguments():
    """``__call__`` forwards its arguments to ``stream`` (plus ``return_dict``), and each docstring documents exactly
    the method's arguments."""

    def documented(method):
        names = re.findall(r"^ {12}(\w+(?:, \w+)*) \(", method.__doc__, flags=re.MULTILINE)
        return {name for entry in names for name in entry.split(", ")}

    call = [n for n in inspect.signature(CausalVideoPipeline.__call__).parameters if n != "self"]
    stream = [n for n in inspect.signature(CausalVideoPipeline.stream).parameters if n != "self"]
    assert [n for n in call if n != "return_dict"] == stream
    assert documented(CausalVideoPipeline.__call__) == set(call)
    assert documented(CausalVideoPipeline.stream) == set(stream)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_raven", "CausalWanTransformer3DModel"]
    assert index["scheduler"] == ["diffusers_raven", "ConsistencyFlowMatchScheduler"]
    assert index["_class_name"] == "CausalVideoPipeline"
    sized = CausalVideoPipeline(**pipe.components, sample_height=32, sample_width=48)
    sized.save_pretrained(tmp_path / "sized")
    reloaded = CausalVideoPipeline.from_pretrained(tmp_path / "sized")
    assert (reloaded.default_height, reloaded.default_width) == (32, 48)
    loaded = CausalVideoPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    a = pipe("a red circle", num_frames=21, generator=gen(0), **SIZE).frames
    b = loaded("a red circle", num_frames=21, generator=gen(0), **SIZE).frames
    # reloaded (memory-mapped) weights can take other CPU kernel paths: equal up to float32 rounding
    assert np.abs(a - b).max() <= 1e-5


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        CausalVideoPipeline.from_pretrained("no-such-user/no-such-model")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_frames=10), "num_frames"),
    (dict(num_frames=13), "chunk"),
    (dict(num_frames=9, height=40), "height"),
    (dict(num_frames=9, window_frames=3, sink_frames=1), "window_frames"),
    (dict(num_frames=9, output_type="gif"), "output_type"),
    (dict(num_frames=9, context_noise=1000), "context_noise"),
    (dict(num_frames=9, prompt=""), "prompt"),
    (dict(num_frames=33, prompt=["a", "b"], switch_frames=[9, 20]), "switch_frames"),
    (dict(num_frames=33, prompt=["a", "b", "c"], switch_frames=[20, 9]), "increasing"),
    (dict(num_frames=33, prompt=["a", "b"], switch_frames=[40]), "switch_frames"),
    (dict(num_frames=None), "window_frames"),
])
def test_bad_input(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", **SIZE, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs) if kwargs["num_frames"] is not None else next(iter(pipe.stream(**kwargs)))


def test_absolute_rope_past_the_table_names_relative_mode():
    small = make_pipeline(rope_max_seq_len=12)
    stream = small.stream("a red circle", window_frames=6, rope="absolute", output_type="latent", **SIZE)
    with pytest.raises(ValueError, match="relative"):
        for _ in range(6):
            next(stream)
    relative = small.stream("a red circle", window_frames=6, rope="relative", output_type="latent", **SIZE)
    for _ in range(6):
        next(relative)


def test_context_pass_skipped_only_after_the_last_chunk(pipe, monkeypatch):
    """A finite video writes the cache after every chunk but the last (nothing reads it); an endless stream writes it
    after every chunk. The frames are those of a run that does write the last chunk (checked against the no-cache
    recomputation elsewhere); here the pass count."""
    writes = []
    forward = type(pipe.transformer).forward

    def counting(self, *args, **kwargs):
        writes.append(bool(kwargs.get("update_cache", False)))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe.transformer), "forward", counting)
    latent_frames = (21 - 1) // 4 + 1
    chunks = -(-latent_frames // pipe.transformer.config.num_frames_per_chunk)
    pipe("a red circle", num_frames=21, generator=gen(), output_type="latent", **SIZE)
    assert sum(writes) == chunks - 1 and len(writes) == chunks * len(SIGMAS) + chunks - 1

    writes.clear()
    stream = pipe.stream("a red circle", num_frames=None, window_frames=12, generator=gen(), output_type="latent",
                         **SIZE)
    for _ in zip(range(3), stream):
        pass
    assert sum(writes) == 3


def test_default_text_length_is_the_tokenizers_when_short():
    """Without ``max_sequence_length`` the prompt is padded to the tokenizer's ``model_max_length`` when that is at
    most 512 (the length a small model such as the bundled one was trained with), else to Wan's 512: checked against
    ``encode_prompts`` with the explicit length, and end to end against an explicit call; bad values name the
    argument."""
    from diffusers_raven.utils.text import encode_prompts

    pipe = make_pipeline()
    prompt = "a red circle moving right on a black background"
    pipe.tokenizer.model_max_length = 18
    text = pipe.encode_prompt(prompt)[0]
    assert text.shape[1] == 18 and pipe.default_max_sequence_length() == 18
    torch.testing.assert_close(text, encode_prompts(pipe.tokenizer, pipe.text_encoder, prompt, 18), rtol=0, atol=0)
    default = pipe(prompt, num_frames=9, height=32, width=32, generator=gen(1), output_type="pt").frames
    explicit = pipe(prompt, num_frames=9, height=32, width=32, generator=gen(1), output_type="pt",
                    max_sequence_length=18).frames
    padded = pipe(prompt, num_frames=9, height=32, width=32, generator=gen(1), output_type="pt",
                  max_sequence_length=512).frames
    assert torch.equal(default, explicit) and not torch.equal(default, padded)  # the padding length matters
    pipe.tokenizer.model_max_length = int(1e30)  # "no limit", as saved by many tokenizers
    assert pipe.encode_prompt(prompt)[0].shape[1] == 512 and pipe.default_max_sequence_length(7) == 7
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_sequence_length"):
            pipe.encode_prompt(prompt, max_sequence_length=bad)
