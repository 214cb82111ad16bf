"""Validate the ShapesWorld evaluator: ground-truth videos must score perfectly, graded corruptions must lower the
metric they corrupt, monotonically.

    python benchmarks/eval_validation.py            # ~2 minutes on 2 CPU cores
    python benchmarks/eval_validation.py --quick    # fewer seeds

Writes ``benchmarks/results/eval_validation.json``; ``docs/shapesworld.md`` quotes its numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from diffusers_raven.shapes import (  # noqa: E402
    DIRECTIONS,
    caption,
    evaluate_batch,
    evaluate_video,
    render_video,
    sample_scene,
)

# ---------------------------------------------------------------------------------------------------- config
SEEDS = 48  # scenes per setting (seeds 0..SEEDS-1)
NUM_FRAMES = 21  # training length of the default model (6 latent frames)
GROUND_TRUTH_SETTINGS = [  # (num_objects, height, width, num_frames)
    (1, 64, 64, 21),
    (2, 64, 64, 21),
    (1, 64, 64, 81),
    (2, 64, 64, 81),
    (1, 96, 96, 21),
    (2, 128, 96, 21),
    (1, 32, 32, 21),
]
NOISE_SIGMAS = [0.0, 0.02, 0.05, 0.1, 0.2]
BLUR_SIGMAS = [0.0, 0.5, 1.0, 1.5, 2.0]  # Gaussian blur std in px
HUE_DEGREES = [0, 10, 20, 30, 45, 60]
FROZEN_FRAMES = [0, 2, 4, 6, 8, 10]  # last k frames replaced by frame F-1-k
DRIFT_FRAMES, DRIFT_CHUNK = 84, 21  # long video, 4 chunks of the training length
DRIFT_NOISE_PER_CHUNK = [0.0, 0.03, 0.06, 0.09]  # noise growing chunk by chunk (a simulated drifting generator)


# ---------------------------------------------------------------------------------------------------- corruptions
def to_float(video: np.ndarray) -> np.ndarray:
    return video.astype(np.float32) / 255.0


def add_noise(video: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(to_float(video) + rng.normal(0.0, sigma, video.shape).astype(np.float32), 0.0, 1.0)


def blur(video: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of every frame (edge padding)."""
    v = to_float(video)
    if sigma <= 0:
        return v
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(v, pad, mode="edge")
        v = sum(w * np.take(padded, np.arange(i, i + v.shape[axis]), axis=axis) for i, w in enumerate(kernel)).astype(
            np.float32
        )
    return v


