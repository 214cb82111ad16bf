"""Analytic ShapesWorld evaluator: measure a video against its caption from the pixels alone (no learned weights).

Pipeline (``docs/shapesworld.md`` defines every metric):

1. :func:`detect_video` — per frame: background = per-channel median of the border pixels, named by the nearest
   :data:`~.world.BACKGROUNDS` colour; foreground = pixels farther than :data:`FG_THRESHOLD` from it; each
   foreground pixel gets the palette colour whose segment to the background passes closest (so anti-aliased or
   blurred edges keep their colour); 4-connected components (:func:`label_components`), split by colour when two
   objects overlap. Per object: colour = the majority colour of the component's eroded core; coverage of each pixel
   = projection of (pixel - background) on (colour - background); size and position from the coverage moments
   (area, centroid), shape = nearest prototype in (bounding-box fill ratio, vertical centroid offset).
2. Tracking — detections are linked frame to frame (nearest position, same colour), same-colour tracks broken by
   an occlusion are re-joined, and an object touching another is *occluded* (its position unreliable) unless its
   area is its usual area, i.e. unless it is the one in front.
3. Motion — per track, each step between consecutive unoccluded detections is explained as a straight move or as
   reflections off the walls (the explanation closest to the previous step's velocity). That *unfolds* the
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
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .world import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    Scene,
    compose_frame,
    parse_caption,
    resolution_scale,
)

__all__ = [
    "FG_THRESHOLD",
    "METRIC_DESCRIPTIONS",
    "PSNR_MAX",
    "DetectedObject",
    "FrameDetection",
    "detect_frame",
    "detections_to_dict",
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
#: A palette colour is present in a component when it holds this fraction of the component's core pixels (and at
#: least the minimum object area); a component with two present colours is split by colour.
SPLIT_FRACTION = 0.05
#: A touching object whose area is within this relative tolerance of its usual area is whole (in front); otherwise
#: it is occluded and its position is not used for motion (its position error grows past 0.1 px beyond ~1.5 %).
WHOLE_AREA_TOLERANCE = 0.015
#: PSNR cap (dB): an exact re-render has MSE 0.
PSNR_MAX = 50.0
#: Below this speed (px/frame at 64 px) an object is static and has no direction.
STATIC_SPEED = 0.25
#: Walls are where a box centre of the track's median detected size would turn; a bounce is also accepted this far
#: (px at 64 px) from them, since a blurred or distorted object's size (hence its wall) is misjudged by a pixel or two.
WALL_TOLERANCE = 2.5
#: A bounce off such a tolerated wall is taken only when it fits the previous velocity this much better (px/frame at
#: 64 px) than the other explanations of the step.
BOUNCE_MARGIN = 0.5
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
    "shape, direction, speed class of the most persistent objects, as many as the caption names)",
    "background_accuracy": "1 if the detected background has the caption's colour",
    "count_accuracy": "1 if the number of persistent objects equals the caption's",
    "color_accuracy": "fraction of caption objects whose matched object has the caption's colour",
    "shape_accuracy": "fraction of caption objects whose matched object has the caption's shape",
    "direction_accuracy": "fraction of caption objects moving within 45 degrees of the caption's direction",
    "speed_accuracy": "fraction of caption objects whose speed is nearer (log scale) the caption's speed class",
    # (an object hidden behind another for the whole window has no direction/speed score; a missing one scores 0)
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
    Returns int64 labels: -1 for background, otherwise the flat index of the component's first pixel (row-major).
    Min-label propagation along the joined neighbour pairs with pointer jumping: a label is always the index of a
    pixel of the same component, so ``label[label[i]]`` is a valid shortcut.
    """
    classes = np.asarray(classes)
    cls = np.where(classes, 0, -1) if classes.dtype == bool else classes.astype(np.int64)
    fg = cls >= 0
    pixels = np.flatnonzero(fg)  # sorted, so the smallest compact index is the smallest flat index
    compact = np.full(cls.size, -1, dtype=np.int64)
    compact[pixels] = np.arange(len(pixels))
    width = cls.shape[-1]
    edges = []
    for join, step in (
        (fg[..., :, :-1] & (cls[..., :, :-1] == cls[..., :, 1:]), 1),
        (fg[..., :-1, :] & (cls[..., :-1, :] == cls[..., 1:, :]), width),
    ):
        pad = [(0, 0)] * (cls.ndim - 1) + [(0, 1)] if step == 1 else [(0, 0)] * (cls.ndim - 2) + [(0, 1), (0, 0)]
        src = np.flatnonzero(np.pad(join, pad))
        edges.append((compact[src], compact[src + step]))  # each pixel appears once per side: plain assignment
    labels = np.arange(len(pixels))
    while True:
        new = labels.copy()
        for a, b in edges:
            m = np.minimum(new[a], new[b])
            new[a] = m
            new[b] = np.minimum(new[b], m)
        new = new[new]
        new = new[new]
        if np.array_equal(new, labels):
            break
        labels = new
    out = np.full(cls.shape, -1, dtype=np.int64)
    out.reshape(-1)[pixels] = pixels[labels]
    return out


