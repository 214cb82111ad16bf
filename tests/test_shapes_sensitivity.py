"""Caption sensitivity (``diffusers_raven.shapes.caption_loss_gaps``) against hand computations and a per-sample
recomputation with a Wan denoiser."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_raven.shapes import caption_loss_gaps, summarize_gaps


class _Out:
    def __init__(self, sample):
        self.sample = sample


class _PromptIsTheCleanVideo(torch.nn.Module):
    """``v = (x − e) / σ`` with the prompt ``e`` read as a video: the exact velocity when ``e = x0``."""

    def forward(self, x, timesteps, embeds):
        sigma = (timesteps / 1000).view(-1, *[1] * (x.ndim - 1))
        return _Out((x - embeds.reshape(x.shape)) / sigma)


def test_caption_loss_gaps_by_hand():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 2, 2, 4, generator=g, dtype=torch.float64)
    true = x0.reshape(3, 4, 8)
    shift = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    sigmas = [0.9, 0.25]
    loss, gaps = caption_loss_gaps(_PromptIsTheCleanVideo(), x0, true, {"edit": true + shift, "same": true}, sigmas, g)
    assert loss.abs().max() < 1e-12 and gaps["same"].abs().max() < 1e-12
    # ((x − x0 − d)/σ − (x − x0)/σ)² = d² / σ²
    expected = torch.stack([(shift**2).mean(dim=(1, 2)) / s**2 for s in sigmas]).float()
    assert torch.allclose(gaps["edit"], expected, rtol=1e-5)
    summary = summarize_gaps(sigmas, loss, gaps)
    assert summary["sigmas"] == sigmas and summary["num_samples"] == 3
    assert summary["positive_fraction"]["edit"] == [1.0, 1.0] and summary["positive_fraction"]["same"] == [0.0, 0.0]
    assert summary["gap"]["edit"] == pytest.approx(expected.mean(dim=1).tolist(), rel=1e-5)
    assert summary["gap_stderr"]["edit"] == pytest.approx((expected.std(dim=1) / 3**0.5).tolist(), rel=1e-4)


def test_caption_loss_gaps_match_a_recomputation_with_a_wan_denoiser():
    from diffusers import WanTransformer3DModel

    from diffusers_raven.utils.tiny import tiny_transformer_config

    torch.manual_seed(1)
    teacher = WanTransformer3DModel(**tiny_transformer_config()).eval()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 3, 4, 4, generator=g)
    text, other = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    sigmas = [0.8, 0.4]
    loss, gaps = caption_loss_gaps(teacher, x0, text, {"other": other}, sigmas, torch.Generator().manual_seed(7))
    assert loss.shape == gaps["other"].shape == (2, 2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for row, sigma in enumerate(sigmas):
            eps = torch.randn(x0.shape, generator=g)
            x = (1 - sigma) * x0 + sigma * eps
            t = torch.tensor([1000 * sigma])
            for b in range(2):  # one sample at a time: the batch does not mix samples
                target = eps[b : b + 1] - x0[b : b + 1]
                ref = F.mse_loss(teacher(x[b : b + 1], t, text[b : b + 1]).sample, target)
                alt = F.mse_loss(teacher(x[b : b + 1], t, other[b : b + 1]).sample, target)
                assert torch.isclose(loss[row, b], ref, rtol=1e-4)
                assert torch.isclose(gaps["other"][row, b], alt - ref, rtol=1e-3, atol=1e-6)


def test_summarize_gaps_of_one_sample_has_zero_stderr():
    loss = torch.tensor([[0.5], [0.25]])
    summary = summarize_gaps([0.9, 0.5], loss, {"color": torch.tensor([[0.1], [-0.2]])})
    assert summary["gap_stderr"]["color"] == [0.0, 0.0]
    assert summary["positive_fraction"]["color"] == [1.0, 0.0]
    assert summary["loss"] == [0.5, 0.25]


def test_caption_loss_gaps_reject_bad_input():
    x0, text = torch.zeros(2, 4, 1, 2, 2), torch.zeros(2, 3, 8)
    model = _PromptIsTheCleanVideo()
    with pytest.raises(ValueError, match="sigmas"):
        caption_loss_gaps(model, x0, text, {}, [0.0])
    with pytest.raises(ValueError, match="sigmas"):
        caption_loss_gaps(model, x0, text, {}, [])
    with pytest.raises(ValueError, match="x0"):
        caption_loss_gaps(model, torch.zeros(2), text, {}, [0.5])
    with pytest.raises(ValueError, match="prompt_embeds"):
        caption_loss_gaps(model, x0, text[:1], {}, [0.5])
    with pytest.raises(ValueError, match=r"edited_prompt_embeds\['e'\]"):
        caption_loss_gaps(model, x0, text, {"e": text[:, :2]}, [0.5])
