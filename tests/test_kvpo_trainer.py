"""KVPOTrainer: branches share everything but their routing, routed chunks read exactly their plan, the policy
gradient is autograd of an independently written energy → Gibbs policy → clipped objective, bad input fails before any
rollout, a killed run resumes exactly, two processes end with the same weights, saving and the Hub."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from diffusers_raven import CausalVideoPipeline, KVCache, KVPOConfig
from diffusers_raven.testing import hub_server as hub_fixtures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from tiny_kvpo import brightness, build, losses  # noqa: E402

hub_server = hub_fixtures.hub_server
local_hub = hub_fixtures.local_hub

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "tiny_kvpo.py")
CHUNK = 3


def _generation(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def test_two_step_smoke_run(tmp_path):
    trainer = build(str(tmp_path), max_steps=2, save_steps=10)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.train()
    assert len(losses(trainer)) == 2
    assert any(not torch.equal(before[n], p) for n, p in trainer.student.named_parameters())
    logged = trainer.state.log_history[0]
    for key in ("loss", "grad_norm", "reward", "reward_std", "rewards/brightness/mean", "rewards/brightness/std",
                "kl", "timing/rollout", "timing/reward", "timing/policy", "timing/generation", "kvpo/ratio",
                "kvpo/clip_fraction", "kvpo/policy_entropy", "kvpo/anchor_win_rate", "kvpo/skipped_updates",
                "kvpo/energy_mean", "kvpo/energy_std", "kvpo/energy_min", "kvpo/energy_max", "kvpo/anchor_reward",
                "kvpo/local_reward", "kvpo/fork_chunk"):
        assert key in logged, key
    assert logged["kvpo/ratio"] == pytest.approx(1.0)  # on-policy
    assert logged["kl"] == pytest.approx(0.0, abs=1e-12)  # the initial policy at the first step
    assert logged["kvpo/policy_entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6
    assert logged["kvpo/energy_max"] > 0  # the routed velocities differ from the unrouted replay


def test_branches_share_everything_but_the_routing(tmp_path):
    """Anchor and branches are equal up to the fork, start every chunk from the same noise and re-noise with the same
    sampler noise; after the fork the routed branches differ. The anchor is the ordinary (pool-less) rollout."""
    trainer = build(str(tmp_path), max_steps=1)
    inputs = _generation(trainer)
    entry = inputs["kvpo"][0]
    record, fork = entry["record"], entry["fork"]
    rows = record.batch_size
    assert rows == 4
    prefix = fork * CHUNK
    for field in (record.noisy, record.pred_original):
        assert all(torch.equal(field[:, 0, :, :prefix], field[:, r, :, :prefix]) for r in range(1, rows))
    assert all(torch.equal(record.context[0, :, :prefix], record.context[r, :, :prefix]) for r in range(1, rows))
    # the same initial noise for every chunk, and the same re-noising noise ε_k = (x_{k+1} − (1 − σ') x̂0_k) / σ'
    assert all(torch.equal(record.noisy[0, 0], record.noisy[0, r]) for r in range(1, rows))
    sigmas = record.sigmas.double()
    for k in range(record.num_steps - 1):
        eps = (record.noisy[k + 1].double() - (1 - sigmas[k + 1]) * record.pred_original[k].double()) / sigmas[k + 1]
        assert all(torch.allclose(eps[0], eps[r], atol=1e-4) for r in range(1, rows))
    routed = slice(prefix, prefix + 2 * CHUNK)
    assert not any(torch.equal(record.clean[r, :, routed], record.clean[-1, :, routed]) for r in range(rows - 1))
    # the anchor is the plain rollout with the same noise (a cache without a pool)
    key = f"0/{int(inputs['sample_index'][0])}"
    channels, frames, h, w = trainer.latent_shape
    latents = torch.randn((1, channels, frames, h, w), generator=trainer._seeded(f"{key}/initial_noise"))
    plain = trainer.rollout(inputs["prompt_embeds"][:1], trainer._seeded(f"{key}/rollout"), latents=latents,
                            record=True)
    clean = torch.cat([c.clean for c in plain], dim=2)
    assert torch.equal(clean[0, :, : record.clean.shape[2]], record.clean[-1])


def test_routed_chunks_read_exactly_the_plan(tmp_path, monkeypatch):
    """Spy on the cache: every routed chunk (all its steps and its context pass) of branch g sees the sinks, branch
    g's planned frames and the m most recent frames, after the window has rolled; nothing else is routed."""
    calls = []
    original = KVCache.visible_frames

    def spy(self, frame_start, chunk_frames):
        visible = original(self, frame_start, chunk_frames)
        calls.append((frame_start, self.routing, visible))
        return visible

    monkeypatch.setattr(KVCache, "visible_frames", spy)
    trainer = build(str(tmp_path), max_steps=1, fork_start_chunk=4, fork_end_chunk=4)
    entry = _generation(trainer)["kvpo"][0]
    fork, plans = entry["fork"], [tuple(p) for p in entry["plans"].tolist()]
    assert fork == 4 and len(set(plans)) == 3
    steps, sinks, m = trainer.sampler.num_steps, 1, 4
    routed = [(s, r, v) for s, r, v in calls if r is not None]
    # two routed chunks per branch: the 4 steps and the context pass of the first (the second is the last chunk)
    assert sorted(r.selected for _, r, _ in routed) == sorted(
        [p for p in plans for _ in range(steps + 1)] + [p for p in plans for _ in range(steps)]
    )
    for start, routing, visible in routed:
        assert fork * CHUNK <= start < (fork + 2) * CHUNK and routing.recent_frames == m
        expected = [*range(sinks), *routing.selected, *range(start - (m - CHUNK), start)]
        assert visible == expected, (start, routing, visible)
    assert any(f < fork * CHUNK - 5 for p in plans for f in p)  # frames the window alone would no longer show


