"""RavenTrainer: every history mode runs, bad configurations fail early, a killed run resumes exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from diffusers_raven import CausalVideoPipeline, RavenConfig
from diffusers_raven.testing import hub_server as hub_fixtures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from tiny_raven import build, losses  # noqa: E402

hub_server = hub_fixtures.hub_server
local_hub = hub_fixtures.local_hub

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "tiny_raven.py")


@pytest.mark.parametrize("history", ["raven", "self_forcing", "diffusion_forcing", "teacher_forcing"])
def test_two_step_smoke_run(tmp_path, history):
    trainer = build(str(tmp_path), history, max_steps=2, save_steps=10)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    trainer.train()
    values = losses(trainer)
    assert len(values) == 2 and all(torch.isfinite(torch.tensor(values)))
    assert any(not torch.equal(before[n], p) for n, p in trainer.student.named_parameters())
    assert any(not torch.equal(critic_before[n], p) for n, p in trainer.critic.named_parameters())
    logged = trainer.state.log_history[0]
    for key in ("loss", "dmd/loss", "critic/loss", "grad_norm", "critic/grad_norm", "chunk_weight/first", "chunk_weight/last"):
        assert key in logged, key
    if history == "raven":
        assert logged["chunk_weight/last"] > logged["chunk_weight/first"]  # α = −1 by default


def test_save_pipeline_and_model_card(tmp_path):
    trainer = build(str(tmp_path), "raven", max_steps=1, save_steps=10)
    trainer.train()
    folder = trainer.save_pipeline(str(tmp_path / "final"))
    card = open(os.path.join(folder, "README.md")).read()
    assert "RAVEN" in card and "raven" in card and "2605.15190" in card
    pipe = CausalVideoPipeline.from_pretrained(folder)
    saved = list(pipe.transformer.parameters())
    assert len(saved) == len(trainer.ema.shadow_params)
    for param, shadow in zip(saved, trainer.ema.shadow_params):
        assert torch.allclose(param, shadow)  # the saved weights are the EMA
    frames = pipe("a red circle", num_frames=9, height=32, width=32, max_sequence_length=16).frames
    assert frames.shape == (1, 9, 32, 32, 3)


def test_killed_run_resumes_with_the_same_losses(tmp_path):
    """Train 4 steps straight; train again, SIGKILL after checkpoint 2, resume: losses and weights agree."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, SCRIPT, "--output-dir", str(straight)], check=True, env=env, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--output-dir", str(killed)], env=env)
    marker = killed / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let the checkpoint's last files land
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run ended before writing checkpoint-2"
    subprocess.run([sys.executable, SCRIPT, "--output-dir", str(killed), "--resume", str(killed / "checkpoint-2")],
                   check=True, env=env, timeout=600)
    a = json.load(open(straight / "losses.json"))["losses"]
    b = json.load(open(killed / "losses.json"))["losses"]
    # the resumed trainer's history holds steps 1-2 from the checkpoint and steps 3-4 it computed after the kill
    assert len(a) == 4 and len(b) == 4
    assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    from safetensors.torch import load_file

    wa = load_file(straight / "checkpoint-4" / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(killed / "checkpoint-4" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.parametrize("overrides,match", [
    (dict(history="forcing"), "history"),
    (dict(num_frames=10), "num_frames"),
    (dict(dmd_min_sigma=0.9, dmd_max_sigma=0.1), "dmd_min_sigma"),
    (dict(critic_updates_per_generator_update=0), "critic_updates"),
    (dict(steps_per_generation=0), "steps_per_generation"),
    (dict(sink_frames=3), "sink_frames"),
])
def test_bad_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        RavenConfig(output_dir=str(tmp_path), **overrides)


def test_bad_trainer_inputs(tmp_path):
    from datasets import Dataset
    from diffusers import WanTransformer3DModel

    from diffusers_raven import RavenTrainer
    from diffusers_raven.utils.tiny import tiny_transformer_config
    from test_pipeline import make_pipeline

    pipe = make_pipeline()
    ds = Dataset.from_dict({"prompt": ["a red circle"]})
    args = RavenConfig(output_dir=str(tmp_path), num_frames=21, height=32, width=32, use_cpu=True)
    with pytest.raises(ValueError, match="teacher"):
        RavenTrainer(model=pipe, args=args, train_dataset=ds)
    wrong = WanTransformer3DModel(**{**tiny_transformer_config(), "in_channels": 8, "out_channels": 8})
    with pytest.raises(ValueError, match="in_channels"):
        RavenTrainer(model=pipe, teacher=wrong, args=args, train_dataset=ds)
    teacher = WanTransformer3DModel(**tiny_transformer_config())
    with pytest.raises(ValueError, match="chunks"):
        RavenTrainer(model=pipe, teacher=teacher, train_dataset=ds,
                     args=RavenConfig(output_dir=str(tmp_path), num_frames=13, height=32, width=32, use_cpu=True))
    with pytest.raises(ValueError, match="latents"):
        RavenTrainer(model=pipe, teacher=teacher, train_dataset=ds,
                     args=RavenConfig(output_dir=str(tmp_path), history="teacher_forcing", num_frames=21, height=32,
                                      width=32, use_cpu=True))
    with pytest.raises(ValueError, match="prompt"):
        RavenTrainer(model=pipe, teacher=teacher, args=args, train_dataset=Dataset.from_dict({"text": ["x"]}))


def test_two_process_run_ends_with_identical_weights(tmp_path):
    """torchrun with 2 CPU processes (gloo): same weights on both ranks, same Self Forcing exit steps, and the
    weights of a single process with the global batch."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port on loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), SCRIPT,
           "--output-dir", str(out), "--history", "self_forcing", "--max-steps", "2"]
    subprocess.run(cmd, check=True, env=env, timeout=900, cwd=tmp_path)
    a, b = (json.load(open(out / f"rank{r}.json")) for r in (0, 1))
    assert a["world_size"] == b["world_size"] == 2
    assert a["exit_steps"] == b["exit_steps"] and len(a["exit_steps"]) == 2
    assert torch.equal(torch.tensor(a["weights"]), torch.tensor(b["weights"]))
    # and they are the weights of one process training on the same two prompts per step (draws are per sample)
    single = build(str(tmp_path / "single"), "self_forcing", max_steps=2, save_steps=10, per_device_train_batch_size=2)
    single.train()
    assert single.exit_steps == a["exit_steps"]
    weights = torch.cat([p.detach().flatten() for p in single.student.parameters()])
    assert torch.allclose(weights, torch.tensor(a["weights"]), atol=2e-5, rtol=1e-4)


def test_lora_training_exports_a_fused_pipeline(tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = build(str(tmp_path), "raven", max_steps=1, save_steps=10, ema_decay=None)
    trainer = type(trainer)(model=trainer.pipeline, teacher=trainer.teacher, args=trainer.args,
                            train_dataset=trainer.train_dataset, peft_config=config)
    trainable = [n for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    trainer.train()
    folder = trainer.save_pipeline(str(tmp_path / "final"))
    assert os.path.exists(os.path.join(folder, "transformer_lora", "pytorch_lora_weights.safetensors"))
    loaded = CausalVideoPipeline.from_pretrained(folder).transformer
    x, t, text = torch.randn(1, 4, 6, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert (loaded(x, t, text).sample - trainer.student(x, t, text).sample).abs().max() <= 1e-5


def test_gradient_checkpointing_and_bf16_switches(tmp_path):
    trainer = build(str(tmp_path), "raven", max_steps=1, save_steps=10, gradient_checkpointing=True, bf16=True)
    trainer.train()
    assert trainer.student.gradient_checkpointing
    assert trainer.critic.gradient_checkpointing  # the critic's update checkpoints its blocks too
    assert torch.isfinite(torch.tensor(losses(trainer))).all()


def test_samples_and_push_to_hub(tmp_path, local_hub):
    from huggingface_hub import HfApi

    trainer = build(str(tmp_path), "raven", max_steps=2, save_steps=10, sample_every_steps=2,
                    hub_model_id="tester/tiny-raven", hub_token="x")
    trainer.train()
    assert os.path.exists(tmp_path / "samples" / "step-2.gif")
    trainer.push_to_hub()
    files = {f.path for f in HfApi().list_repo_tree("tester/tiny-raven", recursive=True)}
    assert {"model_index.json", "README.md", "transformer/config.json"} <= files
    pipe = CausalVideoPipeline.from_pretrained("tester/tiny-raven", cache_dir=str(tmp_path / "cache"))
    assert pipe("a red circle", num_frames=9, height=32, width=32, max_sequence_length=16).frames.shape[1] == 9


@pytest.mark.parametrize("history", ["raven", "self_forcing"])
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, history):
    """Two micro-batches of one prompt, accumulated, make the update of one batch of two: the same rollouts (drawn per
    sample), critic updates and mean loss, so the same student and critic weights after two optimizer steps."""
    accumulated = build(str(tmp_path / "ga"), history, max_steps=2, save_steps=10, gradient_accumulation_steps=2)
    batched = build(str(tmp_path / "batch"), history, max_steps=2, save_steps=10, per_device_train_batch_size=2)
    start = [p.detach().clone() for p in batched.student.parameters()]
    accumulated.train()
    batched.train()
    assert accumulated.state.global_step == batched.state.global_step == 2
    assert any(not torch.equal(p, q) for p, q in zip(batched.student.parameters(), start))
    for a, b in ((accumulated.student, batched.student), (accumulated.critic, batched.critic)):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("context_noise", [0.0, 250.0])
def test_training_rollouts_are_the_stream(tmp_path, context_noise):
    """The trainer's rollouts (RAVEN's recorded rollout, Self Forcing's sample with gradients at its exit step) are the
    pipeline's stream with the same noise, context noise included; teacher forcing writes the data to the cache with
    the same context rule, so its prediction of a chunk is the interleaved pass over the noised data."""
    from diffusers_raven.training import RolloutRecord, pack_interleaved

    trainer = build(str(tmp_path), "raven", num_frames=33, context_noise=context_noise)
    text = trainer.encode_prompts(["a red circle"])
    stream = trainer.pipeline(prompt_embeds=text, num_frames=33, height=32, width=32, output_type="latent",
                              generator=torch.Generator().manual_seed(4), context_noise=context_noise,
                              return_trajectory=True).trajectory
    with torch.no_grad():
        recorded = trainer.rollout(text, [torch.Generator().manual_seed(4)], record=True)
    for a, b in zip(recorded, stream):
        assert torch.equal(a.clean, b.clean) and torch.equal(a.noisy, b.noisy)
        assert (a.context is None and b.context is None) or torch.equal(a.context, b.context)
    last = trainer.sampler.num_steps - 1
    sampled = trainer.rollout(text, [torch.Generator().manual_seed(4)], model=trainer.model, exit_step=last, grad=True)
    assert all(c.clean.requires_grad for c in sampled)
    assert all((a.clean - b.clean).abs().max() <= 1e-6 for a, b in zip(sampled, stream))

    # teacher forcing: the data noised at step k, each chunk through a cache of the data (context rule applied)
    g = torch.Generator().manual_seed(5)
    data = torch.randn(1, 4, 9, 4, 4, generator=g)
    k, sigma = 2, trainer.sampler.sigmas[2]
    noisy = (1 - sigma) * data + sigma * torch.randn(data.shape, generator=g)
    with torch.no_grad():
        forced = trainer.rollout(text, [torch.Generator().manual_seed(6)], latents=noisy, history=data, start_step=k,
                                 exit_step=k)
        # the context rule by hand: no step noise (one deterministic step per chunk), then ε per written chunk
        g, s_ctx = torch.Generator().manual_seed(6), context_noise / 1000
        expected = [(1 - s_ctx) * data[:, :, 3 * j : 3 * j + 3]
                    + s_ctx * (torch.randn(1, 4, 3, 4, 4, generator=g) if context_noise else 0) for j in range(2)]
        assert all((c.context - e).abs().max() <= 1e-6 for c, e in zip(forced, expected)) and forced[2].context is None
        steps = noisy[None].expand(4, -1, -1, -1, -1, -1)
        record = RolloutRecord(sigmas=torch.tensor(trainer.sampler.sigmas), noisy=steps, pred_original=steps,
                               clean=data, chunk_sizes=[3, 3, 3], context=torch.cat(expected, dim=2))
        packed = pack_interleaved(record, torch.tensor([k]), context_noise)
        v = trainer.student(encoder_hidden_states=text, **packed).sample
    assert (torch.cat([c.clean for c in forced], dim=2) - (noisy - sigma * v)).abs().max() <= 1e-5


def test_one_chunk_video_trains_in_every_history_mode(tmp_path):
    """num_frames=9 is a single chunk: RAVEN's interleaved pass has an empty history (it used to crash)."""
    for history in ("raven", "self_forcing"):
        trainer = build(str(tmp_path / history), history, max_steps=1, save_steps=10, num_frames=9)
        trainer.train()
        assert len(losses(trainer)) == 1 and torch.isfinite(torch.tensor(losses(trainer))).all()


def test_evaluate_scores_the_models_own_videos(tmp_path):
    """evaluate() generates the eval prompts' videos (video i with seed + i) and reports TRL-named reward metrics; the
    figures equal the reward functions applied to the pipeline's own videos made separately."""
    from datasets import Dataset

    def brightness(prompts, videos, **columns):
        return [float(v.mean()) for v in videos]

    def redness(prompts, videos, **columns):
        return [float(v[:, 0].mean()) if "red" in p else None for p, v in zip(prompts, videos)]

    eval_prompts = ["a red circle", "a blue square", "a red square"]
    trainer = build(str(tmp_path), "raven", max_steps=1, save_steps=10, per_device_eval_batch_size=2)
    trainer.args.reward_weights = [1.0, 2.0]
    trainer = type(trainer)(model=trainer.pipeline, teacher=trainer.teacher, args=trainer.args,
                            train_dataset=trainer.train_dataset, eval_dataset=Dataset.from_dict({"prompt": eval_prompts}),
                            reward_funcs=[brightness, redness])
    metrics = trainer.evaluate()
    videos = [trainer.pipeline(p, num_frames=21, height=32, width=32, max_sequence_length=16, output_type="pt",
                               generator=torch.Generator().manual_seed(i)).frames[0] for i, p in enumerate(eval_prompts)]
    bright = torch.tensor([float(v.mean()) for v in videos], dtype=torch.float64)
    red = torch.tensor([float(v[:, 0].mean()) for v, p in zip(videos, eval_prompts) if "red" in p], dtype=torch.float64)
    assert metrics["eval_rewards/brightness/mean"] == pytest.approx(float(bright.mean()), abs=1e-5)
    assert metrics["eval_rewards/brightness/std"] == pytest.approx(float(bright.std(unbiased=False)), abs=1e-5)
    assert metrics["eval_rewards/redness/mean"] == pytest.approx(float(red.mean()), abs=1e-5)
    total = bright + 2 * torch.tensor([float(videos[0][:, 0].mean()), 0.0, float(videos[2][:, 0].mean())],
                                      dtype=torch.float64)
    assert metrics["eval_reward"] == pytest.approx(float(total.mean()), abs=1e-5)
    assert any("eval_reward" in h for h in trainer.state.log_history)
    with pytest.raises(ValueError, match="reward_weights"):
        type(trainer)(model=trainer.pipeline, teacher=trainer.teacher, args=trainer.args,
                      train_dataset=trainer.train_dataset, reward_funcs=[brightness])
    trainer.args.reward_weights = None
    with pytest.raises(ValueError, match="reward_funcs"):
        type(trainer)(model=trainer.pipeline, teacher=trainer.teacher, args=trainer.args,
                      train_dataset=trainer.train_dataset, eval_dataset=Dataset.from_dict({"prompt": eval_prompts}))

    def broken(prompts, videos, **columns):
        return [float("nan")] * len(prompts)

    bad = type(trainer)(model=trainer.pipeline, teacher=trainer.teacher, args=build(str(tmp_path / "b"), "raven").args,
                        train_dataset=trainer.train_dataset, eval_dataset=Dataset.from_dict({"prompt": eval_prompts}),
                        reward_funcs=[broken])
    with pytest.raises(ValueError, match="broken"):
        bad.evaluate()
