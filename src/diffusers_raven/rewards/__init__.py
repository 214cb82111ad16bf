"""Reward functions with the TRL-style signature of DESIGN §3.

``fn(prompts: list[str], videos: Tensor[B, F, C, H, W] in [0, 1], **dataset_columns) -> list[float | None]``;
None means "no score for this sample" (it is left out). ``fn.__name__`` is the metric key (``rewards/<name>/mean``).

ShapesWorld (analytic, from :mod:`diffusers_raven.shapes`): :func:`semantic_reward`, :func:`motion_reward`,
:func:`fidelity_reward` and their weighted combination :func:`shapes_reward` (:func:`make_shapes_reward`).

Any video: :func:`dynamic_degree_reward` (optical-flow motion, OpenCV; :func:`make_motion_reward` for other settings)
and :func:`make_clip_reward` (CLIP text-video similarity with a ``transformers`` CLIP checkpoint).
"""

from .clip_score import frame_indices, make_clip_reward
from .optical_flow import dynamic_degree_reward, make_motion_reward, top_flow_magnitude
from .shapes import (
    FIDELITY_PSNR_RANGE,
    SHAPES_REWARD_WEIGHTS,
    fidelity_reward,
    make_shapes_reward,
    motion_reward,
    semantic_reward,
    shapes_reward,
)

__all__ = [
    "FIDELITY_PSNR_RANGE",
    "SHAPES_REWARD_WEIGHTS",
    "dynamic_degree_reward",
    "fidelity_reward",
    "frame_indices",
    "make_clip_reward",
    "make_motion_reward",
    "make_shapes_reward",
    "motion_reward",
    "semantic_reward",
    "shapes_reward",
    "top_flow_magnitude",
]
