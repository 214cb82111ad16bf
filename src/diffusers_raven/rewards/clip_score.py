"""Text-video alignment reward (METHOD §8): CLIP similarity between a video's frames and its prompt.

``make_clip_reward(model_name_or_path)`` returns a reward function that, for each video, takes ``num_frames`` evenly
spaced frames (first and last included; all frames if the video is shorter), embeds them with a
``transformers.CLIPModel``'s image tower and the prompt with its text tower, and returns the mean over the frames of
the cosine similarity between the frame and the prompt embeddings, times ``scale``.

The frames are converted to 8-bit RGB images (``round(255 x)``, the way CLIP sees ordinary images) and prepared by the
checkpoint's own image processor and tokenizer (``AutoImageProcessor`` / ``AutoTokenizer``; prompts longer than the
text tower's positions are truncated). The model, tokenizer and image processor are loaded on the first call and kept
in the function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._inputs import check_prompts, check_videos, to_uint8_frames

__all__ = ["frame_indices", "make_clip_reward"]

RewardFunc = Callable[..., list[float | None]]


def frame_indices(num_video_frames: int, num_frames: int | None) -> list[int]:
    """Indices of ``num_frames`` evenly spaced frames of a ``num_video_frames``-frame video, first and last included
    (``floor(i * (F - 1) / (n - 1) + 0.5)``); every frame when ``num_frames`` is None or ``>= num_video_frames``; the
    first frame when ``num_frames`` is 1."""
    if isinstance(num_video_frames, bool) or not isinstance(num_video_frames, int) or num_video_frames < 1:
        raise ValueError(f"`num_video_frames` must be a positive integer, got {num_video_frames!r}.")
    _check_num_frames(num_frames)
    if num_frames is None or num_frames >= num_video_frames:
        return list(range(num_video_frames))
    if num_frames == 1:
        return [0]
    positions = np.arange(num_frames) * (num_video_frames - 1) / (num_frames - 1)
    return [int(i) for i in np.floor(positions + 0.5)]


def _check_num_frames(num_frames: Any) -> None:
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"`num_frames` must be a positive integer or None (every frame), got {num_frames!r}.")


def _resolve_dtype(dtype: Any) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"`dtype` must be a torch.dtype, its name (e.g. 'bfloat16'), 'auto' or None, got {dtype!r}.")


def make_clip_reward(
    model_name_or_path: str | os.PathLike,
    num_frames: int | None = 8,
    scale: float | str = 1.0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    name: str = "clip_reward",
    load_kwargs: dict[str, Any] | None = None,
) -> RewardFunc:
    """A CLIP text-video reward (see the module docstring for the definition).

    Args:
        model_name_or_path: a folder or Hub id of a ``transformers`` CLIP checkpoint with its tokenizer and image
            processor (e.g. ``"openai/clip-vit-large-patch14"``). Nothing is loaded before the first call.
        num_frames: frames scored per video, evenly spaced (:func:`frame_indices`); None scores every frame.
        scale: multiplies the cosine similarity: ``1.0`` (default) gives values in [-1, 1], ``100.0`` the usual
            "CLIP score" scale, ``"logit_scale"`` the model's learned ``exp(logit_scale)`` (the factor of its
            ``logits_per_image``).
        device: where the model runs and the scores are computed. None: on the videos' device (the first video's,
            for a list), the model following it. The sampled frames are copied there; the caller's tensors are
            neither modified nor moved.
        dtype: the model's dtype (``torch.float32`` by default; ``"auto"`` reads it from the checkpoint). Embeddings
            are compared in float32.
        name: the function's ``__name__``, i.e. the metric key ``rewards/<name>/mean``.
        load_kwargs: extra keyword arguments of the three ``from_pretrained`` calls (e.g. ``revision``,
            ``cache_dir``, ``local_files_only``).

    Returns:
        ``fn(prompts, videos, **dataset_columns) -> list[float]``, one score per (prompt, video) pair.
    """
    if isinstance(model_name_or_path, os.PathLike):
        model_name_or_path = os.fspath(model_name_or_path)
    if not isinstance(model_name_or_path, str) or not model_name_or_path:
        raise ValueError(f"`model_name_or_path` must be a folder or a Hub id, got {model_name_or_path!r}.")
    _check_num_frames(num_frames)
    if scale != "logit_scale" and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"`scale` must be a positive number or 'logit_scale', got {scale!r}.")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"`device` must be a torch device or its name, got {device!r}.") from error
    dtype = _resolve_dtype(dtype)
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
    if load_kwargs is not None and not isinstance(load_kwargs, dict):
        raise ValueError(f"`load_kwargs` must be a dict or None, got {type(load_kwargs).__name__}.")
    load_kwargs = dict(load_kwargs or {})
    state: dict[str, Any] = {}

    def load() -> dict[str, Any]:
        if not state:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            model = CLIPModel.from_pretrained(model_name_or_path, dtype=dtype, **load_kwargs)
            model.eval().requires_grad_(False)
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **load_kwargs)
            image_processor = AutoImageProcessor.from_pretrained(model_name_or_path, **load_kwargs)
            positions = model.config.text_config.max_position_embeddings
            state.update(model=model, tokenizer=tokenizer, image_processor=image_processor,
                         max_length=min(positions, tokenizer.model_max_length))
        return state

    @torch.no_grad()
    def reward(prompts: list[str], videos: Any, **dataset_columns: Any) -> list[float | None]:
        prompts = check_prompts(prompts)
        items = check_videos(videos, len(prompts))
        if not items:
            return []
        parts = load()
        model = parts["model"]
        target = device if device is not None else items[0].device
        if model.device != target:
            model.to(target)
        images, owners = [], []
        for index, video in enumerate(items):
            frames = to_uint8_frames(video[frame_indices(video.shape[0], num_frames)])
            if frames.shape[-1] == 1:
                frames = np.repeat(frames, 3, axis=-1)
            images.extend(frames)
            owners.extend([index] * len(frames))
        pixel_values = parts["image_processor"](
            images=images, return_tensors="pt", input_data_format="channels_last"
        ).pixel_values
        text = parts["tokenizer"](
            prompts, padding=True, truncation=True, max_length=parts["max_length"], return_tensors="pt"
        )
        out = model(
            input_ids=text["input_ids"].to(target),
            attention_mask=text["attention_mask"].to(target),
            pixel_values=pixel_values.to(target, model.dtype),
        )
        image_embeds = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        owners = torch.tensor(owners, device=image_embeds.device)
        cosine = (image_embeds * text_embeds[owners]).sum(-1)
        totals = torch.zeros(len(items), device=cosine.device).index_add_(0, owners, cosine)
        counts = torch.bincount(owners, minlength=len(items)).float()
        factor = float(model.logit_scale.float().exp()) if scale == "logit_scale" else float(scale)
        return [float(v) * factor for v in (totals / counts).cpu()]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = (
        f"CLIP score of {model_name_or_path}: mean over {num_frames or 'all'} evenly spaced frames of the cosine "
        f"similarity between the frame and prompt embeddings, times {scale}."
    )
    return reward
