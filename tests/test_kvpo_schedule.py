"""KVPOTrainer with prompt schedules (rows whose prompt switches mid-video): the anchor is the pipeline's own stream
with the same schedule and noise, the branches re-cache their own history at a switch, the replay through the cache
equals block-causal recomputations (values and gradient), each segment's frames are scored against its own prompt,
and bad schedules fail before any rollout with an error naming the argument."""

import os
import sys

import pytest
import torch

from diffusers_raven import KVCache, KVPOConfig, KVPOTrainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from test_pipeline import make_pipeline  # noqa: E402

CHUNK = 3
FIRST, SECOND = "a red circle", "a blue square"
# 69 frames = 18 latent frames = 6 chunks; a switch at output frame 33 takes effect at chunk 3 (latent frame 9), one
# at frame 57 at chunk 5 (latent frame 15).
AT_CHUNK_3, AT_CHUNK_5 = 33, 57


def build(tmp_path, switch_frames=(AT_CHUNK_3,), prompts=(FIRST, SECOND), reward_funcs=None, eval_dataset=None,
          **overrides):
    """The tiny KVPO set-up of tests/scripts/tiny_kvpo.py (6 chunks, 3 branches, 2 routed chunks, a 9-frame window
    with 1 sink and a pool of 12) on a dataset of one prompt schedule, repeated."""
    from datasets import Dataset

    settings = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, num_frames=69, height=32, width=32,
        max_sequence_length=16, logging_steps=1, save_steps=10, use_cpu=True, learning_rate=1e-3, seed=0,
        num_branches=3, routed_chunks=2, selected_frames=2, recent_frames=4, window_frames=9, sink_frames=1,
        pool_frames=12, fork_start_chunk=2, beta=0.5,
    )
    settings.update(overrides)
    rows = {"prompt": [list(prompts)] * 4}
    if switch_frames is not None:
        rows["switch_frames"] = [list(switch_frames)] * 4
    return KVPOTrainer(model=make_pipeline(), reward_funcs=reward_funcs or [brightness], args=KVPOConfig(**settings),
                       train_dataset=Dataset.from_dict(rows), eval_dataset=eval_dataset)


def brightness(prompts, videos, **columns):
    return [float(v.mean()) for v in videos]


