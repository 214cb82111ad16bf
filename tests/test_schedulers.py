"""Tests of the schedulers subpackage against independent computations (METHOD §0–§1)."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler
from torch.distributions import Normal, kl_divergence

from diffusers_raven.schedulers import (
    ConsistencyFlowMatchScheduler,
    FlowMatchSDEScheduler,
    GaussianTransition,
    SchedulerStepOutput,
)

DEFAULT_SIGMAS = [1.0, 0.9375, 0.8333333, 0.625, 0.0]
U_GRID = [1.0, 0.75, 0.5, 0.25]
SHAPE = (2, 4, 3, 6, 5)  # [B, C, F, H, W]
SCHEDULERS = [ConsistencyFlowMatchScheduler, FlowMatchSDEScheduler]


def hand_shift(u: float, s: float = 5.0) -> float:
    return s * u / (1 + (s - 1) * u)


def fake_velocity(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A deterministic stand-in for a model: v = tanh(x)·(t/1000) + 0.1."""
    return torch.tanh(x) * (float(t) / 1000.0) + 0.1


def normal_sum(mean, std, x):
    return Normal(mean.double(), torch.as_tensor(std).double()).log_prob(x.double()).flatten(1).sum(1)


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("kwargs", [{}, {"num_inference_steps": 4}])
def test_default_sigmas_literal_and_shift_formula(cls, kwargs):
    sched = cls()
    assert sched.config.shift == 5.0 and sched.config.num_train_timesteps == 1000
    sched.set_timesteps(**kwargs)
    sigmas = sched.schedule_sigmas
    assert len(sigmas) == 5
    for got, want in zip(sigmas, DEFAULT_SIGMAS):
        assert abs(got - want) <= 1e-6
    for got, u in zip(sigmas[:4], U_GRID):
        assert abs(got - hand_shift(u)) <= 1e-6
    assert sigmas[-1] == 0.0
    torch.testing.assert_close(sched.sigmas, torch.tensor(DEFAULT_SIGMAS), atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.timesteps, 1000 * torch.tensor(DEFAULT_SIGMAS[:4]), atol=1e-4, rtol=0)
    assert sched.num_inference_steps == 4
    assert sched.default_sigmas() == pytest.approx([hand_shift(u) for u in U_GRID], abs=1e-12)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_custom_schedules(cls):
    sched = cls()
    sched.set_timesteps(num_inference_steps=3)
    assert sched.schedule_sigmas[:3] == pytest.approx([hand_shift(1 - i / 3) for i in range(3)], abs=1e-6)
    # final sigmas are used as given (no second shift), a trailing zero is not duplicated
    sched.set_timesteps(sigmas=[1.0, 0.8, 0.3, 0.0])
    assert sched.schedule_sigmas == pytest.approx([1.0, 0.8, 0.3, 0.0], abs=1e-7)
    sched.set_timesteps(sigmas=torch.tensor([0.9, 0.4]))
    assert sched.schedule_sigmas == pytest.approx([0.9, 0.4, 0.0], abs=1e-7)
    sched.set_timesteps(unshifted_sigmas=[1.0, 0.5])
    assert sched.schedule_sigmas == pytest.approx([1.0, hand_shift(0.5), 0.0], abs=1e-6)
    sched.set_timesteps(timesteps=[1000.0, 500.0])
    assert sched.schedule_sigmas == pytest.approx([1.0, 0.5, 0.0], abs=1e-7)
    assert sched.timesteps.tolist() == [1000.0, 500.0]
    # config default schedule
    sched = cls(denoising_sigmas=[1.0, 0.75])
    sched.set_timesteps()
    assert sched.schedule_sigmas == pytest.approx([1.0, 0.75, 0.0], abs=1e-7)
    # a different shift changes the uniform schedule
    sched = cls(shift=3.0)
    sched.set_timesteps(2)
    assert sched.schedule_sigmas == pytest.approx([1.0, hand_shift(0.5, 3.0), 0.0], abs=1e-6)


def test_set_timesteps_is_repeatable_and_resets_step_index():
    sched = ConsistencyFlowMatchScheduler()
    sched.set_timesteps()
    first = sched.timesteps.clone()
    x = torch.randn(SHAPE)
    sched.step(fake_velocity(x, first[0]), first[0], x, noise=torch.randn(SHAPE))
    assert sched.step_index == 1
    sched.set_begin_index(0)
    sched.set_timesteps()
    assert sched.step_index is None and sched.begin_index is None
    torch.testing.assert_close(sched.timesteps, first, atol=0, rtol=0)


