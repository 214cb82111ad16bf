"""ShapesWorld: a procedural text-to-video world of coloured shapes bouncing on a flat background.

Everything is defined in pixels of the video being rendered; the reference resolution is 64x64 and sizes and
speeds scale with ``min(height, width) / 64``.

* Geometry. Pixel ``(row i, column j)`` is the unit square ``[j, j + 1] x [i, i + 1]`` (centre ``(j + 0.5,
  i + 0.5)``); ``y`` points down. An object's *position* is the centre of its bounding box and its *size* ``h`` is
  the half-extent of that box, so every shape occupies ``[x - h, x + h] x [y - h, y + h]``.
  circle: ``|p - c| <= h``; square: ``|dx|, |dy| <= h``; triangle: apex ``(x, y - h)``, base ``y + h`` from
  ``x - h`` to ``x + h``.
* Rendering. Anti-aliased: a pixel's coverage ``a`` by a shape is the fraction of its 8x8 sub-pixel samples inside
  the shape (exact geometric tests), and objects are composited in order, ``pixel = (1 - a) pixel + a colour``.
  Hard edges would quantise an object's position to whole pixels (+-0.5 px for a square), too coarse to measure a
  speed of 1 px/frame; with coverage, position and size are recoverable to ~0.05 px from the pixels, and the
  evaluator re-renders what it detects with the same function.
* Motion. Each object moves in a straight line at a constant speed (``SPEEDS`` px/frame at 64 px) and reflects off
  the walls: when its bounding box reaches an edge the velocity component normal to that edge flips. Position at
  frame ``t`` is closed-form (a triangle wave per axis, :func:`trajectory`), so any number of frames can be rendered.
* Captions. ``"a red circle moving quickly left on a black background"``;
  two objects: ``"a red circle moving quickly left and a blue square moving slowly up on a white background"``.
  The grammar is fixed; :func:`parse_caption` inverts :func:`caption`. The direction in a caption is the initial
  direction of motion.
* Splits. 15 % of the (shape, colour, direction) combinations are held out (:data:`HELD_OUT_COMBOS`); a ``"train"``
  scene uses only the other combinations, a ``"test"`` scene contains at least one held-out combination.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DEFAULT_NUM_FRAMES",
    "DIRECTIONS",
    "HELD_OUT_COMBOS",
    "HELD_OUT_FRACTION",
    "REFERENCE_RESOLUTION",
    "SHAPES",
    "SIZE_RANGE",
    "SPEEDS",
    "SPEED_WORDS",
    "SPLITS",
    "SUPERSAMPLING",
    "ObjectSpec",
    "Scene",
    "all_captions",
    "build_dataset",
    "caption",
    "combo_split",
    "compose_frame",
    "is_held_out",
    "parse_caption",
    "render_frame",
    "render_video",
    "resolution_scale",
    "sample_scene",
    "scene_from_attributes",
    "shape_coverage",
    "trajectory",
    "velocities",
    "vocabulary",
]

# ------------------------------------------------------------------------------------------------ vocabulary
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Object colours (RGB, uint8). Pairwise RGB distance >= 0.37 and distance to every background >= 0.45 (in [0, 1]
#: units), so a colour survives a lossy VAE and blends towards the background are not mistaken for another colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (170, 60, 210),
    "cyan": (40, 210, 220),
    "orange": (250, 130, 20),
    "white": (240, 240, 240),
}

#: Flat background colours (RGB, uint8). An object never has the background's name (no white on white).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "navy": (20, 25, 80),
}

#: Unit direction vectors in image coordinates (``y`` points down).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}

#: Speeds in pixels per frame at the reference resolution (scaled by :func:`resolution_scale`).
SPEEDS: dict[str, float] = {"slow": 1.0, "fast": 2.5}
#: The adverb of each speed in captions.
SPEED_WORDS: dict[str, str] = {"slow": "slowly", "fast": "quickly"}

#: Range of the object half-extent ``h`` in pixels at the reference resolution (objects are 14-22 px wide at 64 px).
SIZE_RANGE: tuple[float, float] = (7.0, 11.0)
REFERENCE_RESOLUTION = 64
#: 21 frames = 6 latent frames with Wan's 4x temporal compression (two chunks of 3 latent frames).
DEFAULT_NUM_FRAMES = 21
SPLITS: tuple[str, ...] = ("train", "test")
HELD_OUT_FRACTION = 0.15
#: Sub-pixel samples per axis used to estimate pixel coverage (anti-aliasing): 8 x 8 = 64 samples per pixel.
SUPERSAMPLING = 8
_MIN_GAP = 2.0  # px at 64: minimum gap between the bounding boxes of two objects at frame 0


def _combo_hash(combo: tuple[str, str, str]) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(combo).encode(), digest_size=8).digest(), "big")


def _held_out_combos() -> frozenset[tuple[str, str, str]]:
    combos = [(s, c, d) for s in SHAPES for c in COLORS for d in DIRECTIONS]
    n_held_out = round(HELD_OUT_FRACTION * len(combos))
    return frozenset(sorted(combos, key=_combo_hash)[:n_held_out])


#: The (shape, colour, direction) combinations never seen in training: the ``round(0.15 * N)`` combinations with
#: the smallest BLAKE2b hash of ``"shape|colour|direction"`` (deterministic, independent of any seed).
HELD_OUT_COMBOS: frozenset[tuple[str, str, str]] = _held_out_combos()


def resolution_scale(height: int, width: int) -> float:
    """Pixels at this resolution per pixel at 64x64: ``min(height, width) / 64``."""
    return min(height, width) / REFERENCE_RESOLUTION


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


# ------------------------------------------------------------------------------------------------ scenes
@dataclass
class ObjectSpec:
    """One object: ``size`` is the half-extent in px, ``(x0, y0)`` the initial bounding-box centre in px."""

    shape: str
    color: str
    size: float
    x0: float
    y0: float
    direction: str
    speed: str

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("color", self.color, list(COLORS))
        _check_choice("direction", self.direction, list(DIRECTIONS))
        _check_choice("speed", self.speed, list(SPEEDS))
        if not self.size > 0:
            raise ValueError(f"size must be positive, got {self.size}")

    @property
    def combo(self) -> tuple[str, str, str]:
        """The (shape, colour, direction) combination that decides the split."""
        return (self.shape, self.color, self.direction)


@dataclass
class Scene:
    """A background and 1-2 objects (more are allowed when built by hand) on a ``width x height`` canvas."""

    background: str
    objects: list[ObjectSpec] = field(default_factory=list)
    width: int = REFERENCE_RESOLUTION
    height: int = REFERENCE_RESOLUTION

    def __post_init__(self) -> None:
        _check_choice("background", self.background, list(BACKGROUNDS))
        self.objects = [o if isinstance(o, ObjectSpec) else ObjectSpec(**o) for o in self.objects]
        for obj in self.objects:
            if obj.color == self.background:
                raise ValueError(f"object colour {obj.color!r} equals the background colour")
            if 2 * obj.size > min(self.width, self.height):
                raise ValueError(f"object size {obj.size} does not fit a {self.width}x{self.height} canvas")

    @property
    def scale(self) -> float:
        return resolution_scale(self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def combo_split(shape: str, color: str, direction: str) -> str:
    """``"test"`` if the (shape, colour, direction) combination is held out, else ``"train"``."""
    return "test" if (shape, color, direction) in HELD_OUT_COMBOS else "train"


def is_held_out(scene: Scene) -> bool:
    """True if any object of ``scene`` uses a held-out combination (such a scene belongs to the test split)."""
    return any(obj.combo in HELD_OUT_COMBOS for obj in scene.objects)


def _as_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def sample_scene(
    seed: int | np.random.Generator | None = None,
    num_objects: int | None = None,
    split: str | None = None,
    height: int = REFERENCE_RESOLUTION,
    width: int = REFERENCE_RESOLUTION,
) -> Scene:
    """Sample a scene; deterministic for an integer ``seed``.

    ``num_objects`` (1 or 2) is drawn uniformly when None. Objects get distinct colours, none equal to the background,
    and disjoint bounding boxes at frame 0. ``split="train"``/``"test"`` resamples the attributes until the scene
    belongs to that split (``None``: any scene).
    """
    if split is not None:
        _check_choice("split", split, SPLITS)
    if num_objects is not None and num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1, 2 or None, got {num_objects}")
    rng = _as_rng(seed)
    n = int(rng.integers(1, 3)) if num_objects is None else num_objects
    scale = resolution_scale(height, width)
    for _ in range(10_000):
        background = str(rng.choice(list(BACKGROUNDS)))
        colors = rng.choice([c for c in COLORS if c != background], size=n, replace=False)
        objects = []
        for color in colors:
            size = float(rng.uniform(*SIZE_RANGE)) * scale
            objects.append(
                ObjectSpec(
                    shape=str(rng.choice(SHAPES)),
                    color=str(color),
                    size=size,
                    x0=float(rng.uniform(size, width - size)),
                    y0=float(rng.uniform(size, height - size)),
                    direction=str(rng.choice(list(DIRECTIONS))),
                    speed=str(rng.choice(list(SPEEDS))),
                )
            )
        if n == 2:
            a, b = objects
            gap = _MIN_GAP * scale
            if abs(a.x0 - b.x0) < a.size + b.size + gap and abs(a.y0 - b.y0) < a.size + b.size + gap:
                continue
        scene = Scene(background=background, objects=objects, width=width, height=height)
        if split is None or (split == "test") == is_held_out(scene):
            return scene
    raise RuntimeError("could not sample a scene")  # pragma: no cover - needs a degenerate vocabulary


#: The caption attributes :func:`edit_scene` can change.
EDITABLE_ATTRIBUTES: tuple[str, ...] = ("background", "color", "shape", "direction", "speed")
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def edit_scene(scene: Scene, attribute: str, seed: int | np.random.Generator | None = None) -> Scene:
    """A copy of ``scene`` with one caption attribute changed, for counterfactual captions.

    ``"background"`` gets another background that no object has the colour of; for the object attributes one object
    is drawn uniformly and gets: the opposite ``"direction"``, the other ``"speed"``, another ``"shape"`` drawn
    uniformly, or another ``"color"`` drawn uniformly among those that neither the background nor another object has.
    Positions and sizes are kept, so the edited scene's caption differs from ``caption(scene)`` in that one attribute
    and its video differs only where the attribute shows. Deterministic for an integer ``seed``.
    """
    _check_choice("attribute", attribute, EDITABLE_ATTRIBUTES)
    if not scene.objects:
        raise ValueError("scene has no objects to edit")
    rng = _as_rng(seed)
    objects = [replace(o) for o in scene.objects]
    if attribute == "background":
        taken = {o.color for o in objects}
        choices = [b for b in BACKGROUNDS if b != scene.background and b not in taken]
        return replace(scene, background=str(rng.choice(choices)), objects=objects)
    k = int(rng.integers(len(objects)))
    obj = objects[k]
    if attribute == "direction":
        value = _OPPOSITE[obj.direction]
    elif attribute == "speed":
        value = next(s for s in SPEEDS if s != obj.speed)
    elif attribute == "shape":
        value = str(rng.choice([s for s in SHAPES if s != obj.shape]))
    else:
        taken = {scene.background} | {o.color for o in objects}
        choices = [c for c in COLORS if c not in taken]
        if not choices:
            raise ValueError("no colour is free for the edit (every colour is used by the scene)")
        value = str(rng.choice(choices))
    objects[k] = replace(obj, **{attribute: value})
    return replace(scene, objects=objects)


# ------------------------------------------------------------------------------------------------ motion
def _fold(u: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Reflect the unfolded coordinate ``u`` into ``[lo, hi]``; also return the sign of the velocity (+1/-1)."""
    length = hi - lo
    if length <= 0:
        return np.full_like(u, lo), np.ones_like(u)
    m = np.mod(u - lo, 2 * length)
    folded = np.where(m <= length, m, 2 * length - m)
    sign = np.where(m < length, 1.0, -1.0)
    return lo + folded, sign