def generation(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def texts(trainer):
    return trainer.encode_prompts([FIRST, SECOND])


def block_causal_velocity(model, text, history, x, sigma):
    """v_θ of chunk x (starting after `history`) by one block-causal pass over [history at t = 0, x at 1000 σ]:
    cached inference with a global cache whose every frame was written under `text`."""
    seq = torch.cat([history, x], dim=2)
    t = torch.cat([torch.zeros(history.shape[2]), torch.full((x.shape[2],), 1000 * float(sigma))])[None]
    t = t.expand(x.shape[0], -1)
    return model(seq, t, text.expand(x.shape[0], -1, -1), attention="block_causal").sample[:, :, -x.shape[2]:]


@pytest.mark.parametrize("switch_frame", [AT_CHUNK_3, AT_CHUNK_5])
def test_anchor_is_the_pipeline_stream_and_branches_share_the_start(tmp_path, monkeypatch, switch_frame):
    """Windowed cache: the anchor equals the pipeline streaming the same schedule (LongLive re-cache) from the same
    noise; the pool the plans draw from has the size routable_frame_count predicts after the re-cache; branches equal
    the anchor before the fork and differ after it. At chunk 3 the switch lies at or before the fork (forks 3, 4), at
    chunk 5 after the routed stretch (forks 2, 3: the branches switch themselves)."""
    pools = []
    original = KVCache.routable_frames

    def spy(self, recent_frames):
        pools.append(original(self, recent_frames))
        return pools[-1]

    monkeypatch.setattr(KVCache, "routable_frames", spy)
    trainer = build(tmp_path, switch_frames=(switch_frame,))
    switch = trainer.pipeline._first_chunk_from(switch_frame)
    assert switch == {AT_CHUNK_3: 3, AT_CHUNK_5: 5}[switch_frame]
    schedule = trainer.prompt_schedule([FIRST, SECOND], [switch_frame])
    assert trainer.allowed_forks(schedule) == ([3, 4] if switch == 3 else [2, 3])
    inputs = generation(trainer)
    entry = inputs["kvpo"][0]
    record, fork = entry["record"], entry["fork"]
    last_switch = switch if switch <= fork else None
    assert len(pools[-1]) == trainer.routable_frame_count(fork, last_switch)

    key = f"0/{int(inputs['sample_index'][0])}"
    channels, frames, h, w = trainer.latent_shape
    latents = torch.randn((1, channels, frames, h, w), generator=trainer._seeded(f"{key}/initial_noise"))
    with torch.no_grad():
        out = trainer.pipeline(prompt_embeds=list(texts(trainer)[:, None]), switch_frames=[switch_frame],
                               num_frames=69, height=32, width=32, latents=latents,
                               generator=trainer._seeded(f"{key}/rollout"), window_frames=9, sink_frames=1,
                               output_type="latent").frames
    kept = record.clean.shape[2]  # the record stops after the routed stretch (the replay needs no later frame)
    assert torch.allclose(out[0, :, :kept], record.clean[-1], atol=1e-6), (out[0, :, :kept] - record.clean[-1]).abs().max()

    prefix = fork * CHUNK
    for r in range(record.batch_size - 1):
        assert torch.equal(record.noisy[:, r, :, :prefix], record.noisy[:, -1, :, :prefix])
        assert not torch.equal(record.clean[r, :, prefix:], record.clean[-1, :, prefix:])


def test_branches_switch_with_their_own_history(tmp_path):
    """Global cache, switch after the routed stretch (chunk 5): the re-cache rebuilds every frame under the second
    prompt, so every row's chunk 5 (each branch's and the anchor's) must equal a block-causal pass over that row's own
    context latents with the second prompt; with the first prompt it would not."""
    trainer = build(tmp_path, switch_frames=(AT_CHUNK_5,), window_frames=None, sink_frames=0, pool_frames=None)
    entry = generation(trainer)["kvpo"][0]
    # the record kept for the replay stops after the routed stretch: rebuild the full rows from a fresh rollout
    group = trainer.rollout_group(entry["texts"], 0, trainer.prompt_schedule([FIRST, SECOND], [AT_CHUNK_5]))
    record, text = group["record"], texts(trainer)
    lo, hi = 5 * CHUNK, 6 * CHUNK
    with torch.no_grad():
        for k in range(record.num_steps):
            x, sigma = record.noisy[k, :, :, lo:hi], record.sigmas[k]
            recorded = (x - record.pred_original[k, :, :, lo:hi]) / sigma
            second = block_causal_velocity(trainer.student, text[1:], record.context[:, :, :lo], x, sigma)
            first = block_causal_velocity(trainer.student, text[:1], record.context[:, :, :lo], x, sigma)
            assert torch.allclose(recorded, second, atol=1e-4), (recorded - second).abs().max()
            assert not torch.allclose(recorded, first, atol=1e-3)


def independent_energy(model, record, fork, rows, text, grad_steps, chunks=2):
    """½ Σ_chunks Σ_k mean‖v_θ − v‖² with v_θ of every routed chunk (after the switch at chunk 3, global cache) from a
    fresh cache into which the row's context latents are written chunk by chunk under the second prompt (what the
    re-cache rebuilds), then the recorded x_{σ_k} through it; written without the trainer's sampler or re-cache."""
    energies = []
    for g in rows:
        total = 0.0
        for b in range(fork, fork + chunks):
            cache = KVCache.for_model(model, 1)
            with torch.no_grad():
                for c in range(b):
                    model(record.context[g : g + 1, :, c * CHUNK : (c + 1) * CHUNK], torch.zeros(1), text,
                          kv_cache=cache, frame_offset=c * CHUNK, update_cache=True)
            lo, hi = b * CHUNK, (b + 1) * CHUNK
            for k in range(record.num_steps):
                sigma = float(record.sigmas[k])
                x = record.noisy[k, g : g + 1, :, lo:hi]
                with torch.set_grad_enabled(k < grad_steps):
                    v = model(x, torch.full((1,), 1000 * sigma), text, kv_cache=cache, frame_offset=lo).sample
                recorded = (x.double() - record.pred_original[k, g : g + 1, :, lo:hi].double()) / sigma
                total = total + 0.5 * (v.double() - recorded).square().mean()
        energies.append(total)
    return torch.stack(energies)


def test_replay_through_the_cache_values_and_gradient(tmp_path):
    """Global cache, switch at chunk 3 at or before the fork: the energies of the replay through the cache (the
    anchor's ≈ 0: the replay reproduces inference) equal block-causal recomputations with the second prompt, and the
    policy gradient equals autograd of the clipped objective + KL on an independently computed energy."""
    trainer = build(tmp_path, window_frames=None, sink_frames=0, pool_frames=None, ppo_epochs=2)
    inputs = generation(trainer)
    entry = inputs["kvpo"][0]
    record, fork, args = entry["record"], entry["fork"], trainer.args
    assert fork in (3, 4) and entry["switch_chunks"] == (3,)
    second = texts(trainer)[1:]
    with torch.no_grad():
        energies = trainer._energy(trainer.student, inputs["prompt_embeds"][:1], entry, rows=slice(None))
        expected = []
        for g in range(record.batch_size):
            total = 0.0
            for b in range(fork, fork + 2):
                lo, hi = b * CHUNK, (b + 1) * CHUNK
                for k in range(record.num_steps):
                    x, sigma = record.noisy[k, g : g + 1, :, lo:hi], record.sigmas[k]
                    v = block_causal_velocity(trainer.student, second, record.context[g : g + 1, :, :lo], x, sigma)
                    recorded = (x.double() - record.pred_original[k, g : g + 1, :, lo:hi].double()) / sigma
                    total += 0.5 * float((v.double() - recorded).square().mean())
            expected.append(total)
    assert torch.allclose(energies, torch.tensor(expected, dtype=energies.dtype), rtol=1e-4, atol=1e-7)
    assert float(energies[-1]) < 1e-8 < float(energies[:-1].min())  # the anchor replays its own inference

    torch.manual_seed(1)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    old = torch.log_softmax(torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64), 0)
    advantages = torch.tensor([-1.0, 0.5, 0.7], dtype=torch.float64)
    entry["old_log_policy"], entry["advantages"], entry["gate_scale"] = old, advantages, 1.0
    got = torch.autograd.grad(trainer.compute_loss(trainer.model, inputs), params)
    log_pi = torch.log_softmax(-independent_energy(trainer.model, record, fork, range(3), second, args.grad_steps), 0)
    ratio = torch.exp((log_pi - old).clamp(-20, 20))
    objective = -torch.minimum(ratio * advantages, ratio.clamp(0.9, 1.2) * advantages).mean()
    kl = (log_pi.exp() * (log_pi - entry["ref_log_policy"])).sum()
    want = torch.autograd.grad(objective + 0.5 * kl, params)
    assert any(float(w.abs().max()) > 0 for w in want)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w.double(), rtol=1e-3, atol=1e-3 * float(w.abs().max()) + 1e-12)


