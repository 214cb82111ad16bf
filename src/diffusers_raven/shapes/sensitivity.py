"""Caption sensitivity of a denoiser: does it read each part of the prompt?

A sampled video tells whether a model follows its caption only after a full sampling run and through a detector. The
flow-matching loss answers a narrower question directly and with little noise: if the prompt is edited so that it no
longer describes the clean video (one attribute of one object changed), how much worse does the model denoise that
video at a given noise level? A gap near zero means the model ignores that attribute; a positive gap means it reads
the attribute and uses it. Counterfactual prompts come from e.g. :func:`diffusers_raven.shapes.edit_scene`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


@torch.no_grad()
def caption_loss_gaps(
    model,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    edited_prompt_embeds: Mapping[str, torch.Tensor],
    sigmas: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample flow-matching losses with the true prompts and their gaps to edited prompts.

    For each ``σ`` in ``sigmas`` one noise ``ε`` is drawn for the whole batch (from ``generator``), and with
    ``x_σ = (1 − σ) x0 + σ ε`` and timestep ``1000 σ`` the loss of each sample is
    ``ℓ(c) = mean ‖v_θ(x_σ, σ, c) − (ε − x0)‖²``. The same ``x_σ`` serves every prompt, so the gaps compare prompts
    only.

    Args:
        model: a velocity model called as ``model(x, timesteps, prompt_embeds)``, returning an output with a
            ``.sample`` (a diffusers ``WanTransformer3DModel``, for example).
        x0: clean latents ``[B, ...]``.
        prompt_embeds: the prompts that describe ``x0`` (``[B, L, D]``).
        edited_prompt_embeds: name -> edited prompts, each shaped like ``prompt_embeds``.
        sigmas: noise levels in ``(0, 1]``.
        generator: the noise generator (CPU).

    Returns:
        ``(loss [len(sigmas), B], {name: ℓ(edited) − ℓ(true), [len(sigmas), B]})``, in float32.
    """
    if x0.ndim < 2:
        raise ValueError(f"`x0` must be batched, got shape {tuple(x0.shape)}")
    if prompt_embeds.shape[0] != x0.shape[0]:
        raise ValueError(f"`prompt_embeds` has {prompt_embeds.shape[0]} rows for {x0.shape[0]} latents")
    for name, embeds in edited_prompt_embeds.items():
        if embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"`edited_prompt_embeds[{name!r}]` has shape {tuple(embeds.shape)}, "
                f"expected {tuple(prompt_embeds.shape)}"
            )
    if len(sigmas) == 0 or not all(0.0 < float(s) <= 1.0 for s in sigmas):
        raise ValueError(f"`sigmas` must be a non-empty list of values in (0, 1], got {list(sigmas)}")
    dims = tuple(range(1, x0.ndim))

    def loss(x_sigma, timesteps, target, embeds):
        velocity = model(x_sigma, timesteps, embeds).sample
        return ((velocity.float() - target.float()) ** 2).mean(dim=dims)

    losses, gaps = [], {name: [] for name in edited_prompt_embeds}
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_sigma = (1 - float(sigma)) * x0 + float(sigma) * noise
        timesteps = torch.full((x0.shape[0],), 1000 * float(sigma), device=x0.device, dtype=x0.dtype)
        target = noise - x0
        base = loss(x_sigma, timesteps, target, prompt_embeds)
        losses.append(base)
        for name, embeds in edited_prompt_embeds.items():
            gaps[name].append(loss(x_sigma, timesteps, target, embeds) - base)
    return torch.stack(losses), {name: torch.stack(rows) for name, rows in gaps.items()}


def summarize_gaps(sigmas: Sequence[float], loss: torch.Tensor, gaps: Mapping[str, torch.Tensor]) -> dict:
    """JSON-ready summary of :func:`caption_loss_gaps`: per name and noise level the mean gap, its standard error
    over the samples and the fraction of samples whose gap is positive (the true prompt is preferred)."""
    n = loss.shape[1]

    def stderr(rows: torch.Tensor) -> list[float]:
        return (rows.std(dim=1, unbiased=True) / n**0.5).tolist() if n > 1 else [0.0] * len(rows)

    return {
        "sigmas": [float(s) for s in sigmas],
        "num_samples": n,
        "loss": loss.mean(dim=1).tolist(),
        "gap": {name: rows.mean(dim=1).tolist() for name, rows in gaps.items()},
        "gap_stderr": {name: stderr(rows) for name, rows in gaps.items()},
        "positive_fraction": {name: (rows > 0).float().mean(dim=1).tolist() for name, rows in gaps.items()},
    }