def _energy(model, record, fork, rows, routed_chunks, grad_steps, window, sinks):
    """½ Σ_chunks Σ_k mean‖v_θ − v‖² written from scratch: chunk b at step k by one block-causal pass over the row's
    context chunks before b (timestep 0) and its recorded x_{σ_k} (timestep 1000 σ_k)."""
    energies = []
    for g in rows:
        total = 0.0
        for b in range(fork, fork + routed_chunks):
            lo, hi = b * CHUNK, (b + 1) * CHUNK
            for k in range(record.num_steps):
                sigma = float(record.sigmas[k])
                x = record.noisy[k, g : g + 1, :, lo:hi]
                seq = torch.cat([record.context[g : g + 1, :, :lo], x], dim=2)
                t = torch.cat([torch.zeros(lo), torch.full((CHUNK,), 1000 * sigma)])[None]
                with torch.set_grad_enabled(k < grad_steps):
                    v = model(seq, t, TEXT, attention="block_causal", window_frames=window,
                              sink_frames=sinks).sample[:, :, lo:]
                recorded = (x.double() - record.pred_original[k, g : g + 1, :, lo:hi].double()) / sigma
                total = total + 0.5 * (v.double() - recorded).square().mean()
        energies.append(total)
    return torch.stack(energies)


TEXT = None