def _dilate_labels(labels: np.ndarray) -> np.ndarray:
    """Give every unlabelled pixel (< 0) the largest label among its 8 neighbours (one-pixel dilation)."""
    padded = np.pad(labels, [(0, 0)] * (labels.ndim - 2) + [(1, 1), (1, 1)], constant_values=-1)
    height, width = labels.shape[-2:]
    neighbours = np.max(
        [padded[..., 1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width] for dr in (-1, 0, 1) for dc in (-1, 0, 1)],
        axis=0,
    )
    return np.where(labels >= 0, labels, neighbours)


def _near_other_label(labels: np.ndarray, radius: int) -> np.ndarray:
    """Labels (>= 0) that have a pixel within ``radius`` (Chebyshev) of a pixel with another label >= 0."""
    height, width = labels.shape[-2:]
    pad = [(0, 0)] * (labels.ndim - 2) + [(radius, radius), (radius, radius)]
    hi = np.pad(labels, pad, constant_values=-1)
    lo = np.pad(np.where(labels >= 0, labels, np.iinfo(np.int64).max), pad, constant_values=np.iinfo(np.int64).max)
    window = [(dr, dc) for dr in range(2 * radius + 1) for dc in range(2 * radius + 1)]
    near_max = np.max([hi[..., dr : dr + height, dc : dc + width] for dr, dc in window], axis=0)
    near_min = np.min([lo[..., dr : dr + height, dc : dc + width] for dr, dc in window], axis=0)
    own = labels >= 0
    return np.unique(labels[own & ((near_max != labels) | (near_min != labels))])


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
    """One object in one frame. ``(x, y)`` is the bounding-box centre and ``size`` the half-extent, in px; ``area``
    is the covered area (sum of coverages). ``touching``: its pixels touch another object's. ``occluded``: it may be
    partly hidden, so its position and shape are unreliable; :func:`detect_video` sets it to ``touching`` and the
    tracker clears it for an object in front (area within 1.5 % of the track's median unoccluded area)."""

    color: str
    shape: str
    x: float
    y: float
    size: float
    area: float
    fill: float
    offset: float
    touching: bool
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