def _velocity(obj: ObjectSpec, scale: float) -> np.ndarray:
    return np.asarray(DIRECTIONS[obj.direction]) * SPEEDS[obj.speed] * scale


def _motion(scene: Scene, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    t = np.arange(num_frames, dtype=np.float64)
    positions = np.zeros((num_frames, len(scene.objects), 2))
    vels = np.zeros((num_frames, len(scene.objects), 2))
    for k, obj in enumerate(scene.objects):
        v = _velocity(obj, scene.scale)
        for axis, (p0, extent) in enumerate(((obj.x0, scene.width), (obj.y0, scene.height))):
            pos, sign = _fold(p0 + v[axis] * t, obj.size, extent - obj.size)
            positions[:, k, axis] = pos
            vels[:, k, axis] = v[axis] * sign
    return positions, vels


def trajectory(scene: Scene, num_frames: int) -> np.ndarray:
    """Bounding-box centres ``[num_frames, num_objects, 2]`` (x, y) in px, bouncing off the walls (closed form).

    Per axis, the unfolded coordinate ``u(t) = p0 + v t`` is reflected into ``[h, extent - h]`` (a triangle wave),
    which equals stepping ``p += v`` and mirroring ``p`` and ``v`` whenever the box crosses an edge.
    """
    return _motion(scene, num_frames)[0]


def velocities(scene: Scene, num_frames: int) -> np.ndarray:
    """Velocity ``[num_frames, num_objects, 2]`` in px/frame at each frame (after the reflections up to that frame)."""
    return _motion(scene, num_frames)[1]


# ------------------------------------------------------------------------------------------------ rendering
def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Exact inside test of points at offset ``(dx, dy)`` from the bounding-box centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= size * size
    if shape == "square":
        return (np.abs(dx) <= size) & (np.abs(dy) <= size)
    # triangle, apex up: the half-width grows linearly from 0 at dy = -h to h at dy = +h
    return (dy >= -size) & (dy <= size) & (np.abs(dx) <= (dy + size) / 2)


def shape_coverage(
    shape: str, x: float, y: float, size: float, height: int, width: int, samples: int = SUPERSAMPLING
) -> np.ndarray:
    """Fraction ``[height, width]`` (float32 in [0, 1]) of each pixel covered by the shape.

    Estimated with ``samples x samples`` sub-pixel sample points (exact inside tests); ``samples=1`` gives hard
    edges (a pixel is covered iff its centre is inside).
    """
    _check_choice("shape", shape, SHAPES)
    coverage = np.zeros((height, width), dtype=np.float32)
    r0, r1 = max(0, math.floor(y - size)), min(height, math.ceil(y + size) + 1)
    c0, c1 = max(0, math.floor(x - size)), min(width, math.ceil(x + size) + 1)
    if r0 >= r1 or c0 >= c1:
        return coverage
    offsets = (np.arange(samples, dtype=np.float64) + 0.5) / samples
    py = (np.arange(r0, r1, dtype=np.float64)[:, None] + offsets[None, :]).reshape(-1)  # [rows * samples]
    px = (np.arange(c0, c1, dtype=np.float64)[:, None] + offsets[None, :]).reshape(-1)  # [cols * samples]
    inside = _inside(shape, px[None, :] - x, py[:, None] - y, size)
    inside = inside.reshape(r1 - r0, samples, c1 - c0, samples)
    coverage[r0:r1, c0:c1] = inside.mean(axis=(1, 3))
    return coverage


def compose_frame(
    background: Sequence[float],
    objects: Sequence[tuple[str, Sequence[float], float, float, float]],
    height: int,
    width: int,
) -> np.ndarray:
    """Float ``[height, width, 3]`` in [0, 1]: ``objects`` = (shape, rgb in [0, 1], x, y, size), drawn in order with
    the "over" operator ``frame = (1 - a) * frame + a * rgb`` where ``a`` is the pixel coverage."""
    frame = np.empty((height, width, 3), dtype=np.float32)
    frame[:] = np.asarray(background, dtype=np.float32)
    for shape, rgb, x, y, size in objects:
        alpha = shape_coverage(shape, x, y, size, height, width)[..., None]
        frame += alpha * (np.asarray(rgb, dtype=np.float32) - frame)
    return frame


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)