def test_shift_sigma_and_timestep_helpers():
    sched = ConsistencyFlowMatchScheduler()
    for u in (0.0, 0.02, 0.3, 0.98, 1.0):
        assert sched.shift_sigma(u) == pytest.approx(hand_shift(u), abs=1e-12)
    assert sched.shift_sigma(U_GRID) == pytest.approx(DEFAULT_SIGMAS[:4], abs=1e-6)
    u = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(sched.shift_sigma(u), 5 * u / (1 + 4 * u))
    assert sched.sigma_to_timestep(0.625) == pytest.approx(625.0)
    assert sched.timestep_to_sigma(250.0) == pytest.approx(0.25)
    torch.testing.assert_close(sched.sigma_to_timestep(torch.tensor([0.5])), torch.tensor([500.0]))


# ------------------------------------------------------------------------------------------------ GaussianTransition
@pytest.mark.parametrize("std_kind", ["float", "scalar", "per_sample", "full"])
def test_log_prob_matches_torch_normal(std_kind):
    mean = torch.randn(SHAPE)
    std = {
        "float": 0.7,
        "scalar": torch.tensor(0.3),
        "per_sample": torch.tensor([0.4, 1.3]).view(2, 1, 1, 1, 1),
        "full": torch.rand(SHAPE) + 0.2,
    }[std_kind]
    x = mean + torch.randn(SHAPE)
    tr = GaussianTransition(mean, std)
    ref = Normal(mean.double(), torch.as_tensor(std).double()).log_prob(x.double())
    torch.testing.assert_close(tr.log_prob(x).double(), ref.flatten(1).sum(1), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(tr.log_prob(x, reduction="mean").double(), ref.flatten(1).mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tr.log_prob(x, reduction="none").double(), ref, rtol=1e-5, atol=1e-5)
    assert tr.log_prob(x).shape == (2,)
    assert tr.num_elements == math.prod(SHAPE[1:])
    # the METHOD §1 closed form with D = element count (scalar std)
    if std_kind == "float":
        d = tr.num_elements
        closed = (
            -((x - mean) ** 2).flatten(1).sum(1).double() / (2 * 0.49)
            - d * math.log(0.7)
            - d / 2 * math.log(2 * math.pi)
        )
        torch.testing.assert_close(tr.log_prob(x).double(), closed, rtol=1e-6, atol=1e-3)


def test_log_prob_half_precision_inputs_are_upcast():
    mean = torch.randn(SHAPE)
    x = mean + 0.5 * torch.randn(SHAPE)
    tr = GaussianTransition(mean.bfloat16(), 0.5)
    ref = normal_sum(mean.bfloat16().float(), 0.5, x.bfloat16().float())
    torch.testing.assert_close(tr.log_prob(x.bfloat16()).double(), ref, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("equal_std", [True, False])
def test_kl_matches_torch(equal_std):
    mu_a, mu_b = torch.randn(SHAPE), torch.randn(SHAPE)
    std_a = torch.tensor(0.6)
    std_b = torch.tensor(0.6) if equal_std else torch.rand(SHAPE) + 0.3
    a, b = GaussianTransition(mu_a, std_a), GaussianTransition(mu_b, std_b)
    ref = kl_divergence(Normal(mu_a.double(), std_a.double()), Normal(mu_b.double(), std_b.double()))
    torch.testing.assert_close(a.kl(b).double(), ref.flatten(1).sum(1), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(a.kl(b, reduction="mean").double(), ref.flatten(1).mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.kl(b, reduction="none").double(), ref, rtol=1e-5, atol=1e-5)
    if equal_std:  # METHOD §1: ‖μa − μb‖² / (2σ²)
        closed = ((mu_a - mu_b) ** 2).flatten(1).sum(1).double() / (2 * 0.36)
        torch.testing.assert_close(a.kl(b).double(), closed, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.kl(a), torch.zeros(2, dtype=a.kl(a).dtype), atol=1e-6, rtol=0)


def test_sample_uses_generator_and_noise():
    mean = torch.randn(SHAPE)
    std = torch.tensor([0.2, 0.9]).view(2, 1, 1, 1, 1)
    tr = GaussianTransition(mean, std)
    got = tr.sample(generator=torch.Generator().manual_seed(123))
    want = mean + std * torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    noise = torch.randn(SHAPE)
    torch.testing.assert_close(tr.sample(noise=noise), mean + std * noise, atol=0, rtol=0)
    # one generator per sample (diffusers convention)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    got = tr.sample(generator=gens)
    rows = [torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    torch.testing.assert_close(got, mean + std * torch.cat(rows), atol=0, rtol=0)


def test_transition_plumbing():
    mean = torch.randn(SHAPE, requires_grad=True)
    tr = GaussianTransition(mean * 2, 0.5)
    assert tr.mean.requires_grad and not tr.detach().mean.requires_grad
    assert tr.to(torch.float64).mean.dtype == torch.float64
    assert tr.std.shape == () and tr.std.dtype == torch.float32
    assert "GaussianTransition" in repr(tr) and tr.batch_size == 2 and tr.shape == torch.Size(SHAPE)
    torch.testing.assert_close(tr.variance, torch.tensor(0.25))


# ------------------------------------------------------------------------------------------------ consistency step
def _parent_lcm(final_sigmas: bool) -> FlowMatchLCMScheduler:
    if final_sigmas:
        parent = FlowMatchLCMScheduler(shift=1.0)
        parent.set_timesteps(sigmas=DEFAULT_SIGMAS[:4])
    else:
        parent = FlowMatchLCMScheduler(shift=5.0)
        parent.set_timesteps(sigmas=U_GRID)
    return parent


@pytest.mark.parametrize("final_sigmas", [True, False])
def test_consistency_step_equals_flow_match_lcm(final_sigmas):
    parent = _parent_lcm(final_sigmas)
    ours = ConsistencyFlowMatchScheduler()
    ours.set_timesteps()
    torch.testing.assert_close(parent.sigmas, ours.sigmas, atol=1e-6, rtol=0)

    x_ref = x_ours = torch.randn(SHAPE)
    gen_ref, gen_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for k, t in enumerate(ours.timesteps):
        sigma = DEFAULT_SIGMAS[k]
        v_ref, v_ours = fake_velocity(x_ref, t), fake_velocity(x_ours, t)
        ref = parent.step(v_ref, parent.timesteps[k], x_ref, generator=gen_ref).prev_sample
        out = ours.step(v_ours, t, x_ours, generator=gen_ours)
        assert isinstance(out, SchedulerStepOutput)
        tol = 0 if final_sigmas else 1e-5
        torch.testing.assert_close(out.prev_sample, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(out.pred_original_sample, x_ours - sigma * v_ours, atol=1e-6, rtol=1e-6)
        x_ref, x_ours = ref, out.prev_sample
    assert out.transition is None  # last step
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample, atol=0, rtol=0)


def test_consistency_step_with_explicit_noise_equals_lcm_with_patched_noise(monkeypatch):
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm_module

    noises = [torch.randn(SHAPE) for _ in range(4)]
    queue = list(noises)
    monkeypatch.setattr(lcm_module, "randn_tensor", lambda *a, **k: queue.pop(0))
    parent = _parent_lcm(True)
    ours = ConsistencyFlowMatchScheduler()
    ours.set_timesteps()
    x_ref = x_ours = torch.randn(SHAPE)
    for k, t in enumerate(ours.timesteps):
        ref = parent.step(fake_velocity(x_ref, t), parent.timesteps[k], x_ref).prev_sample
        out = ours.step(fake_velocity(x_ours, t), t, x_ours, noise=noises[k])
        torch.testing.assert_close(out.prev_sample, ref, atol=0, rtol=0)
        x_ref, x_ours = ref, out.prev_sample


def test_consistency_transition_kernel():
    sched = ConsistencyFlowMatchScheduler()
    sched.set_timesteps()
    x = torch.randn(SHAPE)
    for k, t in enumerate(sched.timesteps):
        sigma, sigma_next = DEFAULT_SIGMAS[k], DEFAULT_SIGMAS[k + 1]
        v = fake_velocity(x, t)
        noise = torch.randn(SHAPE)
        out = sched.step(v, t, x, noise=noise)
        x0 = x - sigma * v
        torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-6, rtol=1e-6)
        if sigma_next == 0.0:
            assert out.transition is None
            torch.testing.assert_close(out.prev_sample, x0, atol=1e-6, rtol=1e-6)
            break
        tr = out.transition
        torch.testing.assert_close(tr.mean, (1 - sigma_next) * x0, atol=1e-6, rtol=1e-6)
        assert float(tr.std) == pytest.approx(sigma_next, abs=1e-7)
        torch.testing.assert_close(out.prev_sample, tr.mean + sigma_next * noise, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            tr.log_prob(out.prev_sample).double(),
            normal_sum(tr.mean, sigma_next, out.prev_sample),
            rtol=1e-6,
            atol=1e-3,
        )
        x = out.prev_sample


def test_consistency_log_prob_gradient_is_method_surrogate_direction():
    """∇_{x̂0} log π = (1 − σ')(x' − μ)/σ'² (the CM-GRPO surrogate of METHOD §6 uses this direction)."""
    sched = ConsistencyFlowMatchScheduler()
    x, sigma, sigma_next = torch.randn(SHAPE), 0.9375, 0.8333333
    v = torch.randn(SHAPE, requires_grad=True)
    out = sched.step_from_sigmas(v, x, sigma, sigma_next, noise=torch.randn(SHAPE))
    x_next = out.prev_sample.detach()
    x0 = out.pred_original_sample
    x0.retain_grad()
    out.transition.log_prob(x_next).sum().backward()
    mu = (1 - sigma_next) * x0.detach()
    torch.testing.assert_close(x0.grad, (1 - sigma_next) * (x_next - mu) / sigma_next**2, atol=1e-4, rtol=1e-4)


def test_step_from_sigmas_per_sample_sigmas_match_scalar_calls():
    sched = ConsistencyFlowMatchScheduler()
    x, v, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    sig, sig_next = torch.tensor([1.0, 0.8333333]), torch.tensor([0.9375, 0.625])
    out = sched.step_from_sigmas(v, x, sig, sig_next, noise=noise)
    for b in range(2):
        one = sched.step_from_sigmas(
            v[b : b + 1], x[b : b + 1], float(sig[b]), float(sig_next[b]), noise=noise[b : b + 1]
        )
        torch.testing.assert_close(out.prev_sample[b : b + 1], one.prev_sample, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            out.transition.log_prob(out.prev_sample)[b], one.transition.log_prob(one.prev_sample)[0]
        )


def test_step_accepts_batched_timestep_and_begin_index():
    sched = ConsistencyFlowMatchScheduler()
    sched.set_timesteps()
    x = torch.randn(SHAPE)
    t = sched.timesteps[1].expand(2)  # per-sample timestep of one value
    out = sched.step(fake_velocity(x, t[0]), t, x, noise=torch.randn(SHAPE))
    assert sched.step_index == 2 and float(out.transition.std) == pytest.approx(0.8333333, abs=1e-6)
    sched.set_timesteps()
    sched.set_begin_index(2)
    out = sched.step(fake_velocity(x, 0.0), sched.timesteps[2], x, noise=torch.randn(SHAPE))
    assert float(out.transition.std) == pytest.approx(0.625)
    prev, x0, tr = sched.step(fake_velocity(x, 0.0), sched.timesteps[3], x, return_dict=False)
    assert tr is None and torch.equal(prev, x0)


def test_add_noise_per_sample_and_per_frame():
    sched = ConsistencyFlowMatchScheduler()
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(sched.add_noise(x0, eps, 0.3), 0.7 * x0 + 0.3 * eps)
    per_sample = torch.tensor([0.2, 0.9])
    want = torch.stack([(1 - s) * x0[i] + s * eps[i] for i, s in enumerate(per_sample.tolist())])
    torch.testing.assert_close(sched.add_noise(x0, eps, per_sample), want)
    per_frame = torch.tensor([[0.1, 0.5, 0.9], [1.0, 0.0, 0.25]])
    want = torch.empty(SHAPE)
    for b in range(2):
        for f in range(3):
            s = float(per_frame[b, f])
            want[b, :, f] = (1 - s) * x0[b, :, f] + s * eps[b, :, f]
    torch.testing.assert_close(sched.add_noise(x0, eps, per_frame), want)
    assert sched.add_noise(x0.bfloat16(), eps.bfloat16(), 0.5).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ SDE step
def test_sde_noise_level_zero_is_euler_ode_step():
    ours = FlowMatchSDEScheduler(noise_level=0.0)
    ours.set_timesteps()
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    euler.set_timesteps(sigmas=DEFAULT_SIGMAS[:4])
    x_ref = x_ours = torch.randn(SHAPE)
    for k, t in enumerate(ours.timesteps):
        dt = DEFAULT_SIGMAS[k + 1] - DEFAULT_SIGMAS[k]
        v = fake_velocity(x_ours, t)
        out = ours.step(v, t, x_ours, generator=torch.Generator().manual_seed(0))
        assert out.transition is None
        torch.testing.assert_close(out.prev_sample, x_ours + dt * v, atol=1e-6, rtol=1e-6)
        ref = euler.step(fake_velocity(x_ref, t), euler.timesteps[k], x_ref).prev_sample
        torch.testing.assert_close(out.prev_sample, ref, atol=0, rtol=0)
        x_ref, x_ours = ref, out.prev_sample


@pytest.mark.parametrize("noise_sigma_max", [None, 0.99])
def test_sde_step_matches_method_formula(noise_sigma_max):
    a = 0.7
    sched = FlowMatchSDEScheduler(noise_level=a, noise_sigma_max=noise_sigma_max)
    sched.set_timesteps()
    x = torch.randn(SHAPE)
    for k, t in enumerate(sched.timesteps):
        sigma, sigma_next = sched.schedule_sigmas[k], sched.schedule_sigmas[k + 1]
        v = fake_velocity(x, t)
        noise = torch.randn(SHAPE)
        out = sched.step(v, t, x, noise=noise)
        torch.testing.assert_close(out.pred_original_sample, x - sigma * v, atol=1e-6, rtol=1e-6)
        if sigma_next == 0.0:  # deterministic last step: Euler step = x̂0
            assert out.transition is None
            torch.testing.assert_close(out.prev_sample, x - sigma * v, atol=1e-6, rtol=1e-6)
            break
        if noise_sigma_max is None:
            ratio_sigma = sigma_next if sigma >= 1.0 else sigma  # guard at σ = 1: the next sigma
            s = a * math.sqrt(sigma / (1 - ratio_sigma))
        else:
            c = min(sigma, noise_sigma_max)
            s = a * math.sqrt(c / (1 - c))
        dt = sigma_next - sigma
        mean = x.double() + (s**2 / (2 * sigma) * dt) * x.double()
        mean = mean + v.double() * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        std = s * math.sqrt(-dt)
        tr = out.transition
        torch.testing.assert_close(tr.mean.double(), mean, atol=1e-5, rtol=1e-5)
        assert float(tr.std) == pytest.approx(std, rel=1e-6)
        torch.testing.assert_close(out.prev_sample.double(), mean + std * noise.double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(((out.prev_sample - tr.mean) / std), noise, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            tr.log_prob(out.prev_sample).double(), normal_sum(tr.mean, std, out.prev_sample), rtol=1e-6, atol=1e-3
        )
        x = out.prev_sample


def test_sde_empirical_std_with_generator():
    sched = FlowMatchSDEScheduler()
    sched.set_timesteps()
    x = torch.randn(4, 64, 64, 16)
    t = sched.timesteps[2]
    sched.set_begin_index(2)
    out = sched.step(fake_velocity(x, t), t, x, generator=torch.Generator().manual_seed(3))
    resid = out.prev_sample - out.transition.mean
    assert resid.std().item() == pytest.approx(float(out.transition.std), rel=0.01)
    assert abs(resid.mean().item()) < 0.01


def test_sde_noise_level_override_in_step():
    sched = FlowMatchSDEScheduler()
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = sched.step_from_sigmas(v, x, 0.8333333, 0.625, noise_level=0.0)
    assert out.transition is None
    torch.testing.assert_close(out.prev_sample, x + (0.625 - 0.8333333) * v)


# ------------------------------------------------------------------------------------------------ config, names
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_config_roundtrip_and_module(cls, tmp_path):
    assert cls.__module__ == "diffusers_raven" and GaussianTransition.__module__ == "diffusers_raven"
    sched = cls(denoising_sigmas=[1.0, 0.9, 0.5])
    sched.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert data["_class_name"] == cls.__name__ and data["shift"] == 5.0
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_timesteps()
    assert loaded.schedule_sigmas == pytest.approx([1.0, 0.9, 0.5, 0.0], abs=1e-7)
    import diffusers_raven

    assert getattr(diffusers_raven, cls.__name__) is cls


def test_config_handed_to_diffusers_keeps_shift():
    parent = FlowMatchLCMScheduler.from_config(ConsistencyFlowMatchScheduler().config)
    assert parent.config.shift == 5.0


# ------------------------------------------------------------------------------------------------ bad arguments
def _raises(name, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=name):
        fn(*args, **kwargs)


def test_bad_arguments_raise_value_error_naming_them():
    mean = torch.zeros(SHAPE)
    tr = GaussianTransition(mean, 1.0)
    with pytest.raises(ValueError, match=r"`reduction`.*'sum'.*'mean'.*'none'"):
        tr.log_prob(mean, reduction="avg")
    _raises("reduction", tr.kl, tr, reduction="max")
    _raises("`std`", GaussianTransition, mean, torch.ones(3))
    _raises("`std`", GaussianTransition, mean, -1.0)
    _raises("`mean`", GaussianTransition, torch.zeros(3, dtype=torch.long), 1.0)
    _raises("`x`", tr.log_prob, torch.zeros(2, 3))
    _raises("`noise`", tr.sample, noise=torch.zeros(3))
    _raises("`generator`", tr.sample, generator=[torch.Generator()] * 3)
    _raises("`other`", tr.kl, "not a transition")

    for cls in SCHEDULERS:
        sched = cls()
        _raises("num_inference_steps", sched.set_timesteps, 0)
        _raises("num_inference_steps", sched.set_timesteps, 2.5)
        _raises("num_inference_steps", sched.set_timesteps, 3, sigmas=[1.0, 0.5])
        _raises("`sigmas`", sched.set_timesteps, sigmas=[0.5, 0.9])
        _raises("`sigmas`", sched.set_timesteps, sigmas=[1.5, 0.9])
        _raises("`sigmas`", sched.set_timesteps, sigmas=[])
        _raises("`timesteps`", sched.set_timesteps, timesteps=[2000.0, 100.0])
        _raises("`unshifted_sigmas`", sched.set_timesteps, unshifted_sigmas=[0.2, 0.4])
        _raises("only one of", sched.set_timesteps, sigmas=[1.0], timesteps=[1000.0])
        _raises("`shift`", cls, shift=-1.0)
        _raises("`denoising_sigmas`", cls, denoising_sigmas=[0.3, 0.6])

        sched.set_timesteps()
        x = torch.randn(SHAPE)
        _raises("`timestep`", sched.step, torch.randn(SHAPE), 1000, x)
        _raises("`timestep`", sched.step, torch.randn(SHAPE), 123.0, x)
        _raises("`model_output`", sched.step, torch.randn(2, 3), sched.timesteps[0], x)
        _raises("`noise`", sched.step, torch.randn(SHAPE), sched.timesteps[0], x, noise=torch.randn(3))
        _raises("`sigma_next`", sched.step_from_sigmas, torch.randn(SHAPE), x, 0.5, 0.7)
        _raises("`sigma`", sched.step_from_sigmas, torch.randn(SHAPE), x, 1.5, 0.7)
        _raises("`sigma`", sched.add_noise, x, x, 2.0)
        _raises("`sigma`", sched.add_noise, x, x, torch.rand(5))
        _raises("`noise`", sched.add_noise, x, torch.randn(3), 0.5)
        sched.set_timesteps()
        for t in sched.timesteps:
            sched.step(torch.randn(SHAPE), t, x)
        _raises("`timestep`", sched.step, torch.randn(SHAPE), sched.timesteps[-1], x)

    _raises("`noise_level`", FlowMatchSDEScheduler, noise_level=-0.1)
    _raises("`noise_sigma_max`", FlowMatchSDEScheduler, noise_sigma_max=1.0)
    _raises(
        "`noise_level`",
        FlowMatchSDEScheduler().step_from_sigmas,
        torch.randn(SHAPE),
        torch.randn(SHAPE),
        0.9,
        0.5,
        noise_level=-1.0,
    )
