"""Motion reward ("dynamic degree", METHOD §8): how much a video moves, measured by dense optical flow.

For every pair of consecutive frames, OpenCV's Farneback flow (``cv2.calcOpticalFlowFarneback``) is computed on the
8-bit grey frames; the pair's score is the mean of the largest ``top_fraction`` (5 %) of the per-pixel flow magnitudes
(:func:`top_flow_magnitude`), so a small moving object counts as much as a moving camera; the video's reward is the
mean over its pairs. Higher means more motion; a static video scores 0.

Units: pixels per frame, measured at a frame whose shorter side is ``reference_size`` pixels (64 by default): the
magnitudes of an ``H x W`` video are multiplied by ``reference_size / min(H, W)``, so the same scene moving the same
fraction of the frame scores the same at 64x64 and at 480x832 (a 480x832 video moving 15 px per frame scores 2).
``reference_size=None`` reports raw pixels per frame of the video itself.

The frames are converted to 8 bits on the videos' device; OpenCV then works on CPU copies. The caller's tensors are
neither modified nor moved. OpenCV (``opencv-python-headless``, in the ``training`` and ``tests`` extras) is imported
when a reward is first called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._inputs import check_prompts, check_videos, to_uint8_frames

__all__ = ["dynamic_degree_reward", "make_motion_reward", "top_flow_magnitude"]

RewardFunc = Callable[..., list[float | None]]


def _import_cv2():
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            "The optical-flow motion reward needs OpenCV: `pip install opencv-python-headless` "
            "(or `pip install 'diffusers-raven[training]'`)."
        ) from error
    return cv2


def top_flow_magnitude(flow: Any, top_fraction: float = 0.05) -> float:
    """Mean of the largest ``top_fraction`` of the magnitudes of a flow field ``[H, W, 2]`` (x, y displacements).

    The ``ceil(top_fraction * H * W)`` largest magnitudes are averaged (at least one)."""
    _check_fraction(top_fraction)
    flow = np.asarray(flow.detach().cpu() if hasattr(flow, "detach") else flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[-1] != 2 or flow.shape[0] < 1 or flow.shape[1] < 1:
        raise ValueError(f"`flow` must have shape [H, W, 2], got {flow.shape}.")
    magnitudes = np.hypot(flow[..., 0], flow[..., 1]).ravel()
    if not np.isfinite(magnitudes).all():
        raise ValueError("`flow` holds NaN or infinite values.")
    count = magnitudes.size
    k = min(count, max(1, math.ceil(top_fraction * count - 1e-9)))
    return float(np.partition(magnitudes, count - k)[count - k :].mean())


def _check_fraction(top_fraction: float) -> None:
    if isinstance(top_fraction, bool) or not isinstance(top_fraction, (int, float)) or not 0 < top_fraction <= 1:
        raise ValueError(f"`top_fraction` must be a number in (0, 1], got {top_fraction!r}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def make_motion_reward(
    top_fraction: float = 0.05,
    reference_size: float | None = 64,
    *,
    pyr_scale: float = 0.5,
    levels: int = 3,
    winsize: int = 15,
    iterations: int = 3,
    poly_n: int = 5,
    poly_sigma: float = 1.2,
    gaussian_window: bool = False,
    name: str = "dynamic_degree_reward",
) -> RewardFunc:
    """A dynamic-degree reward with the given settings (see the module docstring for the definition).

    Args:
        top_fraction: fraction of the per-pixel flow magnitudes of a frame pair that is averaged (the largest ones).
        reference_size: the magnitudes are reported in pixels at a frame whose shorter side is this many pixels
            (``magnitude * reference_size / min(H, W)``); ``None`` keeps the video's own pixels.
        pyr_scale, levels, winsize, iterations, poly_n, poly_sigma: ``cv2.calcOpticalFlowFarneback``'s parameters
            (scale between pyramid levels, number of levels, averaging window, iterations per level, polynomial
            neighbourhood 5 or 7, its Gaussian sigma).
        gaussian_window: use Farneback's Gaussian window instead of the box filter (``OPTFLOW_FARNEBACK_GAUSSIAN``).
        name: the function's ``__name__``, i.e. the metric key ``rewards/<name>/mean``; give each setting its own.

    Returns:
        ``fn(prompts, videos, **dataset_columns) -> list[float]``, one score per video (prompts are not read).
    """
    _check_fraction(top_fraction)
    if reference_size is not None and (
        isinstance(reference_size, bool) or not isinstance(reference_size, (int, float)) or not reference_size > 0
    ):
        raise ValueError(f"`reference_size` must be a positive number of pixels or None, got {reference_size!r}.")
    if isinstance(pyr_scale, bool) or not isinstance(pyr_scale, (int, float)) or not 0 < pyr_scale < 1:
        raise ValueError(f"`pyr_scale` must be in (0, 1), got {pyr_scale!r}.")
    _check_int("levels", levels, 1)
    _check_int("winsize", winsize, 1)
    _check_int("iterations", iterations, 1)
    if poly_n not in (5, 7) or isinstance(poly_n, bool):
        raise ValueError(f"`poly_n` must be 5 or 7 (the neighbourhoods OpenCV supports), got {poly_n!r}.")
    if isinstance(poly_sigma, bool) or not isinstance(poly_sigma, (int, float)) or not poly_sigma > 0:
        raise ValueError(f"`poly_sigma` must be a positive number, got {poly_sigma!r}.")
    if not isinstance(gaussian_window, bool):
        raise ValueError(f"`gaussian_window` must be True or False, got {gaussian_window!r}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")

    def video_score(video, cv2) -> float:
        frames = to_uint8_frames(video)
        if frames.shape[-1] == 3:
            grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
        else:
            grey = [np.ascontiguousarray(frame[..., 0]) for frame in frames]
        flags = cv2.OPTFLOW_FARNEBACK_GAUSSIAN if gaussian_window else 0
        scale = 1.0 if reference_size is None else reference_size / min(frames.shape[1], frames.shape[2])
        scores = []
        for previous, current in zip(grey[:-1], grey[1:]):
            flow = cv2.calcOpticalFlowFarneback(
                previous, current, None, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags
            )
            scores.append(top_flow_magnitude(flow, top_fraction) * scale)
        return float(np.mean(scores))

    def reward(prompts: list[str], videos: Any, **dataset_columns: Any) -> list[float | None]:
        prompts = check_prompts(prompts)
        items = check_videos(videos, len(prompts), min_frames=2)
        if not items:
            return []
        cv2 = _import_cv2()
        return [video_score(video, cv2) for video in items]

    reward.__name__ = reward.__qualname__ = name
    units = "raw pixels" if reference_size is None else f"pixels at a {reference_size:g}-pixel shorter side"
    reward.__doc__ = (
        f"Dynamic degree: mean over consecutive frame pairs of the mean of the top {top_fraction:g} of the Farneback "
        f"optical-flow magnitudes, in {units} per frame."
    )
    return reward


dynamic_degree_reward = make_motion_reward()