def test_policy_gradient_is_autograd_of_an_independent_objective(tmp_path):
    """After a perturbation of the weights (so that π_θ ≠ π_ref), with an old policy far from π_θ (so that some
    ratios are clipped), the trainer's gradient equals autograd of −mean(min(ρÂ, clip(ρ, 0.9, 1.2)Â)) + β KL(π_θ ‖
    π_ref) on an energy recomputed here without the interleaved packing."""
    global TEXT
    trainer = build(str(tmp_path), max_steps=1, ppo_epochs=2, beta=0.5)
    inputs = _generation(trainer)
    entry = inputs["kvpo"][0]
    TEXT = inputs["prompt_embeds"][:1]
    record, fork, args = entry["record"], entry["fork"], trainer.args
    energy = _energy(trainer.student, record, fork, range(3), 2, args.grad_steps, 9, 1).detach()
    assert torch.allclose(torch.log_softmax(-energy, 0), entry["old_log_policy"], atol=1e-6)
    ref_energy = _energy(trainer.ref_model, record, fork, range(3), 2, args.grad_steps, 9, 1).detach()
    assert torch.allclose(torch.log_softmax(-ref_energy, 0), entry["ref_log_policy"], atol=1e-6)

    torch.manual_seed(1)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    old = torch.log_softmax(torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64), 0)
    advantages = torch.tensor([-1.0, 0.5, 0.7], dtype=torch.float64)
    entry["old_log_policy"], entry["advantages"], entry["gate_scale"] = old, advantages, 1.0
    got = torch.autograd.grad(trainer.compute_loss(trainer.model, inputs), params)

    log_pi = torch.log_softmax(-_energy(trainer.model, record, fork, range(3), 2, args.grad_steps, 9, 1), 0)
    ratio = torch.exp((log_pi - old).clamp(-20, 20))
    assert bool(((ratio < 0.9) | (ratio > 1.2)).any())  # the clip is exercised
    objective = -torch.minimum(ratio * advantages, ratio.clamp(0.9, 1.2) * advantages).mean()
    kl = (log_pi.exp() * (log_pi - entry["ref_log_policy"])).sum()
    expected = torch.autograd.grad(objective + 0.5 * kl, params)
    assert any(float(e.abs().max()) > 0 for e in expected)
    for g, e in zip(got, expected):
        assert torch.allclose(g.double(), e.double(), rtol=1e-3, atol=1e-3 * float(e.abs().max()) + 1e-12)


def test_bad_input_fails_before_any_rollout(tmp_path):
    out = str(tmp_path)
    for kwargs, match in (
        (dict(num_branches=1), "num_branches"),
        (dict(window_frames=9, sink_frames=1, recent_frames=9), "recent_frames"),
        (dict(pool_frames=20), "pool_frames"),
        (dict(window_frames=9, pool_frames=9, selected_frames=2), "pool_frames"),
        (dict(fusion="mean"), "fusion"),
        (dict(gate="always"), "gate"),
        (dict(energy_space="pixels"), "energy_space"),
        (dict(grad_steps=3, denoising_sigmas=[1.0, 0.5]), "grad_steps"),
        (dict(fork_start_chunk=3, fork_end_chunk=2), "fork_end_chunk"),
    ):
        with pytest.raises(ValueError, match=match):
            KVPOConfig(output_dir=out, **kwargs)
    for kwargs, match in (
        (dict(routed_chunks=5), "routed_chunks"),  # 6 chunks, forks from chunk 2
        (dict(num_branches=5), "num_branches"),  # 4 routable frames at chunk 2
        (dict(selected_frames=5, pool_frames=13), "selected_frames"),
        (dict(grad_steps=5), "grad_steps"),  # a 4-step sampler
        (dict(recent_frames=2), "recent_frames"),  # below the chunk size
        (dict(local_reward_weights=[1.0]), "local_reward_weights"),
        (dict(fork_end_chunk=5), "fork_end_chunk"),
    ):
        with pytest.raises(ValueError, match=match):
            build(out, **kwargs)
    with pytest.raises(ValueError, match="reward_funcs"):
        build(out, reward_funcs=[])
    # the default first fork is the first chunk whose cache holds enough routable frames for the branches
    assert build(out, fork_start_chunk=None).fork_start_chunk == 2  # 4 routable frames from chunk 2 for 3 branches
    assert build(out, fork_start_chunk=None, num_branches=5).fork_start_chunk == 3
    documented = build(out, fork_start_chunk=None, num_frames=93, window_frames=12, sink_frames=3, pool_frames=None,
                       num_branches=8, routed_chunks=3, selected_frames=3)  # the docs/training.md example
    assert (documented.fork_start_chunk, documented.fork_end_chunk, documented.args.pool_frames) == (4, 5, 35)

    def nothing(prompts, videos, **columns):
        return [None] * len(prompts)

    with pytest.raises(ValueError, match="None"):
        build(str(tmp_path / "none"), max_steps=1, reward_funcs=[nothing]).train()