def _blend_residual(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Squared distance ``[P, K]`` of each pixel to the segment from its background to each palette colour.

    A pixel partly covered by an object (anti-aliased or blurred edge) is a blend ``b + a (c - b)``; classifying it
    by the nearest *segment* rather than the nearest colour keeps, e.g., an orange/white edge from reading as yellow.
    """
    d = pixels - background  # [P, 3]
    e = _COLOR_RGB[None] - background[:, None]  # [P, K, 3]
    ee = np.maximum((e * e).sum(-1), 1e-6)
    de = np.einsum("pc,pkc->pk", d, e)
    a = np.clip(de / ee, 0.0, 1.0)
    return (d * d).sum(-1, keepdims=True) - 2 * a * de + a * a * ee


def detect_video(video: Any) -> list[FrameDetection]:
    """Detect background and objects in every frame of ``video`` (``[F, H, W, 3]`` uint8 or float in [0, 1])."""
    v = _as_video(video)
    num_frames, height, width, _ = v.shape
    min_area = max(4, round(MIN_AREA_FRACTION * height * width))

    n_colours = len(_COLOR_NAMES)
    pixels_rgb = v.reshape(-1, 3)

    border = np.concatenate([v[:, 0], v[:, -1], v[:, 1:-1, 0], v[:, 1:-1, -1]], axis=1)  # [F, N, 3]
    bg_rgb = np.median(border, axis=1)  # [F, 3]
    bg_idx = np.argmin(((bg_rgb[:, None] - _BG_RGB[None]) ** 2).sum(-1), axis=1)
    diff = v - bg_rgb[:, None, None]
    fg = np.einsum("fhwc,fhwc->fhw", diff, diff) > FG_THRESHOLD**2  # [F, H, W]

    # everything below works on the foreground pixels only (flat indices into [F, H, W])
    fg_px = np.flatnonzero(fg)
    colour_cost = _blend_residual(pixels_rgb[fg_px], bg_rgb[fg_px // (height * width)])  # [P, K]
    pixel_cls = np.argmin(colour_cost, axis=1)

    # pass 1: foreground components; which palette colours are present in each component's core
    comp_ids, comp = np.unique(label_components(fg).reshape(-1)[fg_px], return_inverse=True)
    num_comp = len(comp_ids)
    area = np.bincount(comp, minlength=num_comp)
    core = _erode(fg).reshape(-1)[fg_px]
    core_hist = np.bincount(comp[core] * n_colours + pixel_cls[core], minlength=num_comp * n_colours)
    all_hist = np.bincount(comp * n_colours + pixel_cls, minlength=num_comp * n_colours)
    core_hist, all_hist = core_hist.reshape(num_comp, n_colours), all_hist.reshape(num_comp, n_colours)
    hist = np.where(core_hist.sum(1, keepdims=True) > 0, core_hist, all_hist)
    dominant = hist.argmax(1)
    present = (hist >= SPLIT_FRACTION * hist.sum(1, keepdims=True)) & (hist >= min_area)
    present[np.arange(num_comp), dominant] = True
    keep = area >= min_area
    split = keep & (present.sum(1) > 1)

    # pass 2: one colour per component, or the nearest present colour inside split components; components again
    colour_of = np.where(keep[comp], dominant[comp], -1)
    in_split = split[comp]
    if split.any():
        masked = np.where(present[comp[in_split]], colour_cost[in_split], np.inf)
        colour_of[in_split] = np.argmin(masked, axis=1)
        colour_map = np.full(fg.size, -1, dtype=np.int64)
        colour_map[fg_px] = colour_of
        obj_label = label_components(colour_map.reshape(fg.shape)).reshape(-1)[fg_px]
    else:
        obj_label = np.where(colour_of >= 0, comp_ids[comp], -1)

    # drop specks, then give each object the one-pixel ring around it (anti-aliased edges below FG_THRESHOLD)
    ids, inverse, counts = np.unique(obj_label, return_inverse=True, return_counts=True)
    obj_label = np.where((counts >= min_area) & (ids >= 0), ids, -1)[inverse]
    dense = np.full(fg.size, -1, dtype=np.int64)
    dense[fg_px] = obj_label
    region = _dilate_labels(dense.reshape(fg.shape)).reshape(-1)
    region_px = np.flatnonzero(region >= 0)
    obj_ids, obj = np.unique(region[region_px], return_inverse=True)
    n_obj = len(obj_ids)
    labelled = obj_label >= 0
    lut = np.full(fg.size, -1, dtype=np.int64)
    lut[obj_ids] = np.arange(n_obj)
    o_colour = np.zeros(n_obj, dtype=np.int64)
    o_colour[lut[obj_label[labelled]]] = colour_of[labelled]
    o_touching = np.zeros(n_obj, dtype=bool)  # within 2 px of another object
    o_touching[lut[_near_other_label(dense.reshape(fg.shape), radius=2)]] = True

    # coverage of each region pixel by its object: projection of (pixel - background) on (colour - background)
    frame_of = region_px // (height * width)
    colour = _COLOR_RGB[o_colour[obj]]
    bg = bg_rgb[frame_of]
    alpha = ((pixels_rgb[region_px] - bg) * (colour - bg)).sum(1) / np.maximum(((colour - bg) ** 2).sum(1), 1e-6)
    alpha = np.clip(alpha, 0.0, 1.0)
    rows = (region_px // width) % height + 0.5
    cols = region_px % width + 0.5
    o_area = np.bincount(obj, weights=alpha, minlength=n_obj)
    o_sx = np.bincount(obj, weights=alpha * cols, minlength=n_obj)
    o_sy = np.bincount(obj, weights=alpha * rows, minlength=n_obj)

    # shape features from the half-covered pixels: bounding-box fill ratio and vertical centroid offset
    half = alpha >= 0.5
    o_count = np.bincount(obj[half], minlength=n_obj).astype(np.float64)
    r_min, r_max = np.full(n_obj, np.inf), np.full(n_obj, -np.inf)
    c_min, c_max = np.full(n_obj, np.inf), np.full(n_obj, -np.inf)
    np.minimum.at(r_min, obj[half], rows[half])
    np.maximum.at(r_max, obj[half], rows[half])
    np.minimum.at(c_min, obj[half], cols[half])
    np.maximum.at(c_max, obj[half], cols[half])

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
        if o_count[j] == 0:
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
                touching=bool(o_touching[j]),
                occluded=bool(o_touching[j]),
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
    """Link detections into tracks, then merge same-colour tracks interrupted by an occlusion.

    1. Frame to frame, greedily by distance (within ``(2 * fast speed + 4) px`` per frame since the track's last
       detection). A colour change costs a large penalty and is only allowed when no track has the detection's colour
       (so a flickering colour stays one track, but two objects never swap identity while one is hidden).
    2. A track whose clear (not touching) detections all come after those of an earlier track of the same colour
       continues it (re-identification after an occlusion).
    3. A touching detection is occluded unless its area is within :data:`WHOLE_AREA_TOLERANCE` of the track's usual
       (median clear) area, i.e. unless it is the object in front.
    """
    tracks: list[_Track] = []
    max_step = (2 * SPEEDS["fast"] + 4) * scale
    for t, frame in enumerate(detections):
        colours = {track.last()[1].color for track in tracks}
        candidates = []
        for i, track in enumerate(tracks):
            t_last, last = track.last()
            for j, obj in enumerate(frame.objects):
                d = math.hypot(obj.x - last.x, obj.y - last.y)
                same = obj.color == last.color
                if d <= max_step * (t - t_last) and (same or obj.color not in colours):
                    candidates.append((d + (0 if same else 4 * max_step), i, j))
        used_tracks, used_objs = set(), set()
        for _, i, j in sorted(candidates):
            if i not in used_tracks and j not in used_objs:
                tracks[i].detections[t] = frame.objects[j]
                used_tracks.add(i)
                used_objs.add(j)
        tracks.extend(_Track({t: obj}) for j, obj in enumerate(frame.objects) if j not in used_objs)

    def clear_frames(track: _Track) -> list[int]:
        return sorted(t for t, d in track.detections.items() if not d.touching) or sorted(track.detections)

    def colour(track: _Track) -> str:
        return _mode([d.color for d in track.detections.values()])

    merged: list[_Track] = []
    for track in sorted(tracks, key=lambda tr: clear_frames(tr)[0]):
        earlier = [m for m in merged if colour(m) == colour(track) and clear_frames(m)[-1] < clear_frames(track)[0]]
        if not earlier:
            merged.append(track)
            continue
        target = max(earlier, key=lambda m: clear_frames(m)[-1])
        for t, d in track.detections.items():  # on shared frames keep the larger (more visible) detection
            if t not in target.detections or d.area > target.detections[t].area:
                target.detections[t] = d
        target.detections = dict(sorted(target.detections.items()))

    for track in merged:
        clear = [d.area for d in track.detections.values() if not d.touching]
        usual = float(np.median(clear)) if clear else max(d.area for d in track.detections.values())
        for t, d in track.detections.items():
            if d.touching:
                track.detections[t] = replace(d, occluded=abs(d.area / usual - 1) > WHOLE_AREA_TOLERANCE)
    return merged


# ------------------------------------------------------------------------------------------------ motion
@dataclass
class _Motion:
    """Unfolded motion of one track: one row per step between consecutive unoccluded detections."""

    size: float
    end_frames: np.ndarray  # [S] frame index at the end of each step
    gaps: np.ndarray  # [S] frames per step
    unfolded: np.ndarray  # [S, 2] unfolded velocity (px/frame), initial orientation of the track


def _unfold_axis(
    pos: np.ndarray,
    gaps: np.ndarray,
    lo: float,
    hi: float,
    ref_speed: float,
    tolerance: float = 0.0,
    margin: float = 0.0,
) -> np.ndarray:
    """Unfolded velocity of each step along one axis with walls at ``lo``/``hi`` (the box centre's range).

    Reflecting the line at the walls maps a bouncing path to a straight one: the end ``p1`` of a step of ``g``
    frames from ``p0`` is, on the unfolded line, one of its images ``p1 + 2nL`` (an even number of reflections) or
    ``2 hi - p1 + 2nL`` (odd; ``L = hi - lo``), i.e. a world velocity ``(image - p0) / g`` before the step. The first
    step takes the explanation whose speed is closest to ``ref_speed``; later ones the explanation whose unfolded
    velocity is closest to the previous step's (continuity), ties going to fewer reflections. An odd number of
    reflections flips the sign that maps world velocity to unfolded velocity.

    ``tolerance`` (px) allows for walls estimated from a misjudged size (a blurred or distorted object): after the
    first step, a single bounce may also have happened at any wall position ``W`` within ``tolerance`` of ``hi`` (or
    ``lo``) and beyond both ends of the step (a box centre never passes its wall); the ``W`` whose velocity
    ``(2W - p0 - p1) / g`` is closest to the previous one is the candidate, and its cost carries ``margin``
    (px/frame), so it wins only over explanations that clearly break continuity. With exact walls (a rendered video)
    the exact explanation costs nothing and is kept.
    """
    length = max(hi - lo, 1e-6)
    unfolded = np.zeros(len(gaps))
    parity = 1.0
    for s, g in enumerate(gaps):
        p0, p1 = pos[s], pos[s + 1]
        reach = g * (max(ref_speed, abs(unfolded[s - 1]) if s else 0.0) + 1.0) + length
        n_max = int(reach // (2 * length)) + 1
        options = []  # (world velocity before the step, number of reflections)
        for n in range(-n_max, n_max + 1):
            options.append(((p1 + 2 * n * length - p0) / g, 2 * abs(n)))
            options.append(((2 * hi - p1 + 2 * n * length - p0) / g, 2 * abs(n) + 1 if n >= 0 else 2 * abs(n) - 1))
        tolerant = []  # bounces off a wall within tolerance (after the first step: they need a previous velocity)
        if tolerance > 0 and s > 0:
            target = parity * unfolded[s - 1]  # the previous velocity in world orientation
            far, near = max(p0, p1), min(p0, p1)
            brackets = [  # (lowest, highest) wall position of one bounce off hi, then off lo
                (max(hi - tolerance, far), max(hi, far) + tolerance),
                (min(lo, near) - tolerance, min(lo + tolerance, near)),
            ]
            for w_min, w_max in brackets:
                if w_min > w_max:
                    continue
                v_a, v_b = sorted(((2 * w_min - p0 - p1) / g, (2 * w_max - p0 - p1) / g))
                tolerant.append((float(np.clip(target, v_a, v_b)), 1))
        if s == 0:
            cost = [abs(abs(w) - ref_speed) for w, _ in options]
        else:
            cost = [abs(parity * w - unfolded[s - 1]) for w, _ in options]
            cost += [abs(w - target) + margin for w, _ in tolerant]
            options += tolerant
        best = min(range(len(options)), key=lambda i: (round(cost[i], 9), options[i][1]))
        velocity, reflections = options[best]
        unfolded[s] = parity * velocity
        if reflections % 2:
            parity = -parity
    return unfolded


def _motion(track: _Track, height: int, width: int) -> _Motion:
    """Unfold the track's unoccluded positions; walls from the track's median size."""
    valid = sorted(t for t, d in track.detections.items() if not d.occluded)
    frames = valid if valid else sorted(track.detections)
    size = float(np.median([track.detections[t].size for t in frames]))
    if len(valid) < 2:
        return _Motion(size, np.zeros(0, dtype=int), np.zeros(0, dtype=int), np.zeros((0, 2)))
    pos = np.asarray([[track.detections[t].x, track.detections[t].y] for t in valid])
    times = np.asarray(valid)
    gaps = np.diff(times)
    ref_speed = np.median(np.abs(np.diff(pos, axis=0)) / gaps[:, None], axis=0)  # reflections are a minority
    scale = resolution_scale(height, width)
    tolerance, margin = WALL_TOLERANCE * scale, BOUNCE_MARGIN * scale
    unfolded = np.stack(
        [
            _unfold_axis(pos[:, a], gaps, size, extent - size, ref_speed[a], tolerance, margin)
            for a, extent in enumerate((width, height))
        ],
        axis=1,
    )
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
    return compose_frame(background, [d[1] for d in drawn], height, width)


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
    if motion_measurable and speed is not None:  # speed is None: no unoccluded step in the window (hidden)
        direction = np.asarray(DIRECTIONS[target["direction"]])
        angle = 90.0 if velocity is None else _angle(velocity, direction)  # static: no direction
        out["direction"] = float(velocity is not None and angle < DIRECTION_TOLERANCE)
        out["speed"] = float(velocity is not None and _speed_class(speed, scale) == target["speed"])
        out["direction_error"] = angle
        out["speed_error"] = abs(speed - SPEEDS[target["speed"]] * scale)
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
        # shape and size from the window's unoccluded frames; if hidden throughout, from the whole track's
        clear = [t for t in present if not track.detections[t].occluded]
        clear = clear or [t for t in track.detections if not track.detections[t].occluded] or present
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

    # assignment of persistent objects to caption objects maximising the matched attributes. Only the most
    # persistent objects are candidates, as many as the caption names (longest present, then largest): otherwise a
    # video of many random blobs would find the caption's colours and shapes somewhere among them
    wanted = target["objects"]
    candidates = sorted(persistent, key=lambda i: (-i["frames"], -i["size"]))[: len(wanted)]
    slots = candidates + [None] * len(wanted)
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

    # a missing object fails every attribute; a hidden one (no unoccluded step in the window) has no motion score
    keys = [k for k in _SEMANTIC_KEYS if motion_measurable or k in ("color", "shape")]
    per_attr: dict[str, list[float]] = {k: [] for k in keys}
    for score in scores:
        for k in keys:
            if score is None:
                per_attr[k].append(0.0)
            elif k in score:
                per_attr[k].append(score[k])
    background_ok = float(out["background"] == target["background"])
    count_ok = float(len(persistent) == len(wanted))
    matched = background_ok + count_ok + sum(sum(v) for v in per_attr.values())
    out["semantic_accuracy"] = matched / (2 + sum(len(v) for v in per_attr.values()))
    out["background_accuracy"] = background_ok
    out["count_accuracy"] = count_ok
    for k in _SEMANTIC_KEYS:
        out[f"{k}_accuracy"] = float(np.mean(per_attr[k])) if per_attr.get(k) else None
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
    video: Any, caption: str | Scene | dict | None = None, chunk_frames: int | Sequence[int] | None = None
) -> dict[str, Any]:
    """Evaluate one video (``[F, H, W, 3]`` uint8 or float in [0, 1], numpy or torch) against its caption.

    ``caption`` may be a caption string, a :class:`~.world.Scene`, a :func:`~.world.parse_caption` dict, or None
    (caption-free metrics only: psnr, speed, physics, consistency). Returns a JSON-serialisable dict of the metrics
    in :data:`METRIC_DESCRIPTIONS` over the whole video, ``objects`` (per caption object: what it was matched to),
    and ``per_chunk``: the same metrics for frames ``[k * chunk_frames, (k + 1) * chunk_frames)`` of every chunk
    ``k`` (the last may be shorter; empty when ``chunk_frames`` is None). A list gives the chunk lengths instead, the
    last one repeating: ``[9, 12]`` matches a pipeline decoding chunks of 3 latent frames (9, 12, 12, ... frames).
    Motion steps belong to the chunk of their end frame, so every step is counted once. Undefined values (e.g. no
    motion in a 1-frame video) are None.
    """
    target = _caption_objects(caption)
    v = _as_video(video)
    num_frames, height, width, _ = v.shape
    bounds = _chunk_bounds(num_frames, chunk_frames)
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
    for k, (start, end) in enumerate(bounds):
        chunk = _window_metrics(detections, tracks, motions, psnr, target, start, end, scale)
        chunk.pop("objects", None)
        result["per_chunk"].append({"chunk": k, **chunk})
    return result


def _chunk_bounds(num_frames: int, chunk_frames: int | Sequence[int] | None) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk: ``chunk_frames`` frames each, or the given lengths (the last one repeats)."""
    if chunk_frames is None:
        return []
    lengths = list(chunk_frames) if isinstance(chunk_frames, (list, tuple)) else [chunk_frames]
    if not lengths or any(not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1 for n in lengths):
        raise ValueError(
            f"chunk_frames must be a positive int, a non-empty list of them, or None; got {chunk_frames!r}"
        )
    bounds, start = [], 0
    while start < num_frames:
        length = int(lengths[min(len(bounds), len(lengths) - 1)])
        bounds.append((start, min(start + length, num_frames)))
        start += length
    return bounds


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
    chunk_frames: int | Sequence[int] | None = None,
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