def test_segments_are_scored_against_their_own_prompts(tmp_path):
    """Every reward call gets one segment's frames with that segment's prompt: globally frames [0, 33) with the first
    prompt and [33, 69) with the second (the frames the pipeline's stream yields under each prompt), locally the
    routed stretch's frames with the prompt of its segment; the global score is the frame-weighted mean."""
    calls = []

    def spy(prompts, videos, **columns):
        assert not columns  # `switch_frames` is the trainer's, not a reward column
        calls.append((list(prompts), videos.clone()))
        return [float(v.mean()) for v in videos]

    trainer = build(tmp_path, reward_funcs=[spy])
    inputs = generation(trainer)
    entry = inputs["kvpo"][0]
    fork = entry["fork"]
    (p0, global0), (p1, global1), (p2, local) = calls
    assert p0 == [FIRST] * 4 and p1 == [SECOND] * 4 and p2 == [SECOND] * 4  # the stretch lies after the switch
    key = f"0/{int(inputs['sample_index'][0])}"
    channels, frames, h, w = trainer.latent_shape
    latents = torch.randn((1, channels, frames, h, w), generator=trainer._seeded(f"{key}/initial_noise"))
    stream = trainer.pipeline.stream(prompt_embeds=list(texts(trainer)[:, None]), switch_frames=[AT_CHUNK_3],
                                     num_frames=69, height=32, width=32, latents=latents,
                                     generator=trainer._seeded(f"{key}/rollout"), window_frames=9, sink_frames=1,
                                     output_type="pt")
    chunks = list(stream)
    segments = [torch.cat([c.frames for c in chunks if c.prompt_index == i], dim=1)[0] for i in (0, 1)]
    assert segments[0].shape[0] == 33 and segments[1].shape[0] == 36
    assert torch.allclose(global0[-1], segments[0], atol=1e-4) and torch.allclose(global1[-1], segments[1], atol=1e-4)
    start = sum(c.frames.shape[1] for c in chunks[:fork])
    stop = start + sum(c.frames.shape[1] for c in chunks[fork : fork + 2])
    assert local.shape[1] == stop - start
    assert torch.allclose(local[-1], torch.cat([c.frames for c in chunks], dim=1)[0, start:stop], atol=1e-4)
    means = [v.mean(dim=(1, 2, 3, 4)).double() for v in (global0, global1)]
    assert torch.allclose(entry["global_scores"][:, 0], (33 * means[0] + 36 * means[1]) / 69)
    assert torch.allclose(entry["local_scores"][:, 0], local.mean(dim=(1, 2, 3, 4)).double())


