"""The ShapesWorld evaluation protocol of a causal video pipeline, shared by the model-chain recipes.

A pipeline (any object with ``CausalVideoPipeline``'s call signature, ``vae_scale_factor_temporal``,
``chunk_frames`` and ``latent_frames_for``) samples one video per held-out caption with its default few-step
sampler (no guidance, one seeded generator for the batch); :func:`~.evaluator.evaluate_batch` scores them with one
window per latent chunk, so long videos show per-chunk drift. ``torch`` is imported inside the functions only, to
keep :mod:`diffusers_raven.shapes` importable without it.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .evaluator import evaluate_batch
from .world import DIRECTIONS, SPEEDS, caption, resolution_scale, sample_scene

__all__ = [
    "SUMMARY_METRICS",
    "chunk_pixel_frames",
    "evaluate_pipeline",
    "evaluate_pipeline_lengths",
    "evaluator_fingerprint",
    "format_metric",
    "held_out_captions",
    "long_video_frames",
    "motion_summary",
    "sample_videos",
    "summarize_scores",
    "vae_round_trip",
]

#: The headline metrics of an evaluation (means over the videos; see ``METRIC_DESCRIPTIONS``).
SUMMARY_METRICS: tuple[str, ...] = (
    "semantic_accuracy", "psnr", "physics_accuracy", "speed_error", "direction_error", "consistency",
)
#: The metrics kept per chunk.
CHUNK_METRICS: tuple[str, ...] = ("semantic_accuracy", "psnr", "physics_accuracy")


def evaluator_fingerprint() -> str:
    """A short hash of the evaluator's and the world's source: stored with a cached evaluation, it makes a changed
    evaluator re-score instead of reusing figures it would no longer give."""
    digest = hashlib.sha256()
    for name in ("evaluator.py", "world.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


def _print(line: str) -> None:
    print(line, flush=True)


def held_out_captions(num_videos: int, seed: int, height: int, width: int) -> list[str]:
    """Captions of the test-split scenes ``sample_scene(seed + i, split="test")``, ``i < num_videos``."""
    return [caption(sample_scene(seed + i, split="test", height=height, width=width)) for i in range(num_videos)]


def chunk_pixel_frames(pipe) -> list[int]:
    """Pixel frames of the first latent chunk and of every later one (e.g. ``[9, 12]`` for 3-frame chunks)."""
    t, chunk = pipe.vae_scale_factor_temporal, pipe.chunk_frames
    return [1 + t * (chunk - 1), t * chunk]


def long_video_frames(pipe, num_frames: int, factor: int) -> int:
    """Output frames of a video with ``factor`` times the latent frames of a ``num_frames`` video."""
    return 1 + pipe.vae_scale_factor_temporal * (factor * pipe.latent_frames_for(num_frames) - 1)


def summarize_scores(result: dict[str, Any]) -> dict[str, Any]:
    """The headline means of an :func:`evaluate_batch` result and, per chunk, semantic accuracy, PSNR, physics."""
    per_chunk = [{"chunk": c["chunk"], **{k: c.get(k) for k in CHUNK_METRICS}} for c in result["per_chunk"]]
    return {**{k: result["mean"].get(k) for k in SUMMARY_METRICS}, "per_chunk": per_chunk}


def motion_summary(per_video: list[dict[str, Any]], height: int, width: int) -> dict[str, Any]:
    """How the matched objects of :func:`evaluate_batch` results (``return_per_video=True``) move, whatever their
    direction and speed scores: whether they move at all, at what speed per captioned speed class, and how well
    their velocity points along the captioned direction.

    Over the caption objects whose matched object has a measured speed (present and unoccluded in two frames):

    - ``num_objects``: how many such objects;
    - ``static_fraction``: the fraction slower than the evaluator's static threshold (no velocity, no direction);
    - ``speed_median``: per captioned class (``slow``, ``fast``), the median measured speed in px/frame at 64x64,
      beside the world's class speeds (``class_speeds``); equal medians mean the model ignores the speed words;
    - ``direction_cosine``: over the moving ones, the mean cosine between the measured velocity and the captioned
      direction: 1 when they follow the caption, 0 for directions unrelated to it, -1 when reversed.
    """
    scale = resolution_scale(height, width)
    speeds: dict[str, list[float]] = {name: [] for name in SPEEDS}
    cosines, static, measured = [], 0, 0
    for result in per_video:
        for obj in result.get("objects", []):
            detected = obj.get("detected")
            if detected is None or detected.get("speed") is None:
                continue
            measured += 1
            target = obj["caption"]
            speeds[target["speed"]].append(detected["speed"] / scale)
            velocity = detected.get("velocity")
            if velocity is None:  # the evaluator's static objects (below STATIC_SPEED) have no velocity
                static += 1
                continue
            dx, dy = DIRECTIONS[target["direction"]]
            cosines.append((velocity[0] * dx + velocity[1] * dy) / math.hypot(*velocity))
    return {
        "num_objects": measured,
        "static_fraction": static / measured if measured else None,
        "speed_median": {name: float(statistics.median(v)) if v else None for name, v in speeds.items()},
        "class_speeds": dict(SPEEDS),
        "direction_cosine": sum(cosines) / len(cosines) if cosines else None,
    }


def format_metric(value: float | None, digits: int = 3) -> str:
    """A metric for printing (the evaluator gives None for an undefined value)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def sample_videos(pipe, captions: list[str], num_frames: int, height: int, width: int, seed: int,
                  max_sequence_length: int) -> list[Any]:
    """One video per caption from the pipeline's default sampler (one generator seeded by ``seed`` for the batch):
    float ``[F, H, W, 3]`` arrays in [0, 1]."""
    import torch

    with torch.no_grad():
        return list(pipe(captions, num_frames=num_frames, height=height, width=width,
                         generator=torch.Generator().manual_seed(seed), max_sequence_length=max_sequence_length,
                         output_type="np").frames)