def render_frame(scene: Scene, positions: np.ndarray) -> np.ndarray:
    """Render one frame: uint8 ``[height, width, 3]`` with the objects at ``positions`` ``[num_objects, 2]``."""
    positions = np.asarray(positions, dtype=np.float64).reshape(len(scene.objects), 2)
    objects = [
        (obj.shape, np.asarray(COLORS[obj.color]) / 255.0, x, y, obj.size)
        for obj, (x, y) in zip(scene.objects, positions)
    ]
    return _to_uint8(
        compose_frame(np.asarray(BACKGROUNDS[scene.background]) / 255.0, objects, scene.height, scene.width)
    )


def render_video(scene: Scene, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    """Render ``num_frames`` frames: uint8 ``[num_frames, height, width, 3]``."""
    positions = trajectory(scene, num_frames)
    video = np.empty((num_frames, scene.height, scene.width, 3), dtype=np.uint8)
    for t in range(num_frames):
        video[t] = render_frame(scene, positions[t])
    return video


# ------------------------------------------------------------------------------------------------ captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. ``"a red circle moving quickly left on a black background"``."""
    if not scene.objects:
        raise ValueError("a scene needs at least one object to have a caption")
    clauses = [
        f"{_article(o.color)} {o.color} {o.shape} moving {SPEED_WORDS[o.speed]} {o.direction}" for o in scene.objects
    ]
    return f"{' and '.join(clauses)} on {_article(scene.background)} {scene.background} background"


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in words)


