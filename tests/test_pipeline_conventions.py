"""CausalVideoPipeline follows diffusers.WanPipeline's conventions, checked against WanPipeline itself.

Both pipelines get the same tiny tokenizer, text encoder and VAE, the same transformer weights (Wan's class for
WanPipeline) and the consistency scheduler. A one-chunk video is then one Wan video: with the noise drawn from the
global generator in the same order, the two pipelines give the same frames, so each convention (videos per prompt,
guidance changed or cut by a callback, interrupts, new prompt embeddings from a callback, the run properties) is
compared number for number. Over several chunks, the callbacks' effects are checked against a cache-less
recomputation and against the uninterrupted video.
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.callbacks import PipelineCallback

from diffusers_raven import CausalVideoPipeline, CausalWanTransformer3DModel, ConsistencyFlowMatchScheduler
from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_transformer_config, tiny_vae

SIZE = dict(height=32, width=32, max_sequence_length=16)
ONE_CHUNK = dict(num_frames=9, **SIZE)  # 3 latent frames: one chunk
SIGMAS = [1.0, 0.9375, 0.8333333333333334, 0.625]
STEPS = len(SIGMAS)
PROPERTIES = ("guidance_scale", "do_classifier_free_guidance", "num_timesteps", "current_timestep", "interrupt",
              "attention_kwargs")


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    tok = build_word_tokenizer()
    causal = CausalWanTransformer3DModel(**tiny_transformer_config()).eval()
    plain = WanTransformer3DModel(**tiny_transformer_config()).eval()
    plain.load_state_dict(causal.state_dict())
    shared = dict(tokenizer=tok, text_encoder=tiny_text_encoder(len(tok), seed=0), vae=tiny_vae(seed=0))
    ours = CausalVideoPipeline(transformer=causal, scheduler=ConsistencyFlowMatchScheduler(), **shared)
    wan = WanPipeline(transformer=plain, scheduler=ConsistencyFlowMatchScheduler(), **shared)
    wan_euler = WanPipeline(transformer=plain, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), **shared)
    for p in (ours, wan, wan_euler):
        p.set_progress_bar_config(disable=True)
    return ours, wan, wan_euler


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, *args, seed=11, **kwargs):
    """The pipeline with every random draw from the global generator seeded with ``seed`` (WanPipeline's scheduler
    steps draw from it, so ours must too for the two to match)."""
    torch.manual_seed(seed)
    if isinstance(pipe, WanPipeline):
        kwargs = {"num_inference_steps": STEPS, **kwargs}
    kwargs.setdefault("guidance_scale", 1.0)
    return pipe(*args, **kwargs).frames


def recorder(records, action=None):
    """A step-end callback recording the step, its timestep and the run properties, then applying ``action``."""

    def callback(pipe, step, timestep, kwargs):
        records.append({"step": step, "timestep": float(timestep), "current": float(pipe.current_timestep),
                        **{name: getattr(pipe, name) for name in PROPERTIES if name != "current_timestep"}})
        out = dict(kwargs)
        if action is not None:
            out.update(action(pipe, step, kwargs) or {})
        return out

    return callback


def guided_recomputation(pipe, prompt, noise, seed, scales):
    """Every step of a multi-chunk video without a cache: block-causal passes over [clean history, noisy chunk] for
    the positive and the negative (empty) prompt, combined with ``scales[i]`` for step ``i`` of the video (at most 1:
    the positive branch alone), step noise from ``gen(seed)``; context noise 0 (the history is the clean output)."""
    model, chunk = pipe.transformer, pipe.chunk_frames
    positive, negative = pipe.encode_prompt(prompt, do_classifier_free_guidance=True, max_sequence_length=16)
    g, cleans = gen(seed), []
    with torch.no_grad():
        for j in range(noise.shape[2] // chunk):
            x = noise[:, :, j * chunk : (j + 1) * chunk]
            for k, sigma in enumerate(SIGMAS):
                past = torch.cat(cleans, dim=2) if cleans else x[:, :, :0]
                seq = torch.cat([past, x], dim=2)
                t = torch.cat([torch.zeros(1, past.shape[2]), torch.full((1, chunk), 1000 * sigma)], dim=1)
                cond = model(seq, t, positive).sample[:, :, -chunk:]
                uncond = model(seq, t, negative).sample[:, :, -chunk:]
                scale = scales[j * STEPS + k]
                x0 = x - sigma * (cond if scale <= 1 else uncond + scale * (cond - uncond))
                x = (1 - SIGMAS[k + 1]) * x0 + SIGMAS[k + 1] * torch.randn(x.shape, generator=g) if k + 1 < STEPS else x0
            cleans.append(x)
    return torch.cat(cleans, dim=2)


# ------------------------------------------------------------------------------------------------ what is accepted
def test_accepts_every_wan_argument_and_property():
    wan_args = set(inspect.signature(WanPipeline.__call__).parameters)
    ours_args = set(inspect.signature(CausalVideoPipeline.__call__).parameters)
    assert wan_args <= ours_args, wan_args - ours_args
    for name in PROPERTIES:
        assert isinstance(getattr(WanPipeline, name), property) and isinstance(getattr(CausalVideoPipeline, name), property)
    assert CausalVideoPipeline._callback_tensor_inputs == WanPipeline._callback_tensor_inputs


@pytest.mark.parametrize("kwargs", [
    dict(prompt="a red circle"),
    dict(prompt=["a red circle", "a blue square"], num_videos_per_prompt=2, guidance_scale=3.0,
         negative_prompt=["a green triangle", "a yellow star"]),
])
def test_one_chunk_is_the_wan_video(pipes, kwargs):
    """The reference for the tests below: a one-chunk video equals WanPipeline's with the same components, with
    several videos per prompt (WanPipeline's order: a prompt's videos next to each other) and guidance."""
    ours, wan, _ = pipes
    a, b = run(ours, **kwargs, **ONE_CHUNK), run(wan, **kwargs, **ONE_CHUNK)
    assert a.shape == b.shape == (len(a), 9, 32, 32, 3)
    assert np.abs(a - b).max() < 1e-5


def test_wan_only_arguments_and_bad_callback_inputs_are_refused_as_wan_refuses_them(pipes):
    ours, wan, _ = pipes
    for pipe in (ours, wan):
        with pytest.raises(ValueError, match="guidance_scale_2"):
            run(pipe, "a red circle", guidance_scale_2=2.0, **ONE_CHUNK)
        with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
            run(pipe, "a red circle", callback_on_step_end=recorder([]),
                callback_on_step_end_tensor_inputs=["latents", "noise_pred"], **ONE_CHUNK)
        with pytest.raises(ValueError, match="generator"):  # one generator per video, or one for all
            run(pipe, ["a red circle", "a blue square"], generator=[gen(0), gen(1), gen(2)], **ONE_CHUNK)
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        run(ours, "a red circle", num_videos_per_prompt=0, **ONE_CHUNK)


# ------------------------------------------------------------------------------------------------ properties
def test_run_properties_during_callbacks_are_wans(pipes):
    ours, wan, _ = pipes
    kwargs = dict(guidance_scale=3.0, attention_kwargs={"scale": 1.0}, **ONE_CHUNK)
    seen = {}
    for name, pipe in (("ours", ours), ("wan", wan)):
        seen[name] = []
        run(pipe, "a red circle", callback_on_step_end=recorder(seen[name]), **kwargs)
        assert pipe.current_timestep is None and pipe.num_timesteps == STEPS and pipe.interrupt is False
    assert seen["ours"] == seen["wan"]
    assert [r["step"] for r in seen["ours"]] == list(range(STEPS))
    assert all(r["current"] == r["timestep"] and r["attention_kwargs"] == {"scale": 1.0} for r in seen["ours"])


def test_num_timesteps_counts_every_step_of_the_video(pipes):
    """Chunks × steps: the number of callback calls, the steps numbered over the whole video; with a clip to
    continue, only the generated chunks count."""
    ours = pipes[0]
    for extra, chunks in ((dict(num_frames=33), 3), (dict(num_frames=33, video_latents=torch.randn(1, 4, 3, 4, 4)), 2)):
        records = []
        run(ours, "a red circle", callback_on_step_end=recorder(records), output_type="latent", **{**SIZE, **extra})
        assert ours.num_timesteps == chunks * STEPS == len(records)
        assert [r["step"] for r in records] == list(range(chunks * STEPS))
        assert all(r["num_timesteps"] == chunks * STEPS and r["current"] == r["timestep"] for r in records)
    stream = ours.stream("a red circle", window_frames=6, **SIZE)
    next(stream)
    assert ours.num_timesteps is None  # an endless stream


# ------------------------------------------------------------------------------------------------ callbacks act
def test_guidance_cut_by_a_callback_is_wans(pipes):
    """A callback setting ``_guidance_scale`` to 0 after step 1 (a CFG cut-off): the later steps are unguided in
    both pipelines, and ``do_classifier_free_guidance`` says so."""
    ours, wan, _ = pipes

    def cut(pipe, step, kwargs):
        if step == 1:
            pipe._guidance_scale = 0.0

    seen, frames = {}, {}
    for name, pipe in (("ours", ours), ("wan", wan)):
        seen[name] = []
        frames[name] = run(pipe, "a red circle", guidance_scale=4.0, callback_on_step_end=recorder(seen[name], cut),
                           **ONE_CHUNK)
    assert np.abs(frames["ours"] - frames["wan"]).max() < 1e-5
    assert [r["do_classifier_free_guidance"] for r in seen["ours"]] == [True, True, False, False]
    assert seen["ours"] == seen["wan"]
    assert np.abs(frames["ours"] - run(ours, "a red circle", guidance_scale=4.0, **ONE_CHUNK)).max() > 1e-3


def test_guidance_changed_by_a_callback_takes_effect_over_chunks(pipes):
    """Over three chunks, a callback raising the scale mid-chunk and cutting guidance later: the video is the
    cache-less recomputation with that scale per step. (WanPipeline reads only the on/off of ``_guidance_scale``;
    here its value is used too.)"""
    ours = pipes[0]
    schedule = {5: 6.0, 9: 1.0}  # after step 5 (chunk 1, step 1) the scale is 6; after step 9, guidance is off

    def change(pipe, step, kwargs):
        if step in schedule:
            pipe._guidance_scale = schedule[step]

    noise = torch.randn(1, 4, 9, 4, 4, generator=gen(7))
    out = ours("a red circle", num_frames=33, latents=noise, generator=gen(3), guidance_scale=3.0, output_type="latent",
               callback_on_step_end=recorder([], change), **SIZE).frames
    scales = [3.0] * 6 + [6.0] * 4 + [1.0] * 2
    expected = guided_recomputation(ours, "a red circle", noise, 3, scales)
    assert (out - expected).abs().max() < 1e-4
    unchanged = guided_recomputation(ours, "a red circle", noise, 3, [3.0] * 12)
    assert (out[:, :, 3:] - unchanged[:, :, 3:]).abs().max() > 1e-2


def test_guidance_cannot_be_turned_on_mid_stream(pipes):
    def turn_on(pipe, step, kwargs):
        pipe._guidance_scale = 3.0

    with pytest.raises(ValueError, match="started without guidance"):
        run(pipes[0], "a red circle", callback_on_step_end=recorder([], turn_on), **ONE_CHUNK)


def test_interrupt_is_wans(pipes):
    """``_interrupt`` set after step 1: the remaining steps are skipped and the latents decoded as they stand."""
    ours, wan, _ = pipes

    def stop(pipe, step, kwargs):
        if step == 1:
            pipe._interrupt = True

    seen, frames = {}, {}
    for name, pipe in (("ours", ours), ("wan", wan)):
        seen[name] = []
        frames[name] = run(pipe, "a red circle", callback_on_step_end=recorder(seen[name], stop), **ONE_CHUNK)
    assert len(seen["ours"]) == len(seen["wan"]) == 2
    assert np.abs(frames["ours"] - frames["wan"]).max() < 1e-5


def test_interrupt_ends_the_video_after_the_chunk_in_progress(pipes):
    """Over several chunks: the chunks before the interrupt are the uninterrupted video's, the interrupted chunk is
    its latents after the interrupting step, and no chunk follows (nor a context pass)."""
    ours = pipes[0]
    states = {}

    def keep(pipe, step, kwargs):
        states[step] = kwargs["latents"].clone()

    def stop(pipe, step, kwargs):
        if step == 5:
            pipe._interrupt = True

    kwargs = dict(num_frames=33, output_type="latent", **SIZE)
    full = ours("a red circle", generator=gen(4), callback_on_step_end=recorder([], keep), **kwargs).frames
    records = []
    cut = ours("a red circle", generator=gen(4), callback_on_step_end=recorder(records, stop), **kwargs).frames
    assert len(records) == 6 and cut.shape[2] == 6
    assert torch.equal(cut[:, :, :3], full[:, :, :3])
    assert torch.equal(cut[:, :, 3:], states[5])
    chunks = list(ours.stream("a red circle", generator=gen(4), callback_on_step_end=recorder([], stop), **kwargs))
    assert [c.chunk_index for c in chunks] == [0, 1] and ours.current_timestep is None


def test_prompt_embeds_returned_by_a_callback_are_used_as_by_wan(pipes):
    ours, wan, _ = pipes
    other = ours.encode_prompt("a blue square", max_sequence_length=16)[0]

    def switch(pipe, step, kwargs):
        if step == 1:
            return {"prompt_embeds": other}

    kwargs = dict(callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **ONE_CHUNK)
    a = run(ours, "a red circle", callback_on_step_end=recorder([], switch), **kwargs)
    b = run(wan, "a red circle", callback_on_step_end=recorder([], switch), **kwargs)
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a - run(ours, "a red circle", **ONE_CHUNK)).max() > 1e-3


def test_pipeline_callback_objects_name_their_tensor_inputs(pipes):
    """A ``PipelineCallback`` brings its own ``tensor_inputs`` (``negative_prompt_embeds`` here), as in WanPipeline."""
    seen = {}

    class Probe(PipelineCallback):
        tensor_inputs = ["latents", "negative_prompt_embeds"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.setdefault(type(pipeline).__name__, []).append(tuple(callback_kwargs["negative_prompt_embeds"].shape))
            return callback_kwargs

    for pipe in pipes[:2]:
        run(pipe, "a red circle", guidance_scale=3.0, callback_on_step_end=Probe(), **ONE_CHUNK)
    assert seen["CausalVideoPipeline"] == seen["WanPipeline"] == [(1, 16, 32)] * STEPS


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_a_batch_gives_the_videos_of_single_prompts(pipes, guidance_scale):
    """Two prompts × two videos with one generator per video: each video is the one its prompt and generator make
    alone (a two-chunk video, stochastic steps). WanPipeline has the same property (deterministic Euler steps)."""
    ours, _, wan_euler = pipes
    prompts = ["a red circle", "a blue square"]
    for pipe, kwargs in ((ours, dict(num_frames=21)), (wan_euler, dict(num_frames=21, num_inference_steps=3))):
        kwargs = dict(guidance_scale=guidance_scale, output_type="latent", **SIZE, **kwargs)
        batch = pipe(prompts, num_videos_per_prompt=2, generator=[gen(s) for s in range(4)], **kwargs).frames
        singles = torch.cat([pipe(prompts[s // 2], generator=gen(s), **kwargs).frames for s in range(4)])
        assert batch.shape[0] == 4 and (batch - singles).abs().max() < 1e-4, type(pipe).__name__


def test_videos_per_prompt_from_embeddings_and_clips(pipes):
    """Given prompt embeddings are repeated like encoded prompts; a clip per prompt serves each prompt's videos."""
    ours = pipes[0]
    prompts = ["a red circle", "a blue square"]
    kwargs = dict(num_videos_per_prompt=2, guidance_scale=3.0, output_type="latent", num_frames=21, **SIZE)
    by_text = ours(prompts, generator=gen(5), **kwargs).frames
    embeds, negative = ours.encode_prompt(prompts, do_classifier_free_guidance=True, max_sequence_length=16)
    by_embeds = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=gen(5), **kwargs).frames
    assert (by_text - by_embeds).abs().max() < 1e-5  # the embeddings equal; CPU kernels may round differently
    clips = torch.randn(2, 4, 3, 4, 4, generator=gen(6))
    kwargs["num_frames"] = 33
    per_prompt = ours(prompts, video_latents=clips, generator=gen(5), **kwargs).frames
    per_video = ours(prompts, video_latents=clips.repeat_interleave(2, 0), generator=gen(5), **kwargs).frames
    assert torch.equal(per_prompt, per_video) and torch.equal(per_prompt[:, :, :3], clips.repeat_interleave(2, 0))


def test_alternating_streams_keep_their_own_properties(pipes):
    """Two lazy streams of one pipeline, read in turns: each keeps its guidance (the pipeline's properties follow
    the stream making a chunk) and gives the video it gives alone."""
    ours = pipes[0]
    kwargs = dict(num_frames=21, output_type="latent", **SIZE)
    alone = [ours("a red circle", generator=gen(1), guidance_scale=g, **kwargs).frames for g in (1.0, 3.0)]
    streams = [ours.stream("a red circle", generator=gen(1), guidance_scale=g, **kwargs) for g in (1.0, 3.0)]
    chunks = [[], []]
    for _ in range(2):
        for i, stream in enumerate(streams):
            chunks[i].append(next(stream).latents)
            assert ours.guidance_scale == (1.0, 3.0)[i]
    for i in range(2):
        assert torch.equal(torch.cat(chunks[i], dim=2), alone[i])