def test_bad_schedules_fail_before_any_rollout(tmp_path):
    from datasets import Dataset

    for kwargs, match in (
        (dict(switch_frames=(AT_CHUNK_3, 45)), "one frame per switch"),
        (dict(switch_frames=(45, AT_CHUNK_3), prompts=(FIRST, SECOND, FIRST)), "strictly increasing"),
        (dict(switch_frames=(0,)), r"must lie in \[1, 68\]"),
        (dict(switch_frames=(69,)), r"must lie in \[1, 68\]"),
        (dict(switch_frames=(AT_CHUNK_3, 34), prompts=(FIRST, SECOND, FIRST)), "same chunk"),
        (dict(switch_frames=(62,)), "inside the last chunk"),
        (dict(fork_end_chunk=2), "leave no fork"),  # the stretch of fork 2 (chunks 2, 3) would switch at chunk 3
        (dict(switch_frames=None), "needs a `switch_frames` column"),
        (dict(prompts=(FIRST, "")), "non-empty"),
        (dict(eval_dataset=Dataset.from_dict({"prompt": [[FIRST, SECOND]]})), "eval_dataset"),
    ):
        with pytest.raises(ValueError, match=match) as error:
            build(tmp_path, **kwargs)
        assert "`switch_frames`" in str(error.value) or "`prompt`" in str(error.value) or "eval_dataset" in str(
            error.value)
    trainer = build(tmp_path)
    with pytest.raises(ValueError, match="`switch_frames`.*needs a prompt schedule"):
        trainer.prompt_schedule(FIRST, [AT_CHUNK_3])


def test_sample_follows_the_first_rows_schedule(tmp_path):
    """Without sample_prompts, the periodic sample of a schedule dataset is the pipeline's stream with that schedule
    (recomputed here from the prompt texts), and its rewards are the segments' frame-weighted scores."""
    import json

    trainer = build(tmp_path)
    path = trainer.write_samples(str(tmp_path / "samples" / "step-0.gif"))
    record = json.loads((tmp_path / "samples" / "step-0.json").read_text())
    assert os.path.isfile(path) and record["prompt"] == [FIRST, SECOND] and record["switch_frames"] == [AT_CHUNK_3]
    args = trainer.args
    video = trainer.pipeline(
        prompt=[FIRST, SECOND], switch_frames=[AT_CHUNK_3], num_frames=args.num_frames, height=32, width=32,
        max_sequence_length=16, generator=torch.Generator().manual_seed(args.seed), window_frames=args.window_frames,
        sink_frames=args.sink_frames, output_type="pt",
    ).frames
    # brightness of each segment weighted by its frames = the mean brightness of the whole video
    assert record["rewards"]["brightness"] == pytest.approx(float(video[0].mean()), abs=1e-5)
