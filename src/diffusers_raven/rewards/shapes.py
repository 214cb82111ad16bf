"""ShapesWorld reward functions: the analytic evaluator (:mod:`diffusers_raven.shapes.evaluator`) as rewards.

Every function has the TRL-style signature of DESIGN §3::

    fn(prompts: list[str], videos: Tensor[B, F, C, H, W] in [0, 1], **dataset_columns) -> list[float | None]

and returns None for a prompt that is not a ShapesWorld caption (the trainer then leaves that sample out of the
reward). All rewards lie in [0, 1], higher is better; ``fn.__name__`` is the metric key (``rewards/<name>/mean``).

- ``semantic_reward``: the evaluator's semantic accuracy (fraction of caption attributes matched).
- ``motion_reward``: per caption object ``max(0, cos(direction error)) * exp(-|speed - s| / s) * physics``, averaged
  over the caption's objects (0 for an object that was not found or does not move).
- ``fidelity_reward``: ``clip((PSNR - 10) / 30, 0, 1)`` (PSNR in dB against the re-rendered detected scene).
- ``shapes_reward``: ``0.5 semantic + 0.3 motion + 0.2 fidelity`` (:func:`make_shapes_reward` for other weights).

The evaluation of one (prompt, video) pair is cached by content, so combining several of these functions in one
trainer evaluates each video once.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..shapes import SPEEDS, evaluate_video, parse_caption, resolution_scale

__all__ = [
    "FIDELITY_PSNR_RANGE",
    "SHAPES_REWARD_WEIGHTS",
    "fidelity_reward",
    "make_shapes_reward",
    "motion_reward",
    "semantic_reward",
    "shapes_reward",
]

#: PSNR (dB) mapped linearly to fidelity reward 0 and 1 (clipped outside).
FIDELITY_PSNR_RANGE: tuple[float, float] = (10.0, 40.0)
#: Default weights of :func:`shapes_reward`.
SHAPES_REWARD_WEIGHTS: dict[str, float] = {"semantic": 0.5, "motion": 0.3, "fidelity": 0.2}

RewardFunc = Callable[..., list[float | None]]
_CACHE: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_CACHE_SIZE = 256


def _videos_to_numpy(videos: Any, batch_size: int) -> list[np.ndarray]:
    """``[B, F, C, H, W]`` tensor/array (or a list of ``[F, C, H, W]``) in [0, 1] -> list of ``[F, H, W, C]`` float32."""
    items = list(videos) if isinstance(videos, (list, tuple)) else [videos[i] for i in range(len(videos))]
    if len(items) != batch_size:
        raise ValueError(f"got {batch_size} prompts but {len(items)} videos")
    out = []
    for video in items:
        if hasattr(video, "detach"):
            video = video.detach().float().cpu().numpy()
        video = np.asarray(video, dtype=np.float32)
        if video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(f"each video must have shape [F, 3, H, W] (channels first), got {tuple(video.shape)}")
        out.append(np.ascontiguousarray(np.clip(video, 0.0, 1.0).transpose(0, 2, 3, 1)))
    return out


def _evaluate(prompt: str, video: np.ndarray) -> dict[str, Any]:
    key = (prompt, hashlib.blake2b(video.tobytes() + str(video.shape).encode(), digest_size=16).hexdigest())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    result = evaluate_video(video, prompt)
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _is_caption(prompt: Any) -> bool:
    try:
        parse_caption(prompt)
    except (ValueError, TypeError):
        return False
    return True


def _score(prompts: Sequence[str], videos: Any, score: Callable[[dict[str, Any], np.ndarray], float]):
    arrays = _videos_to_numpy(videos, len(prompts))
    return [
        float(score(_evaluate(prompt, video), video)) if _is_caption(prompt) else None
        for prompt, video in zip(prompts, arrays)
    ]


def _semantic(result: dict[str, Any], video: np.ndarray) -> float:
    return result["semantic_accuracy"]


def _motion(result: dict[str, Any], video: np.ndarray) -> float:
    scale = resolution_scale(video.shape[1], video.shape[2])
    per_object = []
    for obj in result["objects"]:
        detected = obj["detected"]
        if detected is None or detected["speed"] is None or obj.get("direction_error") is None:
            per_object.append(0.0)
            continue
        target = SPEEDS[obj["caption"]["speed"]] * scale
        direction = max(0.0, math.cos(math.radians(obj["direction_error"]))) if obj["direction_error"] < 90 else 0.0
        speed = math.exp(-abs(detected["speed"] - target) / target)
        physics = detected["physics"] if detected["physics"] is not None else 1.0
        per_object.append(direction * speed * physics)
    return float(np.mean(per_object)) if per_object else 0.0


def _fidelity(result: dict[str, Any], video: np.ndarray) -> float:
    lo, hi = FIDELITY_PSNR_RANGE
    return min(1.0, max(0.0, (result["psnr"] - lo) / (hi - lo)))


def semantic_reward(prompts: list[str], videos: Any, **dataset_columns: Any) -> list[float | None]:
    """Fraction of the caption's attributes (background, count, colour, shape, direction, speed) found in the video."""
    return _score(prompts, videos, _semantic)


def motion_reward(prompts: list[str], videos: Any, **dataset_columns: Any) -> list[float | None]:
    """Mean over caption objects of ``max(0, cos(direction error)) * exp(-relative speed error) * physics``."""
    return _score(prompts, videos, _motion)


def fidelity_reward(prompts: list[str], videos: Any, **dataset_columns: Any) -> list[float | None]:
    """PSNR against the re-rendered detected scene, mapped from [10, 40] dB to [0, 1]."""
    return _score(prompts, videos, _fidelity)


def make_shapes_reward(
    semantic: float = SHAPES_REWARD_WEIGHTS["semantic"],
    motion: float = SHAPES_REWARD_WEIGHTS["motion"],
    fidelity: float = SHAPES_REWARD_WEIGHTS["fidelity"],
    name: str = "shapes_reward",
) -> RewardFunc:
    """A weighted mean of the semantic, motion and fidelity rewards (weights are normalised to sum to 1)."""
    weights = {"semantic": semantic, "motion": motion, "fidelity": fidelity}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights.values())
    parts = {"semantic": _semantic, "motion": _motion, "fidelity": _fidelity}

    def combined(result: dict[str, Any], video: np.ndarray) -> float:
        return sum(weights[k] / total * parts[k](result, video) for k in parts if weights[k] > 0)

    def reward(prompts: list[str], videos: Any, **dataset_columns: Any) -> list[float | None]:
        return _score(prompts, videos, combined)

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"ShapesWorld reward: {semantic} semantic + {motion} motion + {fidelity} fidelity (normalised)."
    return reward


shapes_reward = make_shapes_reward()
