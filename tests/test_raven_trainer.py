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
    for key in ("loss/dmd", "loss/critic", "grad_norm", "chunk_weight/first", "chunk_weight/last"):
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
    ema = trainer.ema
    for name, param in pipe.transformer.named_parameters():
        assert torch.allclose(param, ema[name]), name  # the saved weights are the EMA
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
    (dict(dmd_min_u=0.9, dmd_max_u=0.1), "dmd_min_u"),
    (dict(critic_updates_per_generator_update=0), "critic_updates"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
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
    """torchrun with 2 CPU processes (gloo): same weights on both ranks, same Self Forcing exit steps."""
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
