"""Analytic ShapesWorld evaluator: measure a video against its caption from the pixels alone (no learned weights).

Pipeline (``docs/shapesworld.md`` defines every metric):

1. :func:`detect_video` — per frame: background = per-channel median of the border pixels, named by the nearest
   :data:`~.world.BACKGROUNDS` colour; foreground = pixels farther than :data:`FG_THRESHOLD` from it; 4-connected
   components (:func:`label_components`); a component whose eroded core holds two palette colours (two objects
   touching or overlapping) is split by colour and both parts are marked ``occluded``. Per object: colour = the
   majority palette colour of the core pixels, shape = nearest prototype in (bounding-box fill ratio, vertical
   centroid offset), size and position from the pixel moments of that shape.
2. Tracking — detections are linked frame to frame (nearest position, same colour preferred).
3. Motion — per track, each step between consecutive unoccluded detections is explained as a straight move or a
   single reflection off a wall (whichever speed is closest to the track's median speed). That *unfolds* the
   trajectory: in a correct video the unfolded velocity is constant and equals the caption's initial velocity.
4. Metrics over a window of frames (the whole video, and each chunk for drift): semantic accuracy, motion
   (speed error, direction error, physics), fidelity (PSNR against a re-render of the detected scene), temporal
   consistency (attribute flicker).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .world import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, SPEEDS, Scene, _compose, parse_caption, resolution_scale

__all__ = [
    "FG_THRESHOLD",
    "METRIC_DESCRIPTIONS",
    "PSNR_MAX",
    "DetectedObject",
    "FrameDetection",
    "detect_frame",
    "detect_video",
    "evaluate_batch",
    "evaluate_video",
    "label_components",
]

#: A pixel is foreground when its RGB distance (in [0, 1] units) to the background exceeds this. Every object
#: colour is >= 0.45 from every background, so this keeps objects whole and rejects blends mostly background.
FG_THRESHOLD = 0.2
#: Components smaller than this fraction of the frame are ignored (12 px at 64x64; the smallest object has ~98 px).
MIN_AREA_FRACTION = 0.003
#: A palette colour counts as present in a component when it holds this fraction of the component's core pixels.
SPLIT_FRACTION = 0.2
#: PSNR cap (dB): an exact re-render has MSE 0.
PSNR_MAX = 50.0
#: Below this speed (px/frame at 64 px) an object is static and has no direction.
STATIC_SPEED = 0.25
#: Physics tolerance: consecutive unfolded velocities agree within ``PHYSICS_ABS_TOL * scale + PHYSICS_REL_TOL * |v|``.
PHYSICS_ABS_TOL = 0.5
PHYSICS_REL_TOL = 0.25
#: Direction is correct when the angle to the caption direction is below this (degrees; four directions).
DIRECTION_TOLERANCE = 45.0

#: Shape prototypes in feature space: (fill ratio of the bounding box, centroid offset below the box centre in units
#: of the half-height). Exact values for the continuous shapes.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (math.pi / 4, 0.0),
    "square": (1.0, 0.0),
    "triangle": (0.5, 1.0 / 3.0),
}
_OFFSET_WEIGHT = 1.5  # weight of the offset feature relative to the fill ratio in the prototype distance

_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32) / 255.0
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.asarray([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32) / 255.0

METRIC_DESCRIPTIONS: dict[str, str] = {
    "semantic_accuracy": "fraction of caption attributes matched (background, object count, per object: colour, "
    "shape, direction, speed class)",
    "background_accuracy": "1 if the detected background has the caption's colour",
    "count_accuracy": "1 if the number of persistent objects equals the caption's",
    "color_accuracy": "fraction of caption objects whose matched object has the caption's colour",
    "shape_accuracy": "fraction of caption objects whose matched object has the caption's shape",
    "direction_accuracy": "fraction of caption objects moving within 45 degrees of the caption's direction",
    "speed_accuracy": "fraction of caption objects whose speed is nearer (log scale) the caption's speed class",
    "speed": "mean unfolded speed of the persistent objects (px/frame)",
    "speed_error": "mean |detected speed - caption speed| over matched caption objects (px/frame)",
    "direction_error": "mean angle between detected and caption direction over matched caption objects (degrees)",
    "physics_accuracy": "fraction of steps whose unfolded velocity agrees with the previous step's (constant "
    "velocity with reflections at the walls)",
    "psnr": "mean PSNR (dB) of the frames against a re-render of the detected scene",
    "consistency": "1 - mean(count, colour, shape flicker)",
    "count_flicker": "fraction of frame transitions where the number of detected objects changes",
    "color_flicker": "fraction of tracked-object transitions where the detected colour changes",
    "shape_flicker": "fraction of tracked-object transitions (both unoccluded) where the detected shape changes",
    "num_objects": "number of persistent objects (tracks present in at least half of the frames)",
}


# ------------------------------------------------------------------------------------------------ input
def _as_video(video: Any) -> np.ndarray:
    """Float32 ``[F, H, W, 3]`` in [0, 1] from uint8 or float, numpy or torch, ``[F, H, W, 3]`` or ``[H, W, 3]``."""
    if hasattr(video, "detach"):  # torch.Tensor without importing torch
        video = video.detach().cpu().numpy()
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must have shape [F, H, W, 3] (channels last), got {tuple(video.shape)}")
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    if not np.issubdtype(video.dtype, np.floating):
        raise TypeError(f"video must be uint8 or float in [0, 1], got dtype {video.dtype}")
    return np.clip(video.astype(np.float32), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ components
def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components over the last two axes; leading axes are independent images.

    ``classes`` is a bool mask or an int map (< 0 = background); neighbours join when their classes are equal.
    Returns int64 labels: -1 for background, otherwise the flat index of the component's first pixel. Min-label
    propagation with pointer jumping (a label is always the index of a pixel of the same component, so
    ``label[label[i]]`` is a valid shortcut).
    """
    classes = np.asarray(classes)
    cls = np.where(classes, 0, -1) if classes.dtype == bool else classes.astype(np.int64)
    fg = cls >= 0
    n = cls.size
    labels = np.where(fg, np.arange(n).reshape(cls.shape), n)
    join_right = fg[..., :, :-1] & (cls[..., :, :-1] == cls[..., :, 1:])
    join_down = fg[..., :-1, :] & (cls[..., :-1, :] == cls[..., 1:, :])
    fg_flat = np.flatnonzero(fg)
    while True:
        new = labels.copy()
        m = np.where(join_right, np.minimum(labels[..., :, :-1], labels[..., :, 1:]), n)
        new[..., :, :-1] = np.minimum(new[..., :, :-1], m)
        new[..., :, 1:] = np.minimum(new[..., :, 1:], m)
        m = np.where(join_down, np.minimum(labels[..., :-1, :], labels[..., 1:, :]), n)
        new[..., :-1, :] = np.minimum(new[..., :-1, :], m)
        new[..., 1:, :] = np.minimum(new[..., 1:, :], m)
        flat = new.reshape(-1)
        for _ in range(2):
            flat[fg_flat] = flat[flat[fg_flat]]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(fg, labels, -1)


