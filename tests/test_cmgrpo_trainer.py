"""CMGRPOTrainer: both samplers run, the policy gradient is the Gaussian kernel's score, bad input fails before any
rollout, a killed run resumes exactly, two processes agree with one, reporting, saving and the Hub."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from diffusers_raven import CausalVideoPipeline, CMGRPOConfig
from diffusers_raven.testing import hub_server as hub_fixtures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from tiny_cmgrpo import brightness, build, losses, redness  # noqa: E402

hub_server = hub_fixtures.hub_server
local_hub = hub_fixtures.local_hub

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "tiny_cmgrpo.py")


@pytest.mark.parametrize("sampler", ["consistency", "sde"])
def test_two_step_smoke_run(tmp_path, sampler):
    trainer = build(str(tmp_path), max_steps=2, save_steps=10, sampler=sampler, reward_funcs=[brightness, redness],
                    num_generations=4, per_device_train_batch_size=4)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.train()
    assert len(losses(trainer)) == 2
    assert any(not torch.equal(before[n], p) for n, p in trainer.student.named_parameters())
    logged = trainer.state.log_history[0]
    for key in ("loss", "grad_norm", "reward", "reward_std", "rewards/brightness/mean", "rewards/brightness/std",
                "rewards/redness/mean", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "timing/rollout", "timing/reward", "timing/policy", "policy/step"):
        assert key in logged, key
    assert logged["policy/ratio"] == pytest.approx(1.0)  # on-policy
    # `reward` reads on the rewards' scale (TRL): the mean weighted sum of the raw scores, whatever the aggregation
    assert logged["reward"] == pytest.approx(logged["rewards/brightness/mean"] + logged["rewards/redness/mean"],
                                             rel=1e-5)


def _generation(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def _param_grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True)


@pytest.mark.parametrize("sampler", ["consistency", "sde"])
def test_policy_gradient_is_the_kernel_score(tmp_path, sampler):
    """On-policy, the loss's gradient is −A ∇ log π_θ(x_{σ_{k+1}} | x_{σ_k}) (chunk-weighted mean over elements, ×
    policy_loss_scaling, averaged over the batch), with π_θ written here with torch.distributions.Normal: the
    consistency kernel N((1 − σ')x̂0_θ, σ'²), or the Flow-GRPO SDE kernel of METHOD §1 from its formula."""
    trainer = build(str(tmp_path), max_steps=1, sampler=sampler, reward_funcs=[brightness], num_generations=4,
                    per_device_train_batch_size=4, chunk_loss_alpha=-1.0)
    inputs = _generation(trainer)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    got = _param_grads(trainer.compute_loss(trainer.model, inputs), params)

    record, steps, adv = inputs["record"], inputs["policy_steps"][:, 0], inputs["advantages"]
    pred = trainer._predict(trainer.model, inputs["prompt_embeds"], record, inputs["policy_steps"])[:, 0]
    rows = torch.arange(len(steps))
    x, x_next = record.noisy[steps, rows].double(), record.noisy[steps + 1, rows].double()
    s = record.sigmas[steps].double().view(-1, 1, 1, 1, 1)
    s_next = record.sigmas[steps + 1].double().view(-1, 1, 1, 1, 1)
    if sampler == "consistency":
        mean, std = (1 - s_next) * pred.double(), s_next
    else:  # Flow-GRPO: s = a·sqrt(σ/(1−σ)) (σ = 1 guarded by σ'), μ = x + s²/(2σ)·dt·x + v·(1 + s²(1−σ)/(2σ))·dt
        a, dt = 0.7, s_next - s
        noise = a * torch.sqrt(s / torch.where(s >= 1, 1 - s_next, 1 - s))
        v = (x - pred.double()) / s
        mean = x + noise**2 / (2 * s) * dt * x + v * (1 + noise**2 * (1 - s) / (2 * s)) * dt
        std = noise * torch.sqrt(-dt)
    weights = trainer.weights.double().view(1, 1, -1, 1, 1)
    log_prob = (torch.distributions.Normal(mean, std).log_prob(x_next) * weights).flatten(1).mean(1)
    reference = -(adv.double() * log_prob).mean() * trainer.args.policy_loss_scaling
    expected = _param_grads(reference, params)
    for g, e in zip(got, expected):
        assert torch.allclose(g.double(), e.double(), rtol=1e-3, atol=1e-6 * float(e.abs().max()) + 1e-9)
    # and for the consistency kernel, the surrogate of METHOD §6 gives the same gradient
    if sampler == "consistency":
        from diffusers_raven.training import cm_grpo_loss

        surrogate, _ = cm_grpo_loss(pred, record.noisy[steps + 1, rows], record.sigmas[steps + 1], adv,
                                    trainer.weights, trainer.args.policy_loss_scaling)
        for g, e in zip(got, _param_grads(surrogate, params)):
            assert torch.allclose(g.double(), e.double(), rtol=1e-3, atol=1e-6 * float(e.abs().max()) + 1e-9)


def test_advantages_use_every_member_of_a_group(tmp_path):
    """The advantages are the group-normalised rewards of the whole generation batch (recomputed here by hand)."""
    scores = {}

    def recorded(prompts, videos, **columns):
        values = [float(v.mean()) for v in videos]
        scores.setdefault("values", []).extend(values)
        return values

    recorded.__name__ = "brightness"
    trainer = build(str(tmp_path), max_steps=1, reward_funcs=[recorded], num_generations=4,
                    per_device_train_batch_size=8, adv_clip=None)
    inputs = _generation(trainer)
    r = torch.tensor(scores["values"], dtype=torch.float64).view(2, 4)
    # normalize_then_sum z-scores the one reward in its group; the advantage divides by that z's std (1) + 1e-5
    z = (r - r.mean(1, keepdim=True)) / r.std(1, unbiased=False, keepdim=True)
    expected = z / (1 + 1e-5)
    assert torch.allclose(inputs["advantages"].double(), expected.flatten(), atol=1e-4)
    assert inputs["prompt"][:4] == [inputs["prompt"][0]] * 4 and inputs["prompt"][4] != inputs["prompt"][0]


def test_bad_input_fails_before_any_rollout(tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        CMGRPOConfig(output_dir=str(tmp_path), num_generations=1)
    with pytest.raises(ValueError, match="sampler"):
        CMGRPOConfig(output_dir=str(tmp_path), sampler="ode")
    with pytest.raises(ValueError, match="scale_rewards"):
        CMGRPOConfig(output_dir=str(tmp_path), scale_rewards="prompt")
    with pytest.raises(ValueError, match="policy_steps"):
        CMGRPOConfig(output_dir=str(tmp_path), policy_steps=1.5)
    with pytest.raises(ValueError, match="num_generations"):  # 3 rows per generation batch, groups of 2
        build(str(tmp_path), per_device_train_batch_size=3, num_generations=2)
    with pytest.raises(ValueError, match="reward_weights"):
        build(str(tmp_path), reward_weights=[1.0])
    with pytest.raises(ValueError, match="reward_funcs"):
        build(str(tmp_path), reward_funcs=[])
    with pytest.raises(ValueError, match="policy_steps"):
        build(str(tmp_path), policy_steps=4)  # the 4-step schedule has 3 non-final steps

    def too_few(prompts, videos, **columns):
        return [0.0]

    def not_a_number(prompts, videos, **columns):
        return [float("nan")] * len(prompts)

    def nothing(prompts, videos, **columns):
        return [None] * len(prompts)

    for fn, match in ((too_few, "too_few"), (not_a_number, "not_a_number"), (nothing, "None")):
        trainer = build(str(tmp_path / fn.__name__), max_steps=1, reward_funcs=[fn])
        with pytest.raises(ValueError, match=match):
            trainer.train()


def test_kl_to_the_reference_policy(tmp_path):
    """β > 0: the reference is a frozen copy of the start (or the adapter-disabled model under LoRA); at the first
    step the policy is the reference (KL 0), after an update it is not."""
    from peft import LoraConfig

    trainer = build(str(tmp_path / "full"), max_steps=3, save_steps=10, beta=0.1, reward_funcs=[brightness])
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls[0] == pytest.approx(0.0, abs=1e-10) and kls[-1] > 0
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = build(str(tmp_path / "lora"), max_steps=3, save_steps=10, beta=0.1, reward_funcs=[brightness],
                    peft_config=lora)
    assert trainer.ref_model is None
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls[0] == pytest.approx(0.0, abs=1e-10) and kls[-1] > 0


def test_killed_run_resumes_exactly(tmp_path):
    """Two passes per generation batch (num_iterations=2): SIGKILL after checkpoint 3, mid-way through a generation
    batch, then resume: the same losses and weights as a run that was never interrupted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    common = ["--max-steps", "4", "--num-iterations", "2"]
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


def test_two_processes_share_groups_and_end_with_one_process_weights(tmp_path):
    """torchrun with 2 CPU processes and one row each: every group of 2 rollouts is split across the processes, the
    rewards are gathered before the advantages; both ranks end with the weights of one process with both rows."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), SCRIPT, "--output-dir", str(out), "--max-steps", "2", "--per-device-batch", "1"]
    subprocess.run(cmd, check=True, env=env, timeout=900, cwd=tmp_path)
    a, b = (json.load(open(out / f"rank{r}.json")) for r in (0, 1))
    assert a["world_size"] == b["world_size"] == 2
    assert torch.equal(torch.tensor(a["weights"]), torch.tensor(b["weights"]))
    single = build(str(tmp_path / "single"), max_steps=2, save_steps=10, per_device_train_batch_size=2)
    single.train()
    weights = torch.cat([p.detach().flatten() for p in single.student.parameters()])
    assert torch.allclose(weights, torch.tensor(a["weights"]), atol=2e-5, rtol=1e-4)


def test_reports_to_tensorboard_offline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = build(str(tmp_path), max_steps=2, save_steps=10, report_to=["tensorboard"], reward_funcs=[brightness])
    trainer.train()
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "runs") for f in fs if "tfevents" in f]
    assert files
    events = EventAccumulator(os.path.dirname(files[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reward", "train/rewards/brightness/mean", "train/frac_reward_zero_std", "train/loss"} <= tags


def test_reports_to_trackio_offline(tmp_path):
    """report_to="trackio" logs to a local trackio database (no Space, no network): in a fresh process, since trackio
    reads its folder (TRACKIO_DIR) when it is imported."""
    import sqlite3

    code = (
        "import sys; sys.path[:0] = [{scripts!r}, {tests!r}]\n"
        "from tiny_cmgrpo import brightness, build\n"
        "build({out!r}, max_steps=2, save_steps=10, report_to=['trackio'], reward_funcs=[brightness],"
        " project='cmgrpo-test', run_name='tiny').train()\n"
    ).format(scripts=os.path.dirname(SCRIPT), tests=os.path.dirname(__file__), out=str(tmp_path / "run"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRACKIO_DIR": str(tmp_path / "trackio")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)
    databases = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "trackio") for f in fs if f.endswith(".db")]
    assert databases, "trackio wrote no local database"
    text = ""
    for database in databases:
        with sqlite3.connect(database) as db:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                text += " ".join(str(row) for row in db.execute(f"SELECT * FROM {table}"))
    assert "rewards/brightness/mean" in text and "frac_reward_zero_std" in text


def test_save_model_samples_card_and_hub(tmp_path, local_hub):
    from huggingface_hub import HfApi

    trainer = build(str(tmp_path), max_steps=2, save_steps=10, sample_every_steps=2, reward_funcs=[brightness],
                    hub_model_id="tester/tiny-cmgrpo", hub_token="x")
    trainer.train()
    sample = json.load(open(tmp_path / "samples" / "step-2.json"))
    assert set(sample["rewards"]) == {"brightness"} and 0 <= sample["rewards"]["brightness"] <= 1
    folder = trainer.save_pipeline(str(tmp_path / "final"))
    card = open(os.path.join(folder, "README.md")).read()
    assert "CM-GRPO" in card and "2605.15190" in card and "reward_curve.png" in card
    assert os.path.getsize(os.path.join(folder, "reward_curve.png")) > 0
    pipe = CausalVideoPipeline.from_pretrained(folder)
    x, t, text = torch.randn(1, 4, 6, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(x, t, text).sample, trainer.student(x, t, text).sample, atol=1e-5)
    trainer.push_to_hub()
    files = {f.path for f in HfApi().list_repo_tree("tester/tiny-cmgrpo", recursive=True)}
    assert {"model_index.json", "README.md", "transformer/config.json"} <= files


def test_shared_initial_noise(tmp_path):
    """With shared_initial_noise, the rollouts of a group start every chunk from one draw and then part ways by the
    sampler's noise; groups draw differently. Without it every rollout has its own start."""
    shared = _generation(build(str(tmp_path / "a"), max_steps=1, num_generations=4, per_device_train_batch_size=8,
                               reward_funcs=[brightness], shared_initial_noise=True))
    start, after = shared["record"].noisy[0], shared["record"].noisy[1]
    for group in (slice(0, 4), slice(4, 8)):
        assert all(torch.equal(start[group][0], x) for x in start[group][1:])
        assert not any(torch.equal(after[group][0], x) for x in after[group][1:])
    assert not torch.equal(start[0], start[4])
    own = _generation(build(str(tmp_path / "b"), max_steps=1, num_generations=4, per_device_train_batch_size=8,
                            reward_funcs=[brightness]))["record"].noisy[0]
    assert not any(torch.equal(own[0], x) for x in own[1:4])
