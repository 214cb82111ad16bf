"""Chunk-by-chunk decoding and encoding of Wan video with a persistent causal-convolution cache.

``AutoencoderKLWan.decode`` and ``encode`` reset the causal-conv feature cache on every call, so decoding (or
encoding) a video in pieces with them produces seams (every chunk is treated as the start of a new video). The
:class:`StreamingVAEDecoder` below drives the decoder's per-latent-frame loop itself and keeps the feature cache in
its own :class:`StreamingDecodeState`, so the concatenation of the chunk outputs equals one-shot decoding;
:class:`StreamingVAEEncoder` does the same for the encoder's loop (the first frame alone, then groups of
``temporal factor`` frames), so chunk-by-chunk encoding equals one-shot ``vae.encode``.

The cache is passed explicitly to ``vae.decoder(..., feat_cache=..., feat_idx=...)`` (``vae.encoder`` likewise);
nothing is stored on the VAE module, so any number of streams can share one VAE (see ``docs/streaming_vae.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, patchify, unpatchify

__all__ = [
    "StreamingDecodeState",
    "StreamingVAEDecoder",
    "StreamingVAEEncoder",
    "denormalize_latents",
    "frames_for_latents",
    "latents_for_frames",
    "normalize_latents",
]


def _latent_stats(latents: torch.Tensor, vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(mean, 1 / std)`` shaped ``[1, C, 1, 1, 1]`` on ``latents``' device and dtype."""
    cfg = vae.config
    if cfg.latents_mean is None or cfg.latents_std is None:
        raise ValueError("vae.config.latents_mean / latents_std are not set; cannot (de)normalise latents.")
    z_dim = len(cfg.latents_mean)
    if latents.shape[1] != z_dim:
        raise ValueError(f"latents have {latents.shape[1]} channels but vae.config.latents_mean has {z_dim}.")
    mean = torch.tensor(cfg.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    return mean, inv_std


def normalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Map raw VAE latents to the diffusion model's space: ``(latents - mean) * (1 / std)`` (Wan convention)."""
    mean, inv_std = _latent_stats(latents, vae)
    return (latents - mean) * inv_std


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`: ``latents / (1 / std) + mean``, as the Wan pipelines do before decode.

    The expression is written exactly like ``WanPipeline`` so the result matches it bit for bit.
    """
    mean, inv_std = _latent_stats(latents, vae)
    return latents / inv_std + mean


def vae_temporal_factor(vae: AutoencoderKLWan) -> int:
    """Frames produced by every latent frame after the first (``2 ** number of temporal upsamplings``)."""
    return 2 ** sum(bool(t) for t in vae.config.temperal_downsample)


def vae_patch_size(vae: AutoencoderKLWan) -> int | None:
    """``vae.config.patch_size`` (None: no patchifying), checked to be an int >= 1."""
    patch_size = vae.config.patch_size
    if patch_size is not None and (not isinstance(patch_size, int) or patch_size < 1):
        raise NotImplementedError(f"Unsupported vae.config.patch_size={patch_size!r}; expected an int >= 1.")
    return patch_size


def vae_spatial_factor(vae: AutoencoderKLWan) -> int:
    """Pixels per latent along height and width: ``2 ** down-samplings``, times ``patch_size`` when the VAE patchifies
    its input (Wan 2.2 style)."""
    return 2 ** len(vae.config.temperal_downsample) * (vae.config.patch_size or 1)


def latents_for_frames(num_frames: int, already_encoded: int = 0, temporal_factor: int = 4) -> int:
    """Latent frames the encoder makes of ``num_frames`` pixel frames after ``already_encoded`` pixel frames: the inverse
    of :func:`frames_for_latents`. The first frame of a video is encoded alone, every later ``temporal_factor`` frames
    together, so the frames must complete whole groups (``ValueError`` otherwise)."""
    if num_frames < 0 or already_encoded < 0:
        raise ValueError("frame counts must be non-negative")
    first = 1 if already_encoded == 0 and num_frames > 0 else 0
    if (num_frames - first) % temporal_factor:
        where = "the first chunk of a video" if already_encoded == 0 else "a later chunk"
        rule = f"1 + {temporal_factor}·k" if already_encoded == 0 else f"{temporal_factor}·k"
        raise ValueError(f"{where} must have {rule} frames to encode, got {num_frames}.")
    return first + (num_frames - first) // temporal_factor


def _pre_forward(vae: AutoencoderKLWan) -> None:
    """The hook ``@apply_forward_hook`` triggers on ``vae.encode`` / ``vae.decode`` (model CPU offload moves the VAE to
    the device)."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


def frames_for_latents(num_latent_frames: int, already_decoded: int = 0, temporal_factor: int = 4) -> int:
    """Pixel frames emitted when decoding ``num_latent_frames`` after ``already_decoded`` latent frames.

    The first latent frame of a video decodes to one frame, every later one to ``temporal_factor`` frames, so a
    video of ``n`` latent frames has ``1 + temporal_factor * (n - 1)`` frames.
    """
    if num_latent_frames < 0 or already_decoded < 0:
        raise ValueError("frame counts must be non-negative")
    if num_latent_frames == 0:
        return 0
    first = 1 if already_decoded == 0 else temporal_factor
    return first + temporal_factor * (num_latent_frames - 1)


@dataclass
class StreamingDecodeState:
    """Causal-conv cache of one decoding stream.

    ``feat_cache`` has one slot per ``WanCausalConv3d`` in the decoder; a slot holds the last (up to two) input
    frames of that convolution, ``None`` before the first frame, or the marker string ``"Rep"`` that diffusers'
    temporal upsampler stores after the first frame.
    """

    feat_cache: list[Any] = field(default_factory=list)
    num_latent_frames: int = 0

    def detach(self) -> None:
        """Detach cached tensors from the autograd graph (truncated backprop between chunks)."""
        self.feat_cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in self.feat_cache]


class StreamingVAEDecoder:
    """Decode Wan latents chunk by chunk while keeping the decoder's causal cache between chunks.

    Example::

        stream = StreamingVAEDecoder(vae)
        for chunk in latent_chunks:  # [B, C, f, h, w], already denormalised
            frames = stream.decode(chunk)  # [B, 3, 1 + 4 (f - 1)] first, [B, 3, 4 f] afterwards

    Each instance is one stream; several instances may share the same ``vae``. Gradients follow the caller's
    autograd mode (wrap calls in ``torch.no_grad()`` for inference). Spatial tiling (``vae.enable_tiling``) is not
    applied: the output equals non-tiled ``vae.decode``.
    """

    def __init__(self, vae: AutoencoderKLWan, clamp: bool = True) -> None:
        self.vae = vae
        self.clamp = clamp
        self.num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.temporal_factor = vae_temporal_factor(vae)
        self.patch_size = vae_patch_size(vae)
        self.state = self.new_state()

    def new_state(self) -> StreamingDecodeState:
        """Return a fresh (empty) cache for this VAE."""
        return StreamingDecodeState(feat_cache=[None] * self.num_convs)

    def reset(self) -> None:
        """Forget all previous chunks; the next :meth:`decode` starts a new video."""
        self.state = self.new_state()

    @property
    def num_latent_frames(self) -> int:
        """Latent frames decoded so far in the current stream."""
        return self.state.num_latent_frames

    def frames_for_latents(self, num_latent_frames: int, already_decoded: int | None = None) -> int:
        """Frames the next ``decode`` of ``num_latent_frames`` frames emits (``already_decoded`` defaults to state)."""
        done = self.state.num_latent_frames if already_decoded is None else already_decoded
        return frames_for_latents(num_latent_frames, done, self.temporal_factor)

    def decode(self, latents: torch.Tensor, state: StreamingDecodeState | None = None) -> torch.Tensor:
        """Decode one chunk of (denormalised) latents ``[B, C, f, h, w]`` to frames ``[B, 3, n, H, W]`` in [-1, 1].

        Uses and updates ``state`` (default: this stream's own state). The batch size must stay the same across
        the chunks of one stream.
        """
        if latents.ndim != 5:
            raise ValueError(f"expected latents of shape [B, C, f, h, w], got {tuple(latents.shape)}")
        if latents.shape[2] == 0:
            raise ValueError("latent chunk has no frames")
        state = self.state if state is None else state
        if len(state.feat_cache) != self.num_convs:
            raise ValueError("state was created for a different decoder")

        vae = self.vae
        _pre_forward(vae)
        weight = vae.post_quant_conv.weight
        x = vae.post_quant_conv(latents.to(device=weight.device, dtype=weight.dtype))  # 1x1x1 conv: per frame

        outs = []
        for i in range(x.shape[2]):
            first = state.num_latent_frames == 0
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=state.feat_cache, feat_idx=[0], first_chunk=first))
            state.num_latent_frames += 1
        out = torch.cat(outs, dim=2)

        if self.patch_size is not None:
            out = unpatchify(out, patch_size=self.patch_size)
        if self.clamp:
            out = torch.clamp(out, min=-1.0, max=1.0)
        return out

    def __call__(self, latents: torch.Tensor, state: StreamingDecodeState | None = None) -> torch.Tensor:
        return self.decode(latents, state)


class StreamingVAEEncoder:
    """Encode Wan video chunk by chunk while keeping the encoder's causal cache between chunks.

    Example::

        stream = StreamingVAEEncoder(vae)
        for frames in pixel_chunks:  # [B, 3, n, H, W] in [-1, 1]: 1 + 4 k frames first, 4 k frames afterwards
            latents = stream.encode(frames)  # [B, C, f, h, w], raw (not normalised): the posterior's mode

    ``vae.encode`` runs the encoder on the first frame alone and then on groups of ``temporal factor`` frames, with a
    causal-conv cache it clears at the start and the end of every call; this class runs the same per-group calls with
    a cache of its own (a :class:`StreamingDecodeState` sized for the encoder), so the concatenated chunk outputs equal
    one-shot ``vae.encode(video).latent_dist.mode()`` (the posterior's mean, as Wan's image-to-video pipeline takes it).
    Gradients follow the caller's autograd mode; spatial tiling is not applied.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        self.num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        self.temporal_factor = vae_temporal_factor(vae)
        self.patch_size = vae_patch_size(vae)
        self.state = self.new_state()
        self.num_frames = 0  # pixel frames encoded so far

    def new_state(self) -> StreamingDecodeState:
        """Return a fresh (empty) cache for this VAE's encoder (``num_latent_frames`` counts latent frames made)."""
        return StreamingDecodeState(feat_cache=[None] * self.num_convs)

    def reset(self) -> None:
        """Forget all previous chunks; the next :meth:`encode` starts a new video."""
        self.state = self.new_state()
        self.num_frames = 0

    @property
    def num_latent_frames(self) -> int:
        """Latent frames made so far in the current stream."""
        return self.state.num_latent_frames

    def latents_for_frames(self, num_frames: int) -> int:
        """Latent frames the next :meth:`encode` of ``num_frames`` pixel frames makes (``ValueError`` if they do not
        complete whole groups)."""
        return latents_for_frames(num_frames, self.num_frames, self.temporal_factor)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode one chunk of pixel frames ``[B, 3, n, H, W]`` in [-1, 1] to raw latents ``[B, C, f, h, w]``.

        The first chunk of a video has ``1 + t·k`` frames, later ones ``t·k`` (``t`` the temporal factor, 4 for Wan).
        """
        if frames.ndim != 5:
            raise ValueError(f"expected frames of shape [B, 3, n, H, W], got {tuple(frames.shape)}")
        if frames.shape[2] == 0:
            raise ValueError("pixel chunk has no frames")
        num_latent = self.latents_for_frames(frames.shape[2])
        state, t = self.state, self.temporal_factor

        vae = self.vae
        _pre_forward(vae)
        weight = vae.quant_conv.weight
        x = frames.to(device=weight.device, dtype=weight.dtype)
        if self.patch_size is not None:
            x = patchify(x, patch_size=self.patch_size)  # per frame: a rearrangement of pixels into channels
        outs, start = [], 0
        for _ in range(num_latent):
            size = 1 if state.num_latent_frames == 0 else t
            outs.append(vae.encoder(x[:, :, start : start + size], feat_cache=state.feat_cache, feat_idx=[0]))
            state.num_latent_frames += 1
            start += size
        self.num_frames += frames.shape[2]
        moments = vae.quant_conv(torch.cat(outs, dim=2))  # 1x1x1 conv: per frame
        return moments.chunk(2, dim=1)[0]  # the mean (mode) of the diagonal Gaussian posterior

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encode(frames)
