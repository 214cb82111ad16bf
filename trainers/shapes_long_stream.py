"""Stream ShapesWorld models for thousands of frames and score every chunk with the evaluator.

    nice -n 10 env OMP_NUM_THREADS=1 python trainers/shapes_long_stream.py \\
        --pipeline bundled=bundled --pipeline cmgrpo=out/grpo/consistency/pipeline \\
        --latent_frames 1200 --captions 3 \\
        --output docs/experiments/shapesworld/results/shapes_long_stream.json \\
        --plot docs/experiments/shapesworld/images/shapes_long_stream.png \\
        --frames_plot docs/experiments/shapesworld/images/shapes_long_stream_frames.png

    # later: add a model to the same JSON (same prompts, seed and stream settings) and redraw both figures
    python trainers/shapes_long_stream.py --append --pipeline kvpo=out/kvpo/single/pipeline ...

Every ``--pipeline name=folder`` (``bundled``: the package's bundled model) streams all prompts as one batch for
``--latent_frames`` latent frames (1,200 = 4,797 frames) with a windowed KV cache (``--window_frames`` 12,
``--sink_frames`` 3, relative RoPE), one seeded generator, the default few-step sampler. The stream decodes chunk by
chunk (the pipeline's streaming VAE decoder) and keeps only uint8 frames, so memory is bounded by the frames kept
(60 MB per prompt at 4,797 frames of 64x64). The prompts, each with a ShapesWorld scene as ground truth:

- ``example``: the issue's example, a blue square (half-extent 9 px, starting at the centre) moving slowly left on
  a gray background, prompted with its ShapesWorld caption;
- ``example_as_typed``: the same scene prompted as a new user types it, ``--example_prompt`` ("a blue square moving
  left": no speed, no background; ``''`` leaves it out). It is scored against the same scene, so its speed score
  (against "slowly") is not a fair attribute;
- ``held_out_<i>``: ``--captions`` held-out scenes ``sample_scene(eval_seed + i, split="test")``, the first of the
  held-out captions of ``trainers/shapes_eval_chain.py``.

Scoring (per prompt and per chunk of ``[9, 12, 12, ...]`` frames, the pixel frames of a 3-latent-frame chunk): the
evaluator's ``evaluate_video`` over the whole stream (detection per block of frames, so memory stays bounded; then
tracking and motion unfolding over the whole stream, exactly as ``evaluate_video`` does: a chunk's direction is its
motion unfolded back to frame 0), giving per chunk the semantic accuracy and its parts, physics, the evaluator's
PSNR (against a re-render of the detected scene) and consistency; plus, against the ground-truth scene:

- ``object_area_ratio``: the matched caption object's area (the evaluator's size and shape: median over the chunk's
  unoccluded frames; an object touching other blobs in every frame of the chunk falls back to its whole track's, so
  in cluttered videos this ratio stops following the chunk) over the scene object's area (mean over caption
  objects; None when none is matched);
- ``largest_area``: median over the chunk's frames of the largest detected object's area (px, reference-free,
  per frame); ``largest_area_ratio``: that over the area of the scene's largest object (what the swelling onsets
  use; the largest detection may be another blob than the caption's object);
- ``background_distance``: RGB distance (in [0, 1] units) between the detected background (median of the border
  pixels, mean over the chunk) and the scene's background colour; ``background_fraction``: the fraction of pixels
  within the evaluator's foreground threshold (0.2) of the scene's background colour (ground truth: 1 minus the
  objects' area); ``foreground_fraction``: the evaluator's foreground (pixels farther than 0.2 from the detected
  background); ``off_background_colour`` / ``off_background_fraction``: the named colour (palette and backgrounds)
  most pixels farther than 0.2 from the scene's background are nearest to, and the fraction of the frame they cover;
- ``psnr_truth``: PSNR (dB, capped at 50) against ``render_video`` of the scene. The world is closed form (a
  triangle wave per axis), so ground truth exists at every frame, but the caption fixes neither the object's start
  nor its size: a correct model draws its own, so this PSNR mixes fidelity with a position lottery;
  ``psnr_placed``: PSNR against the scene rendered with the caption's background and the scene's objects (colour,
  shape, size) placed at the detected positions (per frame, the largest detected objects, assigned to the scene's
  objects by colour then shape): fidelity to the caption's appearance wherever the model put the objects.

Onsets (``onsets``, per prompt and for the mean over prompts): the first frame where the centred running mean over
``--smooth`` chunks crosses a threshold: ``background`` (the evaluator's background accuracy below 0.5; it names the
nearest of the four backgrounds, so a green background still reads as gray), ``background_colour`` (background
distance above 0.2), ``background_fraction`` (below 0.5 of the frame), ``swelling`` (object area ratio above 2),
``growth`` (object area ratio 1.5 times its level in the first 21 frames, the training length), ``semantic`` (0.15
below its level in the first 21 frames); None when it never does.

Writes ``--output`` (JSON: per model, per prompt, per chunk, columnar), ``--plot`` (per-chunk scores against frame
index, running means; one colour per model: solid the mean over the captioned prompts, dashed the example, dotted the
example as typed) and ``--frames_plot`` (the two example prompts of every model at ``--frame_indices``; the frames
are also kept in the JSON as PNG, so ``--append`` can redraw the strip with earlier models).
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np
import torch

from diffusers_raven import CausalVideoPipeline
from diffusers_raven.pipelines.presets import BUNDLED_MODEL_DIR
from diffusers_raven.shapes import (
    BACKGROUNDS,
    COLORS,
    ObjectSpec,
    Scene,
    caption,
    chunk_pixel_frames,
    compose_frame,
    detect_video,
    evaluator_fingerprint,
    is_held_out,
    render_frame,
    resolution_scale,
    sample_scene,
    trajectory,
)
from diffusers_raven.shapes.evaluator import (  # the evaluator's own steps, so the scores are evaluate_video's
    FG_THRESHOLD,
    _chunk_bounds,
    _mode,
    _motion,
    _psnr,
    _rerender,
    _shape_area,
    _track,
    _window_metrics,
)

#: The issue's example: "a blue square moving left" on a gray background (size and start chosen here).
EXAMPLE_SCENE = dict(background="gray", objects=[dict(shape="square", color="blue", size=9.0, x0=32.0, y0=32.0,
                                                      direction="left", speed="slow")])
EXAMPLE_PROMPT = "a blue square moving left"

#: Evaluator metrics kept per chunk.
EVALUATOR_METRICS = ("semantic_accuracy", "background_accuracy", "count_accuracy", "color_accuracy",
                     "shape_accuracy", "direction_accuracy", "speed_accuracy", "physics_accuracy", "psnr",
                     "consistency", "num_objects", "speed", "speed_error", "direction_error")
#: Metrics of this script (reference-based unless said otherwise).
EXTRA_METRICS = ("object_area_ratio", "largest_area", "largest_area_ratio", "background_distance", "background_fraction",
                 "foreground_fraction", "off_background_fraction", "psnr_truth", "psnr_placed")
CHUNK_METRICS = EVALUATOR_METRICS + EXTRA_METRICS
#: Per-chunk strings (not averaged).
CHUNK_LABELS = ("background", "off_background_colour")

#: Named colours a pixel far from the scene's background is attributed to.
_NAMES = list(COLORS) + [f"{b} (background)" for b in BACKGROUNDS]
_NAME_RGB = np.asarray(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32) / 255.0

TRAINING_FRAMES = 21
ONSET_RULES = {  # metric, kind, value: "below"/"above" a threshold, "drop" by / "grow" by a factor over the level
    # of the first 21 frames (the training length)
    "background": ("background_accuracy", "below", 0.5),
    "background_colour": ("background_distance", "above", FG_THRESHOLD),
    "background_fraction": ("background_fraction", "below", 0.5),
    "swelling": ("largest_area_ratio", "above", 2.0),
    "growth": ("largest_area_ratio", "grow", 1.5),
    "semantic": ("semantic_accuracy", "drop", 0.15),
}


# ------------------------------------------------------------------------------------------------ prompts
def build_prompts(num_held_out: int, eval_seed: int, height: int, width: int,
                  example_prompt: str | None) -> list[dict[str, Any]]:
    """The streamed prompts: ``name``, ``prompt`` (what the model reads), ``scene`` (the ground truth), ``caption``
    (the scene's caption, what the evaluator scores against) and ``in_mean`` (captioned prompts only)."""
    scale = resolution_scale(height, width)
    spec = dict(EXAMPLE_SCENE)
    spec["objects"] = [ObjectSpec(**{**o, "size": o["size"] * scale, "x0": width / 2, "y0": height / 2})
                       for o in spec["objects"]]
    example = Scene(**spec, height=height, width=width)
    entries = [("example", caption(example), example, True)]
    if example_prompt:
        entries.append(("example_as_typed", example_prompt, example, False))
    for i in range(num_held_out):
        scene = sample_scene(eval_seed + i, split="test", height=height, width=width)
        entries.append((f"held_out_{i}", caption(scene), scene, True))
    return [{"name": name, "prompt": prompt, "caption": caption(scene), "scene": scene.to_dict(),
             "held_out": is_held_out(scene), "in_mean": in_mean} for name, prompt, scene, in_mean in entries]


def scene_of(entry: dict[str, Any]) -> Scene:
    return Scene(**entry["scene"])


# ------------------------------------------------------------------------------------------------ streaming
def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 (rounded), as a saved video would be."""
    return np.clip(np.rint(np.asarray(frames, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def stream_videos(pipe, prompts: list[str], latent_frames: int, height: int, width: int, window_frames: int,
                  sink_frames: int, rope: str, seed: int, max_sequence_length: int,
                  log=print) -> tuple[np.ndarray, dict[str, float]]:
    """Stream ``prompts`` as one batch for ``latent_frames`` latent frames, chunk by chunk (each chunk decoded by the
    pipeline's streaming decoder as it is made); uint8 ``[B, F, H, W, 3]`` and timings."""
    num_frames = 1 + pipe.vae_scale_factor_temporal * (latent_frames - 1)
    videos = np.empty((len(prompts), num_frames, height, width, 3), dtype=np.uint8)
    stream = pipe.stream(prompts, num_frames=num_frames, height=height, width=width, window_frames=window_frames,
                         sink_frames=sink_frames, rope=rope, generator=torch.Generator().manual_seed(seed),
                         max_sequence_length=max_sequence_length, output_type="np")
    start = time.perf_counter()
    end = num_chunks = 0
    for chunk in stream:
        num_chunks += 1
        n = chunk.frames.shape[1]
        videos[:, chunk.frame_start:chunk.frame_start + n] = to_uint8(chunk.frames)
        end = chunk.frame_start + n
        if log is not None and chunk.chunk_index % 50 == 0:
            log(f"  chunk {chunk.chunk_index}: frames {chunk.frame_start}..{end - 1} "
                f"({time.perf_counter() - start:.0f} s)")
    if end != num_frames:
        raise RuntimeError(f"the stream ended at frame {end}, expected {num_frames}")
    seconds = time.perf_counter() - start
    return videos, {"stream_seconds": round(seconds, 1), "num_chunks": num_chunks,
                    "seconds_per_chunk": round(seconds / num_chunks, 4)}


# ------------------------------------------------------------------------------------------------ scoring
def _placed_frame(scene: Scene, objects: list, height: int, width: int) -> np.ndarray:
    """The scene's background and objects at the positions of the frame's largest detections (assigned to the
    scene's objects by colour, then shape, then area order); unmatched scene objects are left out."""
    candidates = sorted(objects, key=lambda o: -o.area)[: len(scene.objects)]
    best, best_key = [], None
    slots = list(range(len(candidates))) + [None] * len(scene.objects)
    for perm in itertools.permutations(range(len(slots)), len(scene.objects)):
        pairs = [(obj, candidates[slots[p]]) for obj, p in zip(scene.objects, perm) if slots[p] is not None]
        key = (len(pairs), sum(o.color == d.color for o, d in pairs), sum(o.shape == d.shape for o, d in pairs))
        if best_key is None or key > best_key:
            best, best_key = pairs, key
    drawn = [(o.shape, np.asarray(COLORS[o.color]) / 255.0, d.x, d.y, o.size) for o, d in best]
    return compose_frame(np.asarray(BACKGROUNDS[scene.background]) / 255.0, drawn, height, width)


def score_video(video: np.ndarray, scene: Scene, chunk_frames, block: int = 240) -> dict[str, Any]:
    """Score a uint8 ``[F, H, W, 3]`` video against ``scene``: the evaluator's metrics over the whole video and per
    chunk (what ``evaluate_video(video, scene, chunk_frames)`` gives, with detection run ``block`` frames at a time)
    plus the ground-truth metrics of the module docstring. Returns ``{"whole": {...}, "chunks": [{...}, ...]}``."""
    num_frames, height, width, _ = video.shape
    scale = resolution_scale(height, width)
    target = {"background": scene.background,
              "objects": [{"shape": o.shape, "color": o.color, "direction": o.direction, "speed": o.speed}
                          for o in scene.objects]}
    scene_bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) / 255.0
    truth_positions = trajectory(scene, num_frames)
    names = [i for i, n in enumerate(_NAMES) if n != f"{scene.background} (background)"]

    detections = []
    per_frame = {k: np.zeros(num_frames) for k in ("largest_area", "background_distance", "background_fraction",
                                                    "foreground_fraction", "psnr_truth", "psnr_placed")}
    off_counts = np.zeros((num_frames, len(_NAMES)))
    for s in range(0, num_frames, block):
        frames = video[s:s + block].astype(np.float32) / 255.0
        dets = detect_video(frames)
        detections += dets
        t = slice(s, s + len(frames))
        bg = np.asarray([d.background_rgb for d in dets], dtype=np.float32)  # [n, 3]
        per_frame["largest_area"][t] = [max((o.area for o in d.objects), default=0.0) for d in dets]
        per_frame["background_distance"][t] = np.linalg.norm(bg - scene_bg, axis=-1)
        # farther than the evaluator's foreground threshold from the scene's background: exact on the uint8 values
        offset = video[s:s + block].astype(np.int32) - np.asarray(BACKGROUNDS[scene.background], dtype=np.int32)
        far_scene = (offset * offset).sum(-1) > (FG_THRESHOLD * 255) ** 2  # [n, H, W]
        per_frame["background_fraction"][t] = 1.0 - far_scene.mean(axis=(1, 2))
        diff = frames - bg[:, None, None]  # the evaluator's foreground, computed as detect_video does
        per_frame["foreground_fraction"][t] = (np.einsum("fhwc,fhwc->fhw", diff, diff) > FG_THRESHOLD**2).mean((1, 2))
        frame_of, _, _ = np.nonzero(far_scene)
        pixels = frames[far_scene]  # [P, 3]
        nearest = np.argmin(((pixels[:, None] - _NAME_RGB[None, names]) ** 2).sum(-1), axis=1)
        counts = np.bincount(frame_of * len(names) + nearest, minlength=len(frames) * len(names))
        off_counts[t][:, names] = counts.reshape(len(frames), len(names)) / (height * width)
        for i, (frame, det) in enumerate(zip(frames, dets)):
            truth = render_frame(scene, truth_positions[s + i]).astype(np.float32) / 255.0
            per_frame["psnr_truth"][s + i] = _psnr(frame, truth)
            per_frame["psnr_placed"][s + i] = _psnr(frame, _placed_frame(scene, det.objects, height, width))

    # tracking, motion and the re-render PSNR: as evaluate_video does
    tracks = _track(detections, scale)
    motions = [_motion(track, height, width) for track in tracks]
    render_tracks = []
    for track, motion in zip(tracks, motions):
        dets = list(track.detections.values())
        clear = [d for d in dets if not d.occluded] or dets
        size = min(motion.size, min(height, width) / 2)
        render_tracks.append((track, _mode([d.shape for d in clear]), _mode([d.color for d in dets]), size))
    psnr = [_psnr(video[t].astype(np.float32) / 255.0, _rerender(detections[t], render_tracks, t, height, width))
            for t in range(num_frames)]

    scene_areas = [_shape_area(o.shape, o.size) for o in scene.objects]

    def window(start: int, end: int) -> dict[str, Any]:
        metrics = _window_metrics(detections, tracks, motions, psnr, target, start, end, scale)
        out = {"start": start, "end": end, **{k: metrics.get(k) for k in EVALUATOR_METRICS},
               "background": metrics.get("background")}
        ratios = [_shape_area(o["detected"]["shape"], o["detected"]["size"]) / area
                  for o, area in zip(metrics["objects"], scene_areas) if o["detected"] is not None]
        out["object_area_ratio"] = float(np.mean(ratios)) if ratios else None
        out["largest_area"] = float(np.median(per_frame["largest_area"][start:end]))
        out["largest_area_ratio"] = out["largest_area"] / max(scene_areas)
        for key in ("background_distance", "background_fraction", "foreground_fraction", "psnr_truth",
                    "psnr_placed"):
            out[key] = float(per_frame[key][start:end].mean())
        off = off_counts[start:end].mean(0)
        top = int(off.argmax())
        out["off_background_colour"] = _NAMES[top] if off[top] > 0 else None
        out["off_background_fraction"] = float(off[top])
        return out

    whole = window(0, num_frames)
    chunks = [{"chunk": k, **window(s, e)} for k, (s, e) in enumerate(_chunk_bounds(num_frames, chunk_frames))]
    return {"whole": whole, "chunks": chunks}


# ------------------------------------------------------------------------------------------------ summaries
def columns(chunks: list[dict[str, Any]]) -> dict[str, list]:
    """Per-chunk rows -> one list per key (rounded floats)."""
    def r(v):
        return round(v, 4) if isinstance(v, float) else v

    keys = ("chunk", "start", "end", *CHUNK_METRICS, *CHUNK_LABELS)
    return {k: [r(c.get(k)) for c in chunks] for k in keys}


def mean_columns(per_prompt: list[dict[str, list]]) -> dict[str, list]:
    """Per chunk, the mean over prompts of every metric (None values skipped)."""
    first = per_prompt[0]
    out = {k: list(first[k]) for k in ("chunk", "start", "end")}
    for key in CHUNK_METRICS:
        values = []
        for k in range(len(first["chunk"])):
            vals = [p[key][k] for p in per_prompt if p[key][k] is not None]
            values.append(round(float(np.mean(vals)), 4) if vals else None)
        out[key] = values
    return out


def running_mean(values: list, width: int) -> np.ndarray:
    """Centred running mean over ``width`` chunks (None skipped; NaN when a window has no value)."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        w = x[max(0, i - width // 2):i - width // 2 + width]
        w = w[~np.isnan(w)]
        if len(w):
            out[i] = w.mean()
    return out


def onsets(cols: dict[str, list], smooth: int) -> dict[str, Any]:
    """Per ``ONSET_RULES`` drift: the first frame (a chunk's start) where the centred running mean over ``smooth``
    chunks crosses the threshold, with the threshold used."""
    out = {}
    early = [k for k, end in enumerate(cols["end"]) if end <= TRAINING_FRAMES] or [0]
    for name, (key, kind, value) in ONSET_RULES.items():
        curve = running_mean(cols[key], smooth)
        if kind in ("drop", "grow"):
            base = [cols[key][k] for k in early if cols[key][k] is not None]
            if not base:
                out[name] = {"frame": None, "threshold": None, "metric": key}
                continue
            threshold = float(np.mean(base)) - value if kind == "drop" else float(np.mean(base)) * value
            hit = curve < threshold if kind == "drop" else curve > threshold
        else:
            threshold = value
            hit = curve < value if kind == "below" else curve > value
        index = int(np.argmax(hit)) if hit.any() else None
        frame = None if index is None else cols["start"][index]
        out[name] = {"frame": frame, "threshold": round(threshold, 4), "metric": key}
    return out


def scene_area(scene: Scene, color: str) -> float | None:
    areas = [_shape_area(o.shape, o.size) for o in scene.objects if o.color == color]
    return max(areas) if areas else None


def derive(report: dict[str, Any], smooth: int) -> None:
    """What follows from the stored columns and frames, (re)computed for every model: ``largest_area_ratio`` where a
    model lacks it, onsets per prompt, the mean over the captioned prompts and its onsets, and ``frame_areas``: in
    each stored example frame, the area of the largest detection with the scene object's colour (a direct, per-frame
    reading of the example object's size, None when no such detection)."""
    prompts = {p["name"]: p for p in report["prompts"]}
    for model in report["models"].values():
        for name, entry in model["prompts"].items():
            cols, scene = entry["chunks"], scene_of(prompts[name])
            if "largest_area_ratio" not in cols:
                largest = max(_shape_area(o.shape, o.size) for o in scene.objects)
                cols["largest_area_ratio"] = [None if a is None else round(a / largest, 4)
                                              for a in cols["largest_area"]]
            entry["onsets"] = onsets(cols, smooth)
        in_mean = [model["prompts"][p["name"]]["chunks"] for p in report["prompts"] if p["in_mean"]]
        model["mean_over"] = len(in_mean)
        model["mean"] = mean_columns(in_mean)
        model["mean_onsets"] = onsets(model["mean"], smooth)
        model["frame_areas"] = {}
        for name, frames in model.get("frames", {}).items():
            scene = scene_of(prompts[name])
            colour = scene.objects[0].color
            areas = []
            for text in frames:
                found = [o.area for o in detect_video(png_frame(text))[0].objects if o.color == colour]
                areas.append(round(max(found), 1) if found else None)
            model["frame_areas"][name] = {"color": colour, "scene_area": scene_area(scene, colour), "areas": areas}
    report["settings"]["smooth"] = smooth


# ------------------------------------------------------------------------------------------------ figures
def png_base64(frame: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_frame(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


PLOT_PANELS = (
    ("semantic_accuracy", "semantic accuracy", None),
    ("background_fraction", "frame on the caption's background\n(fraction of pixels)", None),
    ("largest_area_ratio", "largest object's area / scene's largest\nobject's (per frame, median)", "log"),
    ("color_accuracy", "colour accuracy", None),
    ("shape_accuracy", "shape accuracy", None),
    ("direction_accuracy", "direction accuracy", None),
    ("background_distance", "background colour distance\n(border median to caption's, RGB)", None),
    ("psnr_placed", "PSNR vs caption's scene at the\ndetected positions (dB)", None),
    ("physics_accuracy", "physics accuracy", None),
)


def plot_scores(report: dict[str, Any], path: str, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 11), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m, (name, model) in enumerate(report["models"].items()):
        colour = colours[m % len(colours)]
        lines = [("mean", model["mean"], "-", 1.8, f"{name}: mean of {model['mean_over']} captions")]
        for key, style, label in (("example", "--", "example caption"), ("example_as_typed", ":", "as typed")):
            if key in model["prompts"]:
                lines.append((key, model["prompts"][key]["chunks"], style, 1.2, f"{name}: {label}"))
        for ax, (key, title, scale) in zip(axes.flat, PLOT_PANELS):
            for _, cols, style, lw, label in lines:
                x = np.asarray(cols["end"]) - 1
                ax.plot(x, running_mean(cols[key], smooth), style, color=colour, lw=lw, label=label)
            ax.set_title(title, fontsize=10)
            if scale:
                ax.set_yscale(scale)
    for ax in axes[-1]:
        ax.set_xlabel("frame")
    axes.flat[2].axhline(1.0, color="grey", lw=0.8)
    axes.flat[1].axhline(0.5, color="grey", lw=0.6, ls="--")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    s = report["settings"]
    fig.suptitle(f"{s['num_frames']} frames ({s['latent_frames']} latent), window {s['window_frames']}, "
                 f"sinks {s['sink_frames']}, {s['rope']} RoPE; running mean over {smooth} chunks "
                 f"({smooth * report['settings']['chunk_pixel_frames'][-1]} frames)", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_frames(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, key, model["frames"][key]) for name, model in report["models"].items()
            for key in ("example", "example_as_typed") if key in model.get("frames", {})]
    indices = report["settings"]["frame_indices"]
    prompts = {p["name"]: p["prompt"] for p in report["prompts"]}
    fig, axes = plt.subplots(len(rows), len(indices), figsize=(1.6 * len(indices) + 2.2, 1.75 * len(rows)),
                             squeeze=False)
    for r, (name, key, frames) in enumerate(rows):
        areas = report["models"][name].get("frame_areas", {}).get(key)
        for c, (index, text) in enumerate(zip(indices, frames)):
            ax = axes[r, c]
            image = png_frame(text)
            ax.imshow(image, interpolation="nearest")
            if areas is not None:
                area = areas["areas"][c]
                label = f"{areas['color']}: none" if area is None else f"{areas['color']} {area:.0f} px"
                ax.text(1, image.shape[0] - 2, label, fontsize=6, color="white", backgroundcolor=(0, 0, 0, 0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {index}", fontsize=9)
        axes[r, 0].set_ylabel(f"{name}\n\"{prompts[key]}\"".replace(" on a", "\non a").replace("moving ", "\nmoving "),
                              fontsize=7, rotation=0, ha="right", va="center")
    if any(report["models"][name].get("frame_areas") for name in report["models"]):
        scene = scene_of(next(p for p in report["prompts"] if p["name"] == "example"))
        fig.suptitle(f"label: area of the largest {scene.objects[0].color} detection; the scene's "
                     f"{scene.objects[0].shape} has {_shape_area(scene.objects[0].shape, scene.objects[0].size):.0f} px",
                     fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dump_json(report: dict[str, Any], path: str) -> None:
    """Indented JSON with every list of scalars on one line."""
    text = json.dumps(report, indent=1, allow_nan=False)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


# ------------------------------------------------------------------------------------------------ main
def parse_pipelines(values: list[str]) -> dict[str, str]:
    pipelines = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--pipeline {value!r}: expected name=folder (e.g. bundled=bundled)")
        path = str(BUNDLED_MODEL_DIR) if path == "bundled" else path
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise SystemExit(f"--pipeline {value!r}: {path!r} is not a saved CausalVideoPipeline folder")
        pipelines[name] = path
    return pipelines


def fmt(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


TABLE_RANGES = ((0, 20), (21, 499), (500, 999), (1000, 1999), (2000, None))
TABLE_ROWS = (("mean", "semantic_accuracy", "semantic accuracy", 3),
              ("example", "semantic_accuracy", "semantic accuracy", 3),
              ("mean", "largest_area_ratio", "largest object / scene's largest", 2),
              ("example", "largest_area_ratio", "largest object / scene's largest", 2),
              ("example_as_typed", "largest_area_ratio", "largest object / scene's largest", 2),
              ("example", "background_fraction", "frame on the caption's background", 2),
              ("example_as_typed", "background_fraction", "frame on the caption's background", 2),
              ("mean", "psnr_placed", "PSNR, caption's scene at detected positions (dB)", 1))
PROMPT_LABELS = {"mean": "mean of 4", "example": "example", "example_as_typed": "as typed"}


def range_table(report: dict[str, Any]) -> str:
    """Markdown table of per-chunk scores averaged over frame ranges (a chunk belongs to the range holding its first
    frame), per model, for the mean over the scored captions and for the example prompts."""
    lines = []
    for prompt, metric, label, digits in TABLE_ROWS:
        for name, entry in report["models"].items():
            cols = entry["mean"] if prompt == "mean" else entry["prompts"].get(prompt, {}).get("chunks")
            if not cols or metric not in cols:
                continue
            cells = []
            for first, last in TABLE_RANGES:
                vals = [v for start, v in zip(cols["start"], cols[metric])
                        if v is not None and start >= first and (last is None or start <= last)]
                cells.append(f"{np.mean(vals):.{digits}f}" if vals else "–")
            what = PROMPT_LABELS[prompt].replace("4", str(entry.get("mean_over", 4)))
            lines.append(f"| {name} | {what} | {label} | " + " | ".join(cells) + " |")
    last_frame = max(e["mean"]["end"][-1] for e in report["models"].values())
    head = " | ".join(f"{a}–{b if b is not None else last_frame - 1}" for a, b in TABLE_RANGES)
    return f"| model | prompt | metric | {head} |\n|---|---|---|" + "---|" * len(TABLE_RANGES) + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", action="append", default=[],
                        help="name=folder of a CausalVideoPipeline ('bundled' for the bundled model); repeatable")
    parser.add_argument("--latent_frames", type=int, default=1200, help="latent frames per stream (1200 = 4797 frames)")
    parser.add_argument("--window_frames", type=int, default=12)
    parser.add_argument("--sink_frames", type=int, default=3)
    parser.add_argument("--rope", choices=("relative", "absolute"), default="relative")
    parser.add_argument("--captions", type=int, default=3, help="held-out captions besides the example")
    parser.add_argument("--example_prompt", default=EXAMPLE_PROMPT,
                        help="the example as a new user types it, scored against the example scene ('' leaves it out)")
    parser.add_argument("--eval_seed", type=int, default=10**9, help="first held-out scene seed; also the noise seed")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--max_sequence_length", type=int, default=18)
    parser.add_argument("--smooth", type=int, default=10, help="onsets: centred running mean over this many chunks")
    parser.add_argument("--plot_smooth", type=int, default=25, help="plot: centred running mean over this many chunks")
    parser.add_argument("--frame_indices", type=int, nargs="+", default=[0, 500, 1000, 2000, -1],
                        help="frames of the example strip (-1: the last frame)")
    parser.add_argument("--detect_block", type=int, default=240, help="frames detected at a time (memory)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", action="store_true",
                        help="add the models to an existing --output (same prompts and settings) and redraw")
    parser.add_argument("--replot", action="store_true",
                        help="no streaming: recompute onsets and means of an existing --output (e.g. with another "
                             "--smooth) and redraw the figures")
    parser.add_argument("--table", action="store_true",
                        help="no streaming: print the frame-range means of an existing --output as a Markdown table")
    parser.add_argument("--output", required=True, help="JSON file")
    parser.add_argument("--plot", default=None, help="PNG of the per-chunk scores")
    parser.add_argument("--frames_plot", default=None, help="PNG strip of the example frames")
    args = parser.parse_args(argv)
    if args.latent_frames < 1 or args.captions < 0 or min(args.smooth, args.plot_smooth, args.detect_block) < 1:
        raise SystemExit("--latent_frames, --smooth, --plot_smooth and --detect_block must be positive and "
                         "--captions >= 0")
    if args.table:
        if not os.path.isfile(args.output):
            raise SystemExit(f"--table: {args.output} does not exist")
        with open(args.output) as f:
            table = range_table(json.load(f))
        print(table)
        return {"table": table}
    if args.replot:
        if args.pipeline or args.append:
            raise SystemExit("--replot redraws an existing --output: no --pipeline, no --append")
        if not os.path.isfile(args.output):
            raise SystemExit(f"--replot: {args.output} does not exist")
        with open(args.output) as f:
            report = json.load(f)
        report.setdefault("commands", []).append(
            " ".join(["python", "trainers/shapes_long_stream.py", *(sys.argv[1:] if argv is None else argv)]))
        derive(report, args.smooth)
        dump_json(report, args.output)
        draw(report, args)
        return report
    if not args.pipeline:
        raise SystemExit("give at least one --pipeline name=folder (or --replot)")
    pipelines = parse_pipelines(args.pipeline)
    torch.set_num_threads(args.threads)

    prompts = build_prompts(args.captions, args.eval_seed, args.height, args.width, args.example_prompt or None)
    settings = {"latent_frames": args.latent_frames, "num_frames": None, "window_frames": args.window_frames,
                "sink_frames": args.sink_frames, "rope": args.rope, "seed": args.eval_seed, "height": args.height,
                "width": args.width, "max_sequence_length": args.max_sequence_length, "smooth": args.smooth,
                "frame_indices": None, "chunk_pixel_frames": None}
    command = " ".join(["python", "trainers/shapes_long_stream.py", *(sys.argv[1:] if argv is None else argv)])
    if args.append and os.path.isfile(args.output):
        with open(args.output) as f:
            report = json.load(f)
        mine = {k: v for k, v in settings.items() if v is not None and k != "smooth"}
        theirs = {k: report["settings"].get(k) for k in mine}
        if theirs != mine or [p["prompt"] for p in report["prompts"]] != [p["prompt"] for p in prompts]:
            raise SystemExit(f"--append: {args.output} was made with other settings or prompts "
                             f"({theirs} against {mine})")
        if report.get("evaluator") != evaluator_fingerprint():
            print(f"warning: {args.output} was scored by evaluator {report.get('evaluator')}, this run by "
                  f"{evaluator_fingerprint()}", flush=True)
        report.setdefault("commands", []).append(command)
    else:
        report = {"commands": [command], "evaluator": evaluator_fingerprint(), "settings": settings,
                  "prompts": prompts, "onset_rules": {k: list(v) for k, v in ONSET_RULES.items()}, "models": {}}

    start = time.perf_counter()
    for name, path in pipelines.items():
        pipe = CausalVideoPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        chunk_frames = chunk_pixel_frames(pipe)
        num_frames = 1 + pipe.vae_scale_factor_temporal * (args.latent_frames - 1)
        for key, value in (("num_frames", num_frames), ("chunk_pixel_frames", chunk_frames)):
            if report["settings"][key] not in (None, value):
                raise SystemExit(f"{name}: {key} {value} differs from the report's {report['settings'][key]}")
            report["settings"][key] = value
        indices = [num_frames + i if i < 0 else i for i in args.frame_indices]
        if any(not 0 <= i < num_frames for i in indices):
            raise SystemExit(f"--frame_indices {args.frame_indices}: outside the {num_frames} frames")
        if report["settings"]["frame_indices"] not in (None, indices):
            raise SystemExit(f"--frame_indices {indices} differ from the report's {report['settings']['frame_indices']}")
        report["settings"]["frame_indices"] = indices
        print(f"{name}: streaming {len(prompts)} prompts for {num_frames} frames ({args.latent_frames} latent)",
              flush=True)
        videos, timing = stream_videos(pipe, [p["prompt"] for p in prompts], args.latent_frames, args.height,
                                       args.width, args.window_frames, args.sink_frames, args.rope, args.eval_seed,
                                       args.max_sequence_length,
                                       log=lambda line: print(line, flush=True))
        del pipe
        entry: dict[str, Any] = {"path": "bundled" if path == str(BUNDLED_MODEL_DIR) else os.path.relpath(path),
                                 **timing, "prompts": {}, "frames": {}}
        eval_start = time.perf_counter()
        for prompt, video in zip(prompts, videos):
            scored = score_video(video, scene_of(prompt), chunk_frames, block=args.detect_block)
            cols = columns(scored["chunks"])
            entry["prompts"][prompt["name"]] = {
                "whole": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scored["whole"].items()},
                "onsets": onsets(cols, args.smooth), "chunks": cols}  # derive() recomputes the onsets
            if prompt["name"].startswith("example"):
                entry["frames"][prompt["name"]] = [png_base64(video[i]) for i in indices]
            o = entry["prompts"][prompt["name"]]["onsets"]
            print(f"  {prompt['name']}: semantic {fmt(scored['whole']['semantic_accuracy'])}, onsets "
                  + ", ".join(f"{k} {v['frame']}" for k, v in o.items()) + f" ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        del videos
        entry["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
        report["models"][name] = entry
        derive(report, args.smooth)
        dump_json(report, args.output)  # after every model: a long run keeps what it has
        print(f"{name}: mean onsets " + ", ".join(f"{k} {v['frame']}" for k, v in entry["mean_onsets"].items())
              + f"; stream {timing['stream_seconds']:.0f} s, scoring {entry['eval_seconds']:.0f} s", flush=True)

    report["wall_seconds_last_run"] = round(time.perf_counter() - start, 1)
    dump_json(report, args.output)
    draw(report, args)
    print(f"wrote {args.output} in {report['wall_seconds_last_run']:.0f} s", flush=True)
    return report


def draw(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.plot:
        plot_scores(report, args.plot, args.plot_smooth)
    if args.frames_plot:
        plot_frames(report, args.frames_plot)


if __name__ == "__main__":
    main()
