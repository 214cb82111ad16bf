"""ODE-regression initialisation: the teacher trajectory against diffusers' Euler scheduler, the regression inputs,
and a short run whose loss falls."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from diffusers_raven import ODERegressionConfig, ODERegressionTrainer
from diffusers_raven.trainer import build_ode_dataset
from diffusers_raven.training import ode_regression_inputs, shifted_grid, teacher_ode_trajectory
from diffusers_raven.utils.tiny import tiny_transformer_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return WanTransformer3DModel(**tiny_transformer_config()).eval()


def test_teacher_trajectory_equals_diffusers_euler(teacher):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 6, 4, 4, generator=g)
    text, negative = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    record = [1.0, 0.9375, 0.8333333333333334, 0.625]
    states, x0 = teacher_ode_trajectory(teacher, noise, text, negative, record, guidance_scale=3.0, num_steps=8)
    grid = shifted_grid(8)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=grid[:-1].tolist())
    x, seen = noise, {}
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            seen[i] = x
            cond = teacher(x, t.expand(1), text).sample
            uncond = teacher(x, t.expand(1), negative).sample
            x = scheduler.step(uncond + 3.0 * (cond - uncond), t, x).prev_sample
    assert torch.allclose(x0, x, atol=1e-5)
    for s, i in zip(states, [0, 2, 4, 6]):
        assert torch.allclose(s, seen[i], atol=1e-5)
    with pytest.raises(ValueError, match="record_sigmas"):
        teacher_ode_trajectory(teacher, noise, text, None, [0.9], num_steps=8)


def test_regression_inputs_pick_one_sigma_per_chunk():
    states = torch.arange(4.0).view(4, 1, 1, 1, 1, 1).expand(4, 2, 3, 6, 2, 2).clone()
    sigmas = torch.tensor([1.0, 0.9375, 0.8333, 0.625])
    noisy, t = ode_regression_inputs(states, sigmas, [3, 3], torch.Generator().manual_seed(0))
    for b in range(2):
        for start in (0, 3):
            k = noisy[b, 0, start, 0, 0].long()
            assert torch.all(noisy[b, :, start : start + 3] == k)
            assert torch.allclose(t[b, start : start + 3], sigmas[k] * 1000)


def test_ode_dataset_does_not_depend_on_its_batch_size(teacher):
    """Pairs integrated 2 prompts at a time equal the one-at-a-time pairs (same noise per prompt, in prompt order)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_pipeline import make_pipeline

    pipe = make_pipeline()
    prompts = ["a red circle", "a blue square", "a green triangle"]
    kwargs = dict(num_frames=21, height=32, width=32, num_steps=8, max_sequence_length=16, seed=3)
    one = build_ode_dataset(pipe, teacher, prompts, **kwargs)
    two = build_ode_dataset(pipe, teacher, prompts, batch_size=2, **kwargs)  # batches of 2 and 1
    assert one["prompt"] == two["prompt"] == prompts
    for key in ("ode_states", "latents"):
        assert torch.allclose(torch.stack(list(one[key])), torch.stack(list(two[key])), atol=1e-5)
    assert not torch.allclose(one["latents"][0], one["latents"][1])  # each prompt has its own noise
    with pytest.raises(ValueError, match="batch_size"):
        build_ode_dataset(pipe, teacher, prompts, batch_size=0, **kwargs)


def test_ode_regression_learns(tmp_path, teacher):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_pipeline import make_pipeline

    pipe = make_pipeline()
    data = build_ode_dataset(pipe, teacher, ["a red circle", "a blue square"], num_frames=21, height=32, width=32,
                             num_steps=8, max_sequence_length=16)
    assert data[0]["ode_states"].shape == (4, 4, 6, 4, 4) and data[0]["latents"].shape == (4, 6, 4, 4)
    args = ODERegressionConfig(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=2, num_frames=21,
                               height=32, width=32, max_sequence_length=16, logging_steps=5, learning_rate=3e-3,
                               use_cpu=True, save_strategy="no", seed=0)
    trainer = ODERegressionTrainer(model=pipe, args=args, train_dataset=data)
    trainer.train()
    losses = [h["ode/loss"] for h in trainer.state.log_history if "ode/loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="ode_states"):
        from datasets import Dataset

        ODERegressionTrainer(model=pipe, args=args, train_dataset=Dataset.from_dict({"prompt": ["x"]}))