def test_lora_scale_gate_and_old_policy_sync(tmp_path):
    """LoRA (the reference is the adapter-disabled model), the `scale` gate and an old policy synced every 2
    generation batches."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = build(str(tmp_path), max_steps=2, save_steps=10, peft_config=lora, gate="scale",
                    old_policy_sync_every=2, learning_rate=1e-2)
    assert trainer.ref_model is None
    initial = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    trainer.train()
    history = [h for h in trainer.state.log_history if "kvpo/ratio" in h]
    assert "kvpo/anchor_probability" in history[0] and "kvpo/energy_anchor" in history[0]
    assert history[0]["kvpo/ratio"] == pytest.approx(1.0, abs=1e-6) and history[0]["kl"] == pytest.approx(0, abs=1e-12)
    assert 0 < history[0]["kvpo/gate_scale"] <= 1
    # synced at generation batch 0 only: the old policy of the second step is the initial adapter, not the trained one
    old = trainer._old_policy.tensors
    assert set(old) == set(initial) and all(torch.equal(old[n], initial[n]) for n in initial)
    assert any(not torch.equal(old[n], p) for n, p in trainer.student.named_parameters() if p.requires_grad)


def test_killed_run_resumes_exactly(tmp_path):
    """Two PPO epochs per generation batch: SIGKILL after checkpoint 3 (mid-way through a generation batch), then
    resume: the same losses and weights as a run that was never interrupted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    common = ["--max-steps", "4", "--ppo-epochs", "2"]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, SCRIPT, "--output-dir", str(straight), *common], check=True, env=env, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--output-dir", str(killed), *common], env=env)
    marker = killed / "checkpoint-3" / "trainer_state.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run ended before writing checkpoint-3"
    assert (killed / "checkpoint-3" / "raven_state" / "generation_buffer.pt").exists()
    subprocess.run([sys.executable, SCRIPT, "--output-dir", str(killed), *common, "--resume",
                    str(killed / "checkpoint-3")], check=True, env=env, timeout=600)
    a = json.load(open(straight / "losses.json"))["losses"]
    b = json.load(open(killed / "losses.json"))["losses"]
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-5, abs=1e-7)
    wa = torch.tensor(json.load(open(straight / "rank0.json"))["weights"])
    wb = torch.tensor(json.load(open(killed / "rank0.json"))["weights"])
    assert torch.allclose(wa, wb, atol=1e-6)


def test_two_processes_end_with_identical_weights(tmp_path):
    """torchrun with 2 CPU processes (gloo), one prompt each (its branches and anchor on that process): both ranks
    end with identical weights, which moved."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), SCRIPT, "--output-dir", str(out), "--max-steps", "2"]
    subprocess.run(cmd, check=True, env=env, timeout=900, cwd=tmp_path)
    a, b = (json.load(open(out / f"rank{r}.json")) for r in (0, 1))
    assert a["world_size"] == b["world_size"] == 2
    assert torch.equal(torch.tensor(a["weights"]), torch.tensor(b["weights"]))
    start = build(str(tmp_path / "start"), max_steps=1)
    initial = torch.cat([p.detach().flatten() for p in start.student.parameters()])
    assert not torch.equal(initial, torch.tensor(a["weights"]))


def test_save_model_card_and_hub(tmp_path, local_hub):
    from huggingface_hub import HfApi

    trainer = build(str(tmp_path), max_steps=2, save_steps=10, reward_funcs=[brightness],
                    hub_model_id="tester/tiny-kvpo", hub_token="x")
    trainer.train()
    folder = trainer.save_pipeline(str(tmp_path / "final"))
    card = open(os.path.join(folder, "README.md")).read()
    assert "KVPO" in card and "2605.14278" in card and "reward_curve.png" in card
    pipe = CausalVideoPipeline.from_pretrained(folder)
    x, t, text = torch.randn(1, 4, 6, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(x, t, text).sample, trainer.student(x, t, text).sample, atol=1e-5)
    trainer.push_to_hub()
    files = {f.path for f in HfApi().list_repo_tree("tester/tiny-kvpo", recursive=True)}
    assert {"model_index.json", "README.md", "transformer/config.json"} <= files