def _clause_pattern(named: bool) -> str:
    def group(name: str, words: Sequence[str]) -> str:
        return f"(?P<{name}>{_alternation(words)})" if named else f"(?:{_alternation(words)})"

    return (
        f"an? {group('color', list(COLORS))} {group('shape', SHAPES)} moving "
        f"{group('speed', list(SPEED_WORDS.values()))} {group('direction', list(DIRECTIONS))}"
    )


_CLAUSE_RE = re.compile(_clause_pattern(named=True))
_CAPTION_RE = re.compile(
    rf"(?P<objects>{_clause_pattern(False)}(?: and {_clause_pattern(False)})*) "
    rf"on an? (?P<background>{_alternation(list(BACKGROUNDS))}) background"
)
_ADVERB_TO_SPEED = {word: speed for speed, word in SPEED_WORDS.items()}


def parse_caption(text: str) -> dict[str, Any]:
    """Invert :func:`caption`: ``{"background": str, "objects": [{"shape", "color", "direction", "speed"}, ...]}``.

    Case, surrounding whitespace, repeated spaces and a final period are ignored. Raises ``ValueError`` if ``text``
    is not a ShapesWorld caption.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    normalised = " ".join(text.strip().lower().rstrip(".").split())
    match = _CAPTION_RE.fullmatch(normalised)
    if match is None:
        raise ValueError(f"not a ShapesWorld caption: {text!r}")
    objects = [
        {
            "shape": m["shape"],
            "color": m["color"],
            "direction": m["direction"],
            "speed": _ADVERB_TO_SPEED[m["speed"]],
        }
        for m in _CLAUSE_RE.finditer(match["objects"])
    ]
    return {"background": match["background"], "objects": objects}


def all_captions(num_objects: int = 1, background: str | None = None) -> list[str]:
    """Every caption with ``num_objects`` (1 or 2) objects of distinct colours, none equal to the background.

    ``background`` restricts to one background (there are ~125k two-object captions over all backgrounds).
    """
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    backgrounds = list(BACKGROUNDS) if background is None else [background]
    out = []
    for bg in backgrounds:
        _check_choice("background", bg, list(BACKGROUNDS))
        clauses = [
            (c, f"{_article(c)} {c} {s} moving {SPEED_WORDS[v]} {d}")
            for s in SHAPES
            for c in COLORS
            for d in DIRECTIONS
            for v in SPEEDS
            if c != bg
        ]
        tail = f" on {_article(bg)} {bg} background"
        if num_objects == 1:
            out.extend(text + tail for _, text in clauses)
        else:
            out.extend(f"{a} and {b}{tail}" for ca, a in clauses for cb, b in clauses if ca != cb)
    return out


def vocabulary() -> list[str]:
    """Every word that can appear in a caption (for training a tokenizer on the world)."""
    words = ["a", "an", "and", "moving", "on", "background", *SHAPES, *COLORS, *DIRECTIONS, *SPEED_WORDS.values()]
    return list(dict.fromkeys([*words, *BACKGROUNDS]))


# ------------------------------------------------------------------------------------------------ dataset
def _row_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def _attributes(scene: Scene) -> dict[str, Any]:
    return {
        "background": scene.background,
        "num_objects": len(scene.objects),
        "shapes": [o.shape for o in scene.objects],
        "colors": [o.color for o in scene.objects],
        "directions": [o.direction for o in scene.objects],
        "speeds": [o.speed for o in scene.objects],
        "sizes": [o.size for o in scene.objects],
        "x0": [o.x0 for o in scene.objects],
        "y0": [o.y0 for o in scene.objects],
        "height": scene.height,
        "width": scene.width,
    }


def scene_from_attributes(row: dict[str, Any]) -> Scene:
    """Rebuild the :class:`Scene` of a :func:`build_dataset` row (inverse of its attribute columns)."""
    keys = ("shapes", "colors", "sizes", "x0", "y0", "directions", "speeds")
    objects = [
        ObjectSpec(shape=s, color=c, size=h, x0=x, y0=y, direction=d, speed=v)
        for s, c, h, x, y, d, v in zip(*(row[k] for k in keys))
    ]
    return Scene(background=row["background"], objects=objects, width=row["width"], height=row["height"])


def _rows(
    num_samples: int,
    split: str,
    seed: int,
    num_frames: int,
    height: int,
    width: int,
    with_videos: bool,
    world_version: str | None = None,
) -> Iterator[dict[str, Any]]:
    for index in range(num_samples):
        row_seed = _row_seed(seed, index)
        scene = sample_scene(row_seed, split=split, height=height, width=width)
        row = {"prompt": caption(scene), "seed": row_seed, "split": split, **_attributes(scene)}
        if with_videos:
            row["video"] = render_video(scene, num_frames)
        yield row


def build_dataset(
    num_samples: int,
    split: str = "train",
    seed: int = 0,
    num_frames: int | None = None,
    height: int = REFERENCE_RESOLUTION,
    width: int = REFERENCE_RESOLUTION,
    with_videos: bool = False,
) -> datasets.Dataset:
    """A ``datasets.Dataset`` of ``num_samples`` scenes of ``split``; deterministic in ``seed``.

    Columns: ``prompt`` (the caption), ``seed`` (``sample_scene(seed, split=split, height=..., width=...)``
    reproduces the row), ``split``, ``background``, ``num_objects`` and per-object lists ``shapes``, ``colors``,
    ``directions``, ``speeds``, ``sizes``, ``x0``, ``y0``, plus ``height``/``width``. With ``with_videos=True`` also
    ``video``: uint8 ``[num_frames, height, width, 3]`` (``num_frames`` defaults to :data:`DEFAULT_NUM_FRAMES`).
    Rows are generated one at a time into an Arrow table, so memory stays bounded for large video datasets.
    """
    import datasets

    _check_choice("split", split, SPLITS)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if num_frames is None:
        num_frames = DEFAULT_NUM_FRAMES
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    strings = datasets.Sequence(datasets.Value("string"))
    floats = datasets.Sequence(datasets.Value("float64"))
    features = {
        "prompt": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "split": datasets.Value("string"),
        "background": datasets.Value("string"),
        "num_objects": datasets.Value("int32"),
        "shapes": strings,
        "colors": strings,
        "directions": strings,
        "speeds": strings,
        "sizes": floats,
        "x0": floats,
        "y0": floats,
        "height": datasets.Value("int32"),
        "width": datasets.Value("int32"),
    }
    if with_videos:
        features["video"] = datasets.Array4D(shape=(num_frames, height, width, 3), dtype="uint8")
    features = datasets.Features(features)
    kwargs = dict(num_samples=num_samples, split=split, seed=seed, num_frames=num_frames, height=height, width=width)
    if not with_videos:
        return datasets.Dataset.from_list(list(_rows(**kwargs, with_videos=False)), features=features)
    # ``from_generator`` caches by its arguments: the hash of this file's source invalidates stale caches
    kwargs["world_version"] = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=8).hexdigest()
    return datasets.Dataset.from_generator(
        _rows, features=features, gen_kwargs={**kwargs, "with_videos": True}, split=datasets.Split(split)
    )
