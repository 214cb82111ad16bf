"""Input checks shared by the reward functions that read pixels (optical flow, CLIP)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: How far outside [0, 1] a pixel may lie (rounding) before the videos are refused.
RANGE_TOLERANCE = 1e-3


def check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"`prompts` must be a list of strings (one per video), got {type(prompts).__name__}.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"`prompts` must be a list of strings, got {type(prompt).__name__} at index {i}.")
    return list(prompts)


def check_videos(videos: Any, batch_size: int, min_frames: int = 1) -> list[torch.Tensor]:
    """``videos`` as a list of ``[F, C, H, W]`` float tensors (the caller's tensors, not copies, not moved).

    Accepts a ``[B, F, C, H, W]`` tensor or array, or a list/tuple of ``[F, C, H, W]`` tensors or arrays (videos of
    different lengths or sizes). Refuses (``ValueError`` naming ``videos``) a wrong count, shape, channel count
    (1 or 3), an integer dtype, fewer than ``min_frames`` frames, non-finite values or values outside [0, 1]."""
    if torch.is_tensor(videos) or isinstance(videos, np.ndarray):
        if videos.ndim != 5:
            raise ValueError(f"`videos` must have shape [B, F, C, H, W], got {tuple(videos.shape)}.")
        items = [videos[i] for i in range(videos.shape[0])]
    elif isinstance(videos, (list, tuple)):
        items = list(videos)
    else:
        raise ValueError(
            f"`videos` must be a [B, F, C, H, W] tensor or a list of [F, C, H, W] tensors, got {type(videos).__name__}."
        )
    if len(items) != batch_size:
        raise ValueError(f"Got {batch_size} prompts but {len(items)} videos in `videos`.")
    out = []
    for i, video in enumerate(items):
        if isinstance(video, np.ndarray):
            video = torch.from_numpy(video)
        if not torch.is_tensor(video):
            raise ValueError(f"`videos[{i}]` must be a tensor or an array, got {type(video).__name__}.")
        if video.ndim != 4 or video.shape[1] not in (1, 3):
            raise ValueError(
                f"`videos[{i}]` must have shape [F, C, H, W] with C = 3 (RGB) or 1 (grey), channels first; "
                f"got {tuple(video.shape)}."
            )
        if not video.is_floating_point():
            raise ValueError(f"`videos` must hold floats in [0, 1], got dtype {video.dtype} for `videos[{i}]`.")
        if video.shape[0] < min_frames:
            raise ValueError(f"`videos[{i}]` has {video.shape[0]} frames; this reward needs at least {min_frames}.")
        if video.shape[2] < 1 or video.shape[3] < 1:
            raise ValueError(f"`videos[{i}]` has empty frames of size {tuple(video.shape[2:])}.")
        values = video.detach()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"`videos[{i}]` holds NaN or infinite values.")
        low, high = float(values.min()), float(values.max())
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"`videos` must hold values in [0, 1]; `videos[{i}]` spans [{low:.4g}, {high:.4g}] "
                "(map [-1, 1] pixels with (x + 1) / 2, or clamp)."
            )
        out.append(video)
    return out


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[F, C, H, W]`` in [0, 1] -> ``[F, H, W, C]`` uint8 on the CPU (``round(255 x)``).

    The conversion runs on the video's device and only the 8-bit copy goes to the CPU; the caller's tensor is
    neither modified nor moved."""
    frames = (video.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
