from .pipeline_causal_video import (
    CausalVideoChunk,
    CausalVideoPipeline,
    CausalVideoPipelineOutput,
    CausalVideoStream,
    ChunkTrajectory,
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
