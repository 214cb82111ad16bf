"""Pure training functions against hand computations, autograd, the cached sampler and per-sample recomputation."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_raven.training import (
    RolloutRecord,
    chunk_weights,
    critic_loss,
    dmd_loss,
    frame_weights,
    pack_interleaved,
    participation_scores,
    sample_dmd_timesteps,
)


def test_chunk_weights_reference_values():
    w = chunk_weights([3] * 7, alpha=-1)
    assert w.tolist() == pytest.approx([0.386, 0.450, 0.540, 0.675, 0.900, 1.350, 2.700], abs=1e-3)
    # by hand: g_c = p_K / p_c = 1 / (8 - c); w = g · 7 / Σ g
    g = torch.tensor([1 / (8 - c) for c in range(1, 8)], dtype=torch.float64)
    assert torch.allclose(w, g * 7 / g.sum())


@pytest.mark.parametrize("alpha", [-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("sizes", [[3] * 7, [1, 3, 3, 3], [4, 2, 5]])
def test_chunk_weights_keep_mean_element_weight(alpha, sizes):
    w = chunk_weights(sizes, alpha)
    n = torch.tensor(sizes, dtype=torch.float64)
    assert torch.isclose((w * n).sum(), n.sum())
    assert frame_weights(sizes, alpha).shape == (sum(sizes),)


def test_chunk_weight_transform_by_hand():
    p = participation_scores([2, 3, 5])
    assert torch.allclose(p, torch.tensor([1.0, 0.8, 0.5], dtype=torch.float64))
    alpha = 2.0
    g = torch.tensor([alpha * x / (1 + (alpha - 1) * x) for x in [1.0, 0.8, 0.5]], dtype=torch.float64)
    n = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    assert torch.allclose(chunk_weights([2, 3, 5], alpha), g * 10 / (g * n).sum())
    assert torch.equal(chunk_weights([2, 3, 5], 0.0), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_sizes"):
        chunk_weights([], -1)


@pytest.mark.parametrize("weighted", [False, True])
def test_dmd_gradient_is_the_normalised_score_difference(weighted):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(2, 4, 6, 3, 3, generator=g, dtype=torch.float64)
    real = torch.randn(2, 4, 6, 3, 3, generator=g, dtype=torch.float64)
    weights = frame_weights([3, 3], -1.0) if weighted else None
    loss, _ = dmd_loss(x0, fake, real, frame_weights=weights)
    loss.backward()
    D = (x0.detach() - real).abs().flatten(1).mean(1).view(2, 1, 1, 1, 1)
    expected = (fake - real) / D / x0.numel()
    if weighted:
        expected = expected * weights.view(1, 1, 6, 1, 1)
    assert torch.allclose(x0.grad, expected, rtol=1e-10, atol=1e-14)


def test_critic_loss_is_flow_matching_mse():
    g = torch.Generator().manual_seed(1)
    v, eps, x0 = (torch.randn(2, 4, 3, 2, 2, generator=g) for _ in range(3))
    assert torch.isclose(critic_loss(v, eps, x0), F.mse_loss(v, eps - x0))


def test_dmd_timesteps_are_shifted_then_scaled():
    """RAVEN's re-noising levels: τ = 0.02 + 0.96·shift_5(u), u ~ U[0, 1], rounded to integer timesteps."""
    tau = sample_dmd_timesteps(20000, generator=torch.Generator().manual_seed(0)).double()
    assert torch.allclose(tau * 1000, torch.round(tau * 1000), atol=1e-4)  # integer timesteps
    assert tau.min() >= 0.02 - 1e-7 and tau.max() <= 0.98 + 1e-7
    s = (tau - 0.02) / 0.96
    u = s / (5 - 4 * s)  # inverse of the shift map
    # u is uniform on [0, 1] up to the rounding: a Kolmogorov–Smirnov distance against U[0, 1]
    sorted_u = u.sort().values
    ks = (sorted_u - torch.arange(1, len(u) + 1, dtype=torch.float64) / len(u)).abs().max()
    assert ks < 0.02
    # P(τ > 0.95) = P(shift(u) > 0.96875) = 1 − u*, shift(u*) = 0.96875 ⇔ u* = 0.96875 / 1.125
    assert abs(float((tau > 0.95).double().mean()) - (1 - 0.96875 / 1.125)) < 0.01
    # one generator per sample: the same levels whatever the batch
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    one_by_one = torch.cat([sample_dmd_timesteps(1, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    assert torch.equal(sample_dmd_timesteps(3, generator=gens), one_by_one)
    unrounded = sample_dmd_timesteps(5, generator=torch.Generator().manual_seed(1), num_train_timesteps=None)
    u = torch.rand(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(unrounded.double(), 0.02 + 0.96 * 5 * u / (1 + 4 * u), atol=1e-7)


@pytest.mark.parametrize("context_noise", [0.0, 250.0])
def test_packed_interleaved_pass_reproduces_the_cached_rollout(context_noise):
    """The RAVEN exactness property end to end: a pipeline rollout (KV cache) → packed sequence → one interleaved
    forward gives back every recorded prediction x̂0 of step k, also with context noise: the packed history is the
    noised context the cache was written with, which the cache-less recomputation of the stream also attends to."""
    from test_pipeline import SIZE, gen, make_pipeline, manual_rollout

    pipe = make_pipeline()
    noise = torch.randn(1, 4, 9, 4, 4, generator=gen(5))
    out = pipe("a red circle", num_frames=33, latents=noise, generator=gen(0), return_trajectory=True,
               output_type="latent", context_noise=context_noise, **SIZE)
    record = RolloutRecord.from_chunks(out.trajectory)
    assert record.noisy.shape[:3] == (4, 1, 4) and record.chunk_sizes == [3, 3, 3]
    _, history = manual_rollout(pipe, ["a red circle"] * 3, noise, seed=0, context_t=context_noise)
    assert (record.context - torch.cat(history, dim=2)).abs().max() <= 1e-5
    text = pipe.encode_prompt("a red circle", max_sequence_length=16)[0]
    for k in range(record.num_steps):
        packed = pack_interleaved(record, torch.tensor([k]), context_noise)
        assert torch.equal(packed["history"], record.context[:, :, :6])
        with torch.no_grad():
            v = pipe.transformer(encoder_hidden_states=text, **packed).sample
        sigma = record.sigmas[k]
        x0 = packed["hidden_states"] - sigma * v
        assert (x0 - record.pred_original[k]).abs().max() <= 1e-5


def test_packed_one_chunk_video_has_an_empty_history():
    from test_pipeline import SIZE, make_pipeline

    pipe = make_pipeline()
    out = pipe("a red circle", num_frames=9, generator=torch.Generator().manual_seed(0), return_trajectory=True,
               output_type="latent", context_noise=100.0, **SIZE)
    record = RolloutRecord.from_chunks(out.trajectory)
    packed = pack_interleaved(record, torch.tensor([1]), 100.0)
    assert packed["history"].shape[2] == 0
    text = pipe.encode_prompt("a red circle", max_sequence_length=16)[0]
    with torch.no_grad():
        v = pipe.transformer(encoder_hidden_states=text, **packed).sample
    x0 = packed["hidden_states"] - record.sigmas[1] * v
    assert (x0 - record.pred_original[1]).abs().max() <= 1e-5
