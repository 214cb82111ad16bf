"""The tiny benchmark configuration shared by every benchmark script.

The model is a :class:`~diffusers_raven.CausalWanTransformer3DModel` with random weights, larger than the unit-test
toy so that tensor compute (not Python overhead) dominates each forward pass, yet small enough for every benchmark
to finish in a few minutes on two CPU cores:

- 4 blocks, 4 heads × head dim 32 (model dim 128; RoPE splits the head dim into t = 12, h = w = 10), FFN 512;
- 16 latent channels, 16 × 16 latents with patch (1, 2, 2): 64 tokens per latent frame;
- text states of 32 tokens × 64 dims; chunks of 3 latent frames (192 tokens).

Everything runs in float32 under ``torch.no_grad()`` with fixed seeds.
"""

from __future__ import annotations

import torch

from diffusers_raven import CausalWanTransformer3DModel, ConsistencyFlowMatchScheduler

BENCH_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=256,
    ffn_dim=512,
    num_layers=4,
    rope_max_seq_len=1024,
    num_frames_per_chunk=3,
)

LATENT_CHANNELS = 16
LATENT_HEIGHT = 16
LATENT_WIDTH = 16
TEXT_TOKENS = 32
TEXT_DIM = 64
CHUNK_FRAMES = 3
TOKENS_PER_FRAME = (LATENT_HEIGHT // 2) * (LATENT_WIDTH // 2)
NUM_INFERENCE_STEPS = 4
SEED = 0


def bench_model(seed: int = SEED) -> CausalWanTransformer3DModel:
    """The benchmark transformer: fixed random weights, eval mode, float32 on CPU."""
    torch.manual_seed(seed)
    return CausalWanTransformer3DModel(**BENCH_TRANSFORMER_CONFIG).eval()


def text_states(batch: int = 1, seed: int = SEED + 1) -> torch.Tensor:
    """Fixed text-encoder states ``[batch, 32, 64]`` (the benchmarks never run a text encoder)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator)


def latent_noise(
    frames: int,
    batch: int = 1,
    generator: torch.Generator | None = None,
    height: int = LATENT_HEIGHT,
    width: int = LATENT_WIDTH,
) -> torch.Tensor:
    """Gaussian latents ``[batch, 16, frames, height, width]`` (16 × 16 by default)."""
    return torch.randn(batch, LATENT_CHANNELS, frames, height, width, generator=generator)


def sampler_schedule() -> tuple[list[float], list[float]]:
    """The default 4-step consistency schedule: ``sigmas`` (with the final 0) and ``timesteps`` (``1000·σ``)."""
    scheduler = ConsistencyFlowMatchScheduler()
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    return scheduler.sigmas.tolist(), scheduler.timesteps.tolist()