def hue_rotate(video: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate every colour about the grey axis of RGB space (a linear hue rotation; greys are unchanged)."""
    theta = math.radians(degrees)
    axis = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1 - math.cos(theta)) * np.outer(axis, axis)
    return np.clip(to_float(video) @ rot.T.astype(np.float32), 0.0, 1.0)


def freeze_last(video: np.ndarray, k: int) -> np.ndarray:
    """The last ``k`` frames repeat frame ``F - 1 - k`` (the video stops moving)."""
    out = video.copy()
    if k > 0:
        out[-k:] = video[-k - 1]
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def scenes(num_objects: int | None, height: int = 64, width: int = 64, seeds: int = SEEDS) -> list[Any]:
    return [sample_scene(seed, num_objects=num_objects, height=height, width=width) for seed in range(seeds)]


def mean_metrics(videos: list[np.ndarray], captions: list[str], keys: list[str], chunk_frames=None) -> dict:
    result = evaluate_batch(videos, captions, chunk_frames=chunk_frames)
    return {k: result["mean"][k] for k in keys} | ({"per_chunk": result["per_chunk"]} if chunk_frames else {})


def sweep(name: str, levels: list, corrupt, sampled: list, keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for level in levels:
        videos = [corrupt(render_video(s, NUM_FRAMES), level, i) for i, s in enumerate(sampled)]
        rows.append({name: level, **mean_metrics(videos, [caption(s) for s in sampled], keys)})
    print_table([name, *keys], [[r[name], *(r[k] for k in keys)] for r in rows])
    return rows


def is_monotone(values: list[float], increasing: bool, strict: bool) -> bool:
    pairs = list(zip(values, values[1:]))
    if increasing:
        return all(b > a if strict else b >= a for a, b in pairs)
    return all(b < a if strict else b <= a for a, b in pairs)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    global SEEDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 seeds per setting instead of 48")
    args = parser.parse_args()
    if args.quick:
        SEEDS = 12
    started = time.perf_counter()
    results: dict[str, Any] = {"config": {"seeds": SEEDS, "num_frames": NUM_FRAMES}}

    print("== ground truth (render_video of sampled scenes)")
    gt_keys = [
        "semantic_accuracy",
        "color_accuracy",
        "shape_accuracy",
        "direction_accuracy",
        "speed_accuracy",
        "count_accuracy",
        "speed_error",
        "direction_error",
        "physics_accuracy",
        "psnr",
        "consistency",
    ]
    rows = []
    for n, h, w, f in GROUND_TRUTH_SETTINGS:
        sampled = scenes(n, h, w)
        t0 = time.perf_counter()
        videos = [render_video(s, f) for s in sampled]
        metrics = mean_metrics(videos, [caption(s) for s in sampled], gt_keys)
        seconds = (time.perf_counter() - t0) / len(sampled)
        rows.append(
            {"num_objects": n, "height": h, "width": w, "num_frames": f, **metrics, "seconds_per_video": seconds}
        )
    print_table(
        ["objects", "HxW", "F", "semantic", "physics", "psnr", "speed_err", "dir_err", "consist", "s/video"],
        [
            [
                r["num_objects"],
                f"{r['height']}x{r['width']}",
                r["num_frames"],
                r["semantic_accuracy"],
                r["physics_accuracy"],
                r["psnr"],
                r["speed_error"],
                r["direction_error"],
                r["consistency"],
                r["seconds_per_video"],
            ]
            for r in rows
        ],
    )
    results["ground_truth"] = rows

    sampled = scenes(None)
    checks = {}
    print("\n== Gaussian noise -> fidelity")
    rows = sweep(
        "noise_sigma", NOISE_SIGMAS, lambda v, s, i: add_noise(v, s, i), sampled, ["psnr", "semantic_accuracy"]
    )
    results["noise"] = rows
    checks["noise_psnr_decreasing"] = is_monotone([r["psnr"] for r in rows], increasing=False, strict=True)

    print("\n== Gaussian blur -> fidelity")
    rows = sweep("blur_sigma", BLUR_SIGMAS, lambda v, s, i: blur(v, s), sampled, ["psnr", "semantic_accuracy"])
    results["blur"] = rows
    checks["blur_psnr_decreasing"] = is_monotone([r["psnr"] for r in rows], increasing=False, strict=True)

    print("\n== hue rotation -> colour accuracy")
    rows = sweep(
        "hue_degrees",
        HUE_DEGREES,
        lambda v, d, i: hue_rotate(v, d),
        sampled,
        ["color_accuracy", "semantic_accuracy", "shape_accuracy", "psnr"],
    )
    results["hue"] = rows
    colour = [r["color_accuracy"] for r in rows]
    checks["hue_color_accuracy_nonincreasing"] = is_monotone(colour, increasing=False, strict=False)
    checks["hue_color_accuracy_drops"] = colour[-1] < colour[0]

    print("\n== frozen last frames -> motion")
    rows = sweep(
        "frozen_frames",
        FROZEN_FRAMES,
        lambda v, k, i: freeze_last(v, k),
        sampled,
        ["speed_error", "speed", "physics_accuracy", "direction_accuracy", "psnr"],
    )
    results["frozen"] = rows
    checks["frozen_speed_error_increasing"] = is_monotone(
        [r["speed_error"] for r in rows], increasing=True, strict=True
    )

    print("\n== wrong direction")
    horizontal = [s for s in scenes(1, seeds=4 * SEEDS) if s.objects[0].direction in ("left", "right")][:SEEDS]
    caps = [caption(s) for s in horizontal]
    keys = ["direction_accuracy", "direction_error", "semantic_accuracy"]
    original = [render_video(s, NUM_FRAMES) for s in horizontal]
    rows = [
        {"variant": "original", **mean_metrics(original, caps, keys)},
        {"variant": "mirrored (left-right flip)", **mean_metrics([v[:, :, ::-1] for v in original], caps, keys)},
    ]
    all_scenes = scenes(None)
    all_videos = [render_video(s, NUM_FRAMES) for s in all_scenes]
    all_caps = [caption(s) for s in all_scenes]
    rows.append({"variant": "original (all directions)", **mean_metrics(all_videos, all_caps, keys)})
    rows.append(
        {"variant": "time-reversed (all directions)", **mean_metrics([v[::-1] for v in all_videos], all_caps, keys)}
    )
    print_table(["variant", *keys], [[r["variant"], *(r[k] for k in keys)] for r in rows])
    results["direction"] = rows
    checks["mirror_direction_drops"] = rows[1]["direction_accuracy"] < rows[0]["direction_accuracy"]
    checks["reverse_direction_drops"] = rows[3]["direction_accuracy"] < rows[2]["direction_accuracy"]

    print(f"\n== drift: {DRIFT_FRAMES}-frame videos, chunks of {DRIFT_CHUNK} frames")
    long_scenes = scenes(None, seeds=max(8, SEEDS // 2))
    long_caps = [caption(s) for s in long_scenes]
    clean = [render_video(s, DRIFT_FRAMES) for s in long_scenes]
    keys = ["semantic_accuracy", "psnr", "physics_accuracy", "speed_error"]
    gt = evaluate_batch(clean, long_caps, chunk_frames=DRIFT_CHUNK)
    drifting = []
    for i, v in enumerate(clean):
        noisy = to_float(v)
        for k, sigma in enumerate(DRIFT_NOISE_PER_CHUNK):
            part = slice(k * DRIFT_CHUNK, (k + 1) * DRIFT_CHUNK)
            noisy[part] = add_noise(v[part], sigma, seed=1000 * i + k)
        drifting.append(noisy)
    drift = evaluate_batch(drifting, long_caps, chunk_frames=DRIFT_CHUNK)
    print_table(
        ["chunk", *(f"gt {k}" for k in keys), "noisy psnr"],
        [[c["chunk"], *(c[k] for k in keys), d["psnr"]] for c, d in zip(gt["per_chunk"], drift["per_chunk"])],
    )
    results["drift"] = {
        "ground_truth": gt["per_chunk"],
        "growing_noise": drift["per_chunk"],
        "noise_per_chunk": DRIFT_NOISE_PER_CHUNK,
    }
    checks["drift_gt_flat"] = all(c["semantic_accuracy"] >= 0.99 for c in gt["per_chunk"])
    checks["drift_noise_psnr_decreasing"] = is_monotone([c["psnr"] for c in drift["per_chunk"]], False, True)

    # one example result, to show the format
    example = sample_scene(3, num_objects=2)
    results["example"] = {
        "caption": caption(example),
        "result": evaluate_video(render_video(example, 42), caption(example), chunk_frames=21),
    }

    print("\n== checks")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    results["checks"] = checks
    results["directions"] = list(DIRECTIONS)
    write_results("eval_validation", results, started)


if __name__ == "__main__":
    main()