def vae_round_trip(vae, videos: list[Any]) -> list[Any]:
    """Each uint8 ``[F, H, W, 3]`` video encoded to the VAE's posterior mode and decoded: float arrays in [0, 1]
    (what any model generating in that latent space can at best reproduce)."""
    import torch

    out = []
    with torch.no_grad():
        for video in videos:
            x = torch.from_numpy(video).float().div(255).permute(3, 0, 1, 2)[None] * 2 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            out.append(((y[0].permute(1, 2, 3, 0) + 1) / 2).numpy())
    return out


def evaluate_pipeline(pipe, captions: list[str], num_frames: int, height: int, width: int, seed: int,
                      max_sequence_length: int) -> dict[str, Any]:
    """Sample ``captions`` with the pipeline's default sampler (generator seeded by ``seed``) and score them per
    chunk: ``{"num_frames", <SUMMARY_METRICS>, "per_chunk", "seconds"}``."""
    start = time.perf_counter()
    videos = sample_videos(pipe, captions, num_frames, height, width, seed, max_sequence_length)
    scores = evaluate_batch(videos, captions, chunk_frames=chunk_pixel_frames(pipe))
    return {"num_frames": num_frames, **summarize_scores(scores), "seconds": round(time.perf_counter() - start, 1)}


def evaluate_pipeline_lengths(pipe, captions: list[str], num_frames: int, long_frames: int, height: int, width: int,
                              seed: int, max_sequence_length: int,
                              log: Callable[[str], Any] | None = _print) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_pipeline` at the training length (``"train_length"``) and at ``long_frames`` (``"long"``),
    with a one-line report of each through ``log`` (None: silent)."""
    out = {}
    for name, frames in (("train_length", num_frames), ("long", long_frames)):
        out[name] = result = evaluate_pipeline(pipe, captions, frames, height, width, seed, max_sequence_length)
        if log is not None:
            chunks = " ".join(format_metric(c["semantic_accuracy"], 2) for c in result["per_chunk"])
            log(f"  {name} ({frames} frames): semantic {format_metric(result['semantic_accuracy'])} psnr "
                f"{format_metric(result['psnr'], 2)} physics {format_metric(result['physics_accuracy'])}; semantic "
                f"per chunk [{chunks}] ({result['seconds']:.0f} s)")
    return out
