from .chunk_sampler import ChunkTrajectory
from .pipeline_causal_video import (
    CausalVideoChunk,
    CausalVideoPipeline,
    CausalVideoPipelineOutput,
    CausalVideoStream,
)
from .vae_streaming import StreamingVAEDecoder, denormalize_latents, normalize_latents

__all__ = [
    "CausalVideoChunk",
    "CausalVideoPipeline",
    "CausalVideoPipelineOutput",
    "CausalVideoStream",
    "ChunkTrajectory",
    "StreamingVAEDecoder",
    "denormalize_latents",
    "normalize_latents",
]
