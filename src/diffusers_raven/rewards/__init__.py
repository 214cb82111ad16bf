"""Reward functions with the TRL-style signature of DESIGN §3.

``fn(prompts: list[str], videos: Tensor[B, F, C, H, W] in [0, 1], **dataset_columns) -> list[float | None]``;
None means "no score for this sample" (it is left out). ``fn.__name__`` is the metric key (``rewards/<name>/mean``).

ShapesWorld (analytic, from :mod:`diffusers_raven.shapes`): :func:`semantic_reward`, :func:`motion_reward`,
:func:`fidelity_reward` and their weighted combination :func:`shapes_reward` (:func:`make_shapes_reward`).
"""

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
    "fidelity_reward",
    "make_shapes_reward",
    "motion_reward",
    "semantic_reward",
    "shapes_reward",
]