def _dilate_labels(labels: np.ndarray) -> np.ndarray:
    """Give every unlabelled pixel (< 0) the largest label among its 8 neighbours (one-pixel dilation)."""
    padded = np.pad(labels, [(0, 0)] * (labels.ndim - 2) + [(1, 1), (1, 1)], constant_values=-1)
    height, width = labels.shape[-2:]
    neighbours = np.max(
        [padded[..., 1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width] for dr in (-1, 0, 1) for dc in (-1, 0, 1)],
        axis=0,
    )
    return np.where(labels >= 0, labels, neighbours)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion of ``[..., H, W]`` masks; pixels beyond the image edge count as set."""
    out = mask.copy()
    out[..., 1:, :] &= mask[..., :-1, :]
    out[..., :-1, :] &= mask[..., 1:, :]
    out[..., :, 1:] &= mask[..., :, :-1]
    out[..., :, :-1] &= mask[..., :, 1:]
    return out


# ------------------------------------------------------------------------------------------------ detection
@dataclass
class DetectedObject:
    """One object in one frame. ``(x, y)`` is the bounding-box centre and ``size`` the half-extent, in px."""

    color: str
    shape: str
    x: float
    y: float
    size: float
    area: float
    fill: float
    offset: float
    occluded: bool


@dataclass
class FrameDetection:
    """Everything detected in one frame."""

    background: str
    background_rgb: tuple[float, float, float]
    objects: list[DetectedObject]


def _classify_shape(fill: float, offset: float) -> str:
    def dist(proto: tuple[float, float]) -> float:
        return (fill - proto[0]) ** 2 + (_OFFSET_WEIGHT * (offset - proto[1])) ** 2

    return min(SHAPES, key=lambda s: dist(SHAPE_PROTOTYPES[s]))


def _moments_to_box(shape: str, area: float, cx: float, cy: float) -> tuple[float, float, float]:
    """Bounding-box centre and half-extent of ``shape`` with this area and centroid (exact for the continuum)."""
    if shape == "circle":
        return cx, cy, math.sqrt(area / math.pi)
    if shape == "square":
        return cx, cy, math.sqrt(area) / 2
    h = math.sqrt(area / 2)  # triangle: area 2 h^2, centroid h/3 below the box centre
    return cx, cy - h / 3, h


def detect_video(video: Any) -> list[FrameDetection]:
    """Detect background and objects in every frame of ``video`` (``[F, H, W, 3]`` uint8 or float in [0, 1])."""
    v = _as_video(video)
    num_frames, height, width, _ = v.shape
    min_area = max(4, round(MIN_AREA_FRACTION * height * width))

    border = np.concatenate([v[:, 0], v[:, -1], v[:, 1:-1, 0], v[:, 1:-1, -1]], axis=1)  # [F, N, 3]
    bg_rgb = np.median(border, axis=1)  # [F, 3]
    bg_idx = np.argmin(((bg_rgb[:, None] - _BG_RGB[None]) ** 2).sum(-1), axis=1)
    fg = np.sqrt(((v - bg_rgb[:, None, None]) ** 2).sum(-1)) > FG_THRESHOLD  # [F, H, W]
    pixel_dist = ((v[..., None, :] - _COLOR_RGB) ** 2).sum(-1)  # [F, H, W, K]
    pixel_cls = np.argmin(pixel_dist, axis=-1)

    # pass 1: foreground components; find which palette colours are present in each component's core
    labels = label_components(fg)
    comp_ids, comp_idx = np.unique(labels, return_inverse=True)
    comp_idx = comp_idx.reshape(labels.shape)
    num_comp, k = len(comp_ids), len(_COLOR_NAMES)
    area = np.bincount(comp_idx.ravel(), minlength=num_comp)
    core = _erode(fg)
    core_hist = np.bincount((comp_idx[core] * k + pixel_cls[core]), minlength=num_comp * k).reshape(num_comp, k)
    all_hist = np.bincount((comp_idx[fg] * k + pixel_cls[fg]), minlength=num_comp * k).reshape(num_comp, k)
    hist = np.where(core_hist.sum(1, keepdims=True) > 0, core_hist, all_hist)
    present = (hist >= SPLIT_FRACTION * hist.sum(1, keepdims=True)) & (hist > 0)
    present[np.arange(num_comp), hist.argmax(1)] = True
    keep = (comp_ids >= 0) & (area >= min_area)
    split = keep & (present.sum(1) > 1)

    # pass 2: colour map (one colour per component, nearest present colour inside split ones), then components again
    colour_map = np.where(keep[comp_idx], hist.argmax(1)[comp_idx], -1)
    occluded_px = split[comp_idx]
    if split.any():
        masked = np.where(present[comp_idx[occluded_px]], pixel_dist[occluded_px], np.inf)
        colour_map[occluded_px] = np.argmin(masked, axis=-1)
        labels = label_components(colour_map)
    else:
        labels = np.where(colour_map >= 0, labels, -1)

    # drop specks, then give each object the one-pixel ring around it (anti-aliased edges below FG_THRESHOLD)
    ids, idx, counts = np.unique(labels, return_inverse=True, return_counts=True)
    labels = np.where((counts >= min_area)[idx.reshape(labels.shape)], labels, -1)
    region = _dilate_labels(labels)
    obj_ids, obj_idx = np.unique(region, return_inverse=True)
    obj_idx = obj_idx.reshape(region.shape)
    n_obj = len(obj_ids)
    flat = obj_idx.ravel()
    o_colour = np.zeros(n_obj, dtype=np.int64)
    o_colour[obj_idx[labels >= 0]] = colour_map[labels >= 0]
    o_occluded = np.zeros(n_obj, dtype=bool)
    o_occluded[obj_idx[labels >= 0]] = occluded_px[labels >= 0]

    # coverage of each pixel by its object: projection of (pixel - background) on (colour - background)
    colour = _COLOR_RGB[o_colour[obj_idx]]  # [F, H, W, 3]
    bg = bg_rgb[:, None, None, :]
    alpha = ((v - bg) * (colour - bg)).sum(-1) / np.maximum(((colour - bg) ** 2).sum(-1), 1e-6)
    alpha = np.where(region >= 0, np.clip(alpha, 0.0, 1.0), 0.0).ravel()
    rows = np.broadcast_to(np.arange(height)[None, :, None] + 0.5, labels.shape).ravel()
    cols = np.broadcast_to(np.arange(width)[None, None, :] + 0.5, labels.shape).ravel()
    o_area = np.bincount(flat, weights=alpha, minlength=n_obj)
    o_sx = np.bincount(flat, weights=alpha * cols, minlength=n_obj)
    o_sy = np.bincount(flat, weights=alpha * rows, minlength=n_obj)

    # shape features from the half-covered pixels: bounding-box fill ratio and vertical centroid offset
    half = alpha >= 0.5
    o_count = np.bincount(flat[half], minlength=n_obj).astype(np.float64)
    r_min, r_max = np.full(n_obj, np.inf), np.full(n_obj, -np.inf)
    c_min, c_max = np.full(n_obj, np.inf), np.full(n_obj, -np.inf)
    np.minimum.at(r_min, flat[half], rows[half])
    np.maximum.at(r_max, flat[half], rows[half])
    np.minimum.at(c_min, flat[half], cols[half])
    np.maximum.at(c_max, flat[half], cols[half])

    detections = [
        FrameDetection(
            background=_BG_NAMES[bg_idx[t]],
            background_rgb=tuple(float(c) for c in bg_rgb[t]),
            objects=[],
        )
        for t in range(num_frames)
    ]
    frame_size = height * width
    for j, obj_id in enumerate(obj_ids):
        if obj_id < 0 or o_count[j] == 0:
            continue
        box_h, box_w = r_max[j] - r_min[j] + 1, c_max[j] - c_min[j] + 1
        cx, cy = o_sx[j] / o_area[j], o_sy[j] / o_area[j]
        fill = o_count[j] / (box_h * box_w)
        offset = (cy - (r_min[j] + r_max[j]) / 2) / (box_h / 2)
        shape = _classify_shape(fill, offset)
        x, y, size = _moments_to_box(shape, o_area[j], cx, cy)
        detections[int(obj_id) // frame_size].objects.append(
            DetectedObject(
                color=_COLOR_NAMES[o_colour[j]],
                shape=shape,
                x=float(x),
                y=float(y),
                size=float(size),
                area=float(o_area[j]),
                fill=float(fill),
                offset=float(offset),
                occluded=bool(o_occluded[j]),
            )
        )
    return detections


def detect_frame(frame: Any) -> FrameDetection:
    """Detect background and objects in one frame (``[H, W, 3]``)."""
    if len(frame.shape) != 3:
        raise ValueError(f"frame must have shape [H, W, 3], got {tuple(frame.shape)}")
    return detect_video(frame)[0]


# ------------------------------------------------------------------------------------------------ tracking
@dataclass
class _Track:
    detections: dict[int, DetectedObject]

    def last(self) -> tuple[int, DetectedObject]:
        t = max(self.detections)
        return t, self.detections[t]


def _track(detections: list[FrameDetection], scale: float) -> list[_Track]:
    """Link detections frame to frame: greedy by distance, a colour change costs a large penalty."""
    tracks: list[_Track] = []
    max_step = (2 * SPEEDS["fast"] + 4) * scale
    for t, frame in enumerate(detections):
        candidates = []
        for i, track in enumerate(tracks):
            t_last, last = track.last()
            gate = max_step * (t - t_last)
            for j, obj in enumerate(frame.objects):
                d = math.hypot(obj.x - last.x, obj.y - last.y)
                if d <= gate:
                    candidates.append((d + (0 if obj.color == last.color else 4 * max_step), i, j))
        used_tracks, used_objs = set(), set()
        for _, i, j in sorted(candidates):
            if i not in used_tracks and j not in used_objs:
                tracks[i].detections[t] = frame.objects[j]
                used_tracks.add(i)
                used_objs.add(j)
        for j, obj in enumerate(frame.objects):
            if j not in used_objs:
                tracks.append(_Track({t: obj}))
    return tracks


# ------------------------------------------------------------------------------------------------ motion
@dataclass
class _Motion:
    """Unfolded motion of one track: one row per step between consecutive unoccluded detections."""

    size: float
    end_frames: np.ndarray  # [S] frame index at the end of each step
    gaps: np.ndarray  # [S] frames per step
    unfolded: np.ndarray  # [S, 2] unfolded velocity (px/frame), initial orientation of the track


def _motion(track: _Track, height: int, width: int) -> _Motion:
    valid = sorted(t for t, d in track.detections.items() if not d.occluded)
    frames = valid if valid else sorted(track.detections)
    size = float(np.median([track.detections[t].size for t in frames]))
    pos = np.asarray([[track.detections[t].x, track.detections[t].y] for t in valid]).reshape(-1, 2)
    times = np.asarray(valid)
    if len(valid) < 2:
        return _Motion(size, np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2)))
    gaps = np.diff(times)
    raw = np.diff(pos, axis=0) / gaps[:, None]
    ref_speed = np.median(np.abs(raw), axis=0)  # per axis: reflection steps are a minority
    unfolded = np.zeros_like(raw)
    for axis, extent in enumerate((width, height)):
        lo, hi = size, extent - size
        parity = 1.0
        for s in range(len(gaps)):
            p0, p1, g = pos[s, axis], pos[s + 1, axis], gaps[s]
            options = [  # (velocity before the step, reflected?)
                ((p1 - p0) / g, False),
                (-((p0 - lo) + (p1 - lo)) / g, True),
                (((hi - p0) + (hi - p1)) / g, True),
            ]
            if s == 0:  # no history: the speed closest to the track's median speed
                def cost(o: tuple[float, bool]) -> tuple[float, bool]:
                    return abs(abs(o[0]) - ref_speed[axis]), o[1]
            else:  # continuity: the unfolded velocity closest to the previous step's
                def cost(o: tuple[float, bool]) -> tuple[float, bool]:
                    return abs(parity * o[0] - unfolded[s - 1, axis]), o[1]
            velocity, reflected = min(options, key=cost)
            unfolded[s, axis] = parity * velocity
            if reflected:
                parity = -parity
    return _Motion(size, times[1:], gaps, unfolded)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _window_motion(motion: _Motion, start: int, end: int, scale: float) -> dict[str, Any]:
    """Speed, velocity and physics of the steps that end inside ``[start, end)``."""
    steps = np.flatnonzero((motion.end_frames >= start) & (motion.end_frames < end))
    if len(steps) == 0:
        return {"speed": None, "velocity": None, "physics": None}
    u = motion.unfolded[steps]
    g = motion.gaps[steps]
    speed = float((np.linalg.norm(u, axis=1) * g).sum() / g.sum())
    velocity = np.median(u, axis=0)
    agree = []
    for s in steps[steps > 0]:
        a, b = motion.unfolded[s - 1], motion.unfolded[s]
        tol = PHYSICS_ABS_TOL * scale + PHYSICS_REL_TOL * max(np.linalg.norm(a), np.linalg.norm(b))
        agree.append(float(np.linalg.norm(b - a) <= tol))
    physics = float(np.mean(agree)) if agree else None
    if np.linalg.norm(velocity) < STATIC_SPEED * scale:
        velocity = None
    return {"speed": speed, "velocity": velocity, "physics": physics}


# ------------------------------------------------------------------------------------------------ fidelity
def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return PSNR_MAX if mse <= 10 ** (-PSNR_MAX / 10) else float(-10 * math.log10(mse))


def _rerender(
    detection: FrameDetection, tracks: list[tuple[_Track, str, str, float]], t: int, height: int, width: int
) -> np.ndarray:
    """The frame the detected scene renders to (the world's renderer): the background colour, then each detected
    object as its track's shape, colour and size at its detected position. Objects seen less completely (occluded)
    are drawn first, i.e. behind."""
    drawn = []
    for track, shape, color, size in tracks:
        obj = track.detections.get(t)
        if obj is not None:
            visible = obj.area / _shape_area(shape, size)
            drawn.append((visible, (shape, _COLOR_RGB[_COLOR_NAMES.index(color)], obj.x, obj.y, size)))
    drawn.sort(key=lambda d: d[0])
    background = _BG_RGB[_BG_NAMES.index(detection.background)]
    return _compose(background, [d[1] for d in drawn], height, width)


def _shape_area(shape: str, size: float) -> float:
    return {"circle": math.pi, "square": 4.0, "triangle": 2.0}[shape] * size * size


# ------------------------------------------------------------------------------------------------ evaluation
def _mode(values: Sequence[str]) -> str | None:
    return Counter(values).most_common(1)[0][0] if values else None


def _caption_objects(caption: str | Scene | dict | None) -> dict[str, Any] | None:
    if caption is None:
        return None
    if isinstance(caption, Scene):
        return {
            "background": caption.background,
            "objects": [
                {"shape": o.shape, "color": o.color, "direction": o.direction, "speed": o.speed}
                for o in caption.objects
            ],
        }
    if isinstance(caption, dict):
        return caption
    return parse_caption(caption)


def _speed_class(speed: float, scale: float) -> str:
    return min(SPEEDS, key=lambda s: abs(math.log(max(speed, 1e-6) / (SPEEDS[s] * scale))))


def _match_scores(track_info: dict[str, Any], target: dict[str, str], scale: float, motion_measurable: bool):
    """Per-attribute match of one persistent object against one caption object, plus its motion errors."""
    velocity, speed = track_info["velocity"], track_info["speed"]
    out = {
        "color": float(track_info["color"] == target["color"]),
        "shape": float(track_info["shape"] == target["shape"]),
    }
    if motion_measurable:
        direction = np.asarray(DIRECTIONS[target["direction"]])
        angle = 90.0 if velocity is None else _angle(velocity, direction)
        out["direction"] = float(velocity is not None and angle < DIRECTION_TOLERANCE)
        out["speed"] = float(
            speed is not None and velocity is not None and _speed_class(speed, scale) == target["speed"]
        )
        out["direction_error"] = angle if speed is not None else None
        out["speed_error"] = abs(speed - SPEEDS[target["speed"]] * scale) if speed is not None else None
    return out


_SEMANTIC_KEYS = ("color", "shape", "direction", "speed")


def _window_metrics(
    detections: list[FrameDetection],
    tracks: list[_Track],
    motions: list[_Motion],
    psnr: list[float],
    target: dict[str, Any] | None,
    start: int,
    end: int,
    scale: float,
) -> dict[str, Any]:
    n_frames = end - start
    frames = range(start, end)
    motion_measurable = end - max(start - 1, 0) >= 2  # at least one step ends inside the window

    # persistent objects: tracks present in at least half of the window's frames
    persistent = []
    for track, motion in zip(tracks, motions):
        present = [t for t in frames if t in track.detections]
        if 2 * len(present) < n_frames:
            continue
        clear = [t for t in present if not track.detections[t].occluded] or present
        info = {
            "color": _mode([track.detections[t].color for t in present]),
            "shape": _mode([track.detections[t].shape for t in clear]),
            "size": float(np.median([track.detections[t].size for t in clear])),
            "frames": len(present),
            **_window_motion(motion, start, end, scale),
        }
        persistent.append(info)
    persistent.sort(key=lambda i: -i["frames"])
    persistent = persistent[:6]

    out: dict[str, Any] = {"start": start, "end": end, "num_objects": len(persistent)}
    out["background"] = _mode([detections[t].background for t in frames])
    out["psnr"] = float(np.mean([psnr[t] for t in frames]))
    speeds = [p["speed"] for p in persistent if p["speed"] is not None]
    out["speed"] = float(np.mean(speeds)) if speeds else None
    physics = [p["physics"] for p in persistent if p["physics"] is not None]
    out["physics_accuracy"] = float(np.mean(physics)) if physics else None

    # temporal consistency: count / colour / shape flicker over transitions into the window
    transitions = [t for t in frames if t >= 1]
    count_changes = [len(detections[t].objects) != len(detections[t - 1].objects) for t in transitions]
    color_changes, shape_changes = [], []
    for track in tracks:
        for t in transitions:
            a, b = track.detections.get(t - 1), track.detections.get(t)
            if a is None or b is None:
                continue
            color_changes.append(a.color != b.color)
            if not (a.occluded or b.occluded):
                shape_changes.append(a.shape != b.shape)
    flicker = {
        "count_flicker": float(np.mean(count_changes)) if count_changes else 0.0,
        "color_flicker": float(np.mean(color_changes)) if color_changes else 0.0,
        "shape_flicker": float(np.mean(shape_changes)) if shape_changes else 0.0,
    }
    out.update(flicker)
    out["consistency"] = 1.0 - float(np.mean(list(flicker.values())))

    if target is None:
        return out

    # assignment of persistent objects to caption objects maximising the matched attributes
    wanted = target["objects"]
    slots = persistent + [None] * len(wanted)
    best, best_key = None, None
    for perm in itertools.permutations(range(len(slots)), len(wanted)):
        scores = [
            _match_scores(slots[p], obj, scale, motion_measurable) if slots[p] is not None else None
            for p, obj in zip(perm, wanted)
        ]
        matched = sum(sum(s[k] for k in _SEMANTIC_KEYS if k in s) for s in scores if s is not None)
        errors = sum(s.get("speed_error") or 0.0 for s in scores if s is not None)
        key = (matched, -errors)
        if best_key is None or key > best_key:
            best, best_key = (perm, scores), key
    perm, scores = best

    keys = [k for k in _SEMANTIC_KEYS if motion_measurable or k in ("color", "shape")]
    per_attr = {k: [s[k] if s is not None else 0.0 for s in scores] for k in keys}
    background_ok = float(out["background"] == target["background"])
    count_ok = float(len(persistent) == len(wanted))
    matched = background_ok + count_ok + sum(sum(v) for v in per_attr.values())
    total = 2 + len(keys) * len(wanted)
    out["semantic_accuracy"] = matched / total
    out["background_accuracy"] = background_ok
    out["count_accuracy"] = count_ok
    for k in _SEMANTIC_KEYS:
        out[f"{k}_accuracy"] = float(np.mean(per_attr[k])) if k in per_attr else None
    for err in ("speed_error", "direction_error"):
        values = [s[err] for s in scores if s is not None and s.get(err) is not None]
        out[err] = float(np.mean(values)) if values else None

    objects = []
    for p, s, obj in zip(perm, scores, wanted):
        info = slots[p]
        entry = {"caption": dict(obj), "detected": None}
        if info is not None:
            entry["detected"] = {
                "color": info["color"],
                "shape": info["shape"],
                "size": info["size"],
                "speed": info["speed"],
                "velocity": None if info["velocity"] is None else [float(c) for c in info["velocity"]],
                "physics": info["physics"],
            }
            entry.update({k: v for k, v in s.items()})
        objects.append(entry)
    out["objects"] = objects
    return out


def evaluate_video(
    video: Any, caption: str | Scene | dict | None = None, chunk_frames: int | None = None
) -> dict[str, Any]:
    """Evaluate one video (``[F, H, W, 3]`` uint8 or float in [0, 1], numpy or torch) against its caption.

    ``caption`` may be a caption string, a :class:`~.world.Scene`, a :func:`~.world.parse_caption` dict, or None
    (caption-free metrics only: psnr, speed, physics, consistency). Returns a JSON-serialisable dict of the metrics
    in :data:`METRIC_DESCRIPTIONS` over the whole video, ``objects`` (per caption object: what it was matched to),
    and ``per_chunk``: the same metrics for frames ``[k * chunk_frames, (k + 1) * chunk_frames)`` of every chunk
    ``k`` (the last may be shorter; empty when ``chunk_frames`` is None). Motion steps belong to the chunk of their
    end frame, so every step is counted once. Undefined values (e.g. no motion in a 1-frame video) are None.
    """
    target = _caption_objects(caption)
    v = _as_video(video)
    num_frames, height, width, _ = v.shape
    if chunk_frames is not None and (not isinstance(chunk_frames, int) or chunk_frames < 1):
        raise ValueError(f"chunk_frames must be a positive int or None, got {chunk_frames!r}")
    scale = resolution_scale(height, width)

    detections = detect_video(v)
    tracks = _track(detections, scale)
    motions = [_motion(track, height, width) for track in tracks]

    # track-level appearance for the re-render (majority over unoccluded frames, median size)
    render_tracks = []
    for track, motion in zip(tracks, motions):
        dets = list(track.detections.values())
        clear = [d for d in dets if not d.occluded] or dets
        size = min(motion.size, min(height, width) / 2)
        render_tracks.append((track, _mode([d.shape for d in clear]), _mode([d.color for d in dets]), size))
    psnr = [_psnr(v[t], _rerender(detections[t], render_tracks, t, height, width)) for t in range(num_frames)]

    result = _window_metrics(detections, tracks, motions, psnr, target, 0, num_frames, scale)
    result["num_frames"] = num_frames
    result["per_chunk"] = []
    if chunk_frames is not None:
        for k, start in enumerate(range(0, num_frames, chunk_frames)):
            end = min(start + chunk_frames, num_frames)
            chunk = _window_metrics(detections, tracks, motions, psnr, target, start, end, scale)
            chunk.pop("objects", None)
            result["per_chunk"].append({"chunk": k, **chunk})
    return result


def _mean_of(dicts: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    keys = [k for k in METRIC_DESCRIPTIONS if any(k in d for d in dicts)]
    out: dict[str, float | None] = {}
    for key in keys:
        values = [d[key] for d in dicts if d.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def evaluate_batch(
    videos: Sequence[Any] | Any,
    captions: Sequence[str | Scene | dict | None],
    chunk_frames: int | None = None,
    return_per_video: bool = False,
) -> dict[str, Any]:
    """Evaluate many videos; ``mean`` of every metric over videos and ``per_chunk`` means over the videos that have
    that chunk (None values are skipped). ``per_video`` holds the individual results if ``return_per_video``."""
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions")
    results = [evaluate_video(v, c, chunk_frames=chunk_frames) for v, c in zip(videos, captions)]
    num_chunks = max((len(r["per_chunk"]) for r in results), default=0)
    per_chunk = []
    for k in range(num_chunks):
        chunks = [r["per_chunk"][k] for r in results if len(r["per_chunk"]) > k]
        per_chunk.append({"chunk": k, "num_videos": len(chunks), **_mean_of(chunks)})
    out: dict[str, Any] = {"num_videos": len(results), "mean": _mean_of(results), "per_chunk": per_chunk}
    if return_per_video:
        out["per_video"] = results
    return out


def detections_to_dict(detections: list[FrameDetection]) -> list[dict[str, Any]]:
    """JSON-serialisable form of :func:`detect_video`'s output."""
    return [asdict(d) for d in detections]
