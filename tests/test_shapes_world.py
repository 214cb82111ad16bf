"""ShapesWorld generator: determinism, bounce physics against a step-by-step simulation, rendering geometry against
analytic areas and centroids, caption grammar round trips, the held-out split and the dataset."""

import itertools
import math

import numpy as np
import pytest

from diffusers_raven.shapes import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    EDITABLE_ATTRIBUTES,
    HELD_OUT_COMBOS,
    SHAPES,
    SPEEDS,
    ObjectSpec,
    Scene,
    all_captions,
    build_dataset,
    caption,
    combo_split,
    edit_scene,
    is_held_out,
    parse_caption,
    render_frame,
    render_video,
    sample_scene,
    scene_from_attributes,
    shape_coverage,
    trajectory,
    velocities,
    vocabulary,
)


# ------------------------------------------------------------------------------------------------ determinism
def test_sample_scene_and_render_are_deterministic_per_seed():
    for seed in range(10):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b
        assert np.array_equal(render_video(a, 9), render_video(b, 9))
    scenes = [sample_scene(seed) for seed in range(20)]
    assert len({caption(s) + repr(s.objects[0].x0) for s in scenes}) == 20  # different seeds, different scenes
    rng = np.random.default_rng(3)
    assert sample_scene(rng) != sample_scene(rng)  # a Generator advances


def test_sample_scene_respects_num_objects_and_resolution():
    for seed in range(30):
        for n in (1, 2):
            scene = sample_scene(seed, num_objects=n, height=48, width=80)
            assert len(scene.objects) == n and (scene.height, scene.width) == (48, 80)
            for obj in scene.objects:
                assert obj.size <= obj.x0 <= 80 - obj.size and obj.size <= obj.y0 <= 48 - obj.size
    assert {len(sample_scene(seed).objects) for seed in range(30)} == {1, 2}
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(0, num_objects=3)


def test_background_never_equals_an_object_colour_and_colours_are_distinct():
    for seed in range(300):
        scene = sample_scene(seed)
        colours = [o.color for o in scene.objects]
        assert scene.background not in colours
        assert len(set(colours)) == len(colours)
    with pytest.raises(ValueError, match="background"):
        Scene("white", [ObjectSpec("circle", "white", 8, 32, 32, "left", "slow")])


def test_two_objects_start_apart():
    for seed in range(100):
        scene = sample_scene(seed, num_objects=2)
        a, b = scene.objects
        apart_x = abs(a.x0 - b.x0) >= a.size + b.size
        apart_y = abs(a.y0 - b.y0) >= a.size + b.size
        assert apart_x or apart_y


def test_bad_attributes_raise_clear_errors():
    with pytest.raises(ValueError, match="shape='star'"):
        ObjectSpec("star", "red", 8, 32, 32, "left", "slow")
    with pytest.raises(ValueError, match="direction"):
        ObjectSpec("circle", "red", 8, 32, 32, "sideways", "slow")
    with pytest.raises(ValueError, match="split"):
        sample_scene(0, split="validation")


# ------------------------------------------------------------------------------------------------ physics
def _step_simulation(scene: Scene, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: p += v each frame; if the box crosses a wall, mirror p about it and flip v."""
    positions = np.zeros((num_frames, len(scene.objects), 2))
    vels = np.zeros_like(positions)
    for k, obj in enumerate(scene.objects):
        p = np.array([obj.x0, obj.y0], dtype=float)
        v = np.array(DIRECTIONS[obj.direction]) * SPEEDS[obj.speed] * scene.scale
        lo = np.array([obj.size, obj.size])
        hi = np.array([scene.width - obj.size, scene.height - obj.size])
        for t in range(num_frames):
            positions[t, k], vels[t, k] = p, v
            p = p + v
            for axis in range(2):
                while p[axis] < lo[axis] or p[axis] > hi[axis]:  # (several reflections only if speed > range)
                    if p[axis] < lo[axis]:
                        p[axis] = 2 * lo[axis] - p[axis]
                    else:
                        p[axis] = 2 * hi[axis] - p[axis]
                    v[axis] = -v[axis]
    return positions, vels


@pytest.mark.parametrize("size", [(64, 64), (48, 96)])
def test_trajectory_matches_step_simulation_and_stays_inside(size):
    height, width = size
    bounces = 0
    for seed in range(25):
        scene = sample_scene(seed, height=height, width=width)
        positions = trajectory(scene, 200)
        ref_pos, ref_vel = _step_simulation(scene, 200)
        np.testing.assert_allclose(positions, ref_pos, atol=1e-9)
        vel = velocities(scene, 200)
        moving = ref_vel != 0
        # velocity signs agree except exactly on a wall (where the closed form reports the reflected velocity)
        on_wall = np.zeros_like(moving)
        for k, obj in enumerate(scene.objects):
            on_wall[:, k, 0] = np.isclose(positions[:, k, 0], obj.size) | np.isclose(
                positions[:, k, 0], width - obj.size
            )
            on_wall[:, k, 1] = np.isclose(positions[:, k, 1], obj.size) | np.isclose(
                positions[:, k, 1], height - obj.size
            )
        agree = np.sign(vel) == np.sign(ref_vel)
        assert agree[moving & ~on_wall].all()
        np.testing.assert_allclose(np.abs(vel), np.abs(ref_vel))
        bounces += int((np.diff(np.sign(ref_vel), axis=0) != 0).sum())
        for k, obj in enumerate(scene.objects):
            assert (positions[:, k, 0] >= obj.size - 1e-9).all() and (
                positions[:, k, 0] <= width - obj.size + 1e-9
            ).all()
            assert (positions[:, k, 1] >= obj.size - 1e-9).all() and (
                positions[:, k, 1] <= height - obj.size + 1e-9
            ).all()
    assert bounces > 200  # the comparison covers many reflections (356)


def test_motion_is_straight_at_constant_speed_between_bounces():
    scene = Scene("black", [ObjectSpec("square", "red", 8.0, 20.0, 30.0, "right", "fast")])
    positions = trajectory(scene, 30)[:, 0]
    steps = np.diff(positions, axis=0)
    # right wall at x = 56: 20 -> 55 in 14 steps of 2.5, then the 15th step reflects (55 + 2.5 -> 57.5 -> 54.5)
    np.testing.assert_allclose(steps[:14], [[2.5, 0.0]] * 14)
    np.testing.assert_allclose(positions[15], [54.5, 30.0])
    np.testing.assert_allclose(steps[15:], [[-2.5, 0.0]] * 14)


# ------------------------------------------------------------------------------------------------ rendering
def test_coverage_area_and_centroid_match_the_analytic_shapes():
    """Anti-aliased coverage integrates to the shape's area and its centroid is the shape's centroid."""
    rng = np.random.default_rng(0)
    area_factor = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
    centroid_dy = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}  # triangle centroid sits h/3 below centre
    for shape in SHAPES:
        for _ in range(10):
            h = rng.uniform(5, 12)
            x, y = rng.uniform(h, 64 - h), rng.uniform(h, 64 - h)
            cov = shape_coverage(shape, x, y, h, 64, 64).astype(np.float64)
            assert cov.min() >= 0 and cov.max() <= 1
            area = cov.sum()
            # an edge is located to 1/8 px by the sub-pixel samples: area within (perimeter <= 8h) x 1/16 px
            assert area == pytest.approx(area_factor[shape] * h * h, abs=h / 2)
            rows, cols = np.mgrid[0:64, 0:64] + 0.5
            # 8x8 sub-pixel samples put an axis-aligned edge on a 1/8 px grid: centroid within 1/16 px (+ slack)
            assert (cov * cols).sum() / area == pytest.approx(x, abs=0.07)
            assert (cov * rows).sum() / area == pytest.approx(y + centroid_dy[shape] * h, abs=0.07)
            # nothing outside the bounding box
            outside = (cols < x - h - 1) | (cols > x + h + 1) | (rows < y - h - 1) | (rows > y + h + 1)
            assert cov[outside].sum() == 0


def test_render_frame_colours_and_layering():
    scene = Scene(
        "navy",
        [
            ObjectSpec("square", "red", 10, 30, 30, "left", "slow"),
            ObjectSpec("circle", "green", 6, 30, 30, "up", "fast"),  # drawn over the square
        ],
    )
    frame = render_frame(scene, [[30, 30], [30, 30]])
    assert frame.dtype == np.uint8 and frame.shape == (64, 64, 3)
    assert tuple(frame[0, 0]) == BACKGROUNDS["navy"]
    assert tuple(frame[30, 30]) == COLORS["green"]  # centre: the circle is on top
    assert tuple(frame[21, 21]) == COLORS["red"]  # square corner, outside the circle
    video = render_video(scene, 7)
    assert video.shape == (7, 64, 64, 3) and video.dtype == np.uint8


# ------------------------------------------------------------------------------------------------ captions
def test_caption_examples():
    one = Scene("black", [ObjectSpec("circle", "red", 8, 32, 32, "left", "fast")])
    assert caption(one) == "a red circle moving quickly left on a black background"
    two = Scene(
        "white",
        [
            ObjectSpec("circle", "red", 8, 16, 16, "left", "slow"),
            ObjectSpec("square", "orange", 8, 48, 48, "up", "fast"),
        ],
    )
    assert (
        caption(two) == "a red circle moving slowly left and an orange square moving quickly up on a white background"
    )


def test_caption_parse_round_trip_over_all_single_object_combinations():
    count = 0
    for background, shape, color, direction, speed in itertools.product(
        BACKGROUNDS, SHAPES, COLORS, DIRECTIONS, SPEEDS
    ):
        if color == background:
            continue
        scene = Scene(background, [ObjectSpec(shape, color, 8, 32, 32, direction, speed)])
        parsed = parse_caption(caption(scene))
        assert parsed == {
            "background": background,
            "objects": [{"shape": shape, "color": color, "direction": direction, "speed": speed}],
        }
        count += 1
    assert count == len(all_captions(1)) == 4 * 3 * 8 * 4 * 2 - 3 * 4 * 2  # no white object on white


def test_caption_parse_round_trip_over_all_two_object_combinations_on_one_background():
    captions = all_captions(2, background="gray")
    clauses = 3 * 8 * 4 * 2
    assert len(captions) == clauses * (clauses - 3 * 4 * 2)  # ordered pairs of clauses with different colours
    for text in captions:
        parsed = parse_caption(text)
        objs = [ObjectSpec(size=8, x0=32, y0=32, **o) for o in parsed["objects"]]
        assert caption(Scene(parsed["background"], objs)) == text


def test_parse_caption_tolerates_case_and_period_and_rejects_other_text():
    assert parse_caption("  A Red Circle moving quickly LEFT on a black background. ")["objects"][0]["color"] == "red"
    for bad in [
        "a cat playing piano",
        "",
        "a red circle moving left on a black background",  # no speed
        "a pink circle moving slowly left on a black background",  # unknown colour
        "a red circle moving slowly left",  # no background
        "a red circle moving slowly left on a black background and more",
    ]:
        with pytest.raises(ValueError, match="not a ShapesWorld caption"):
            parse_caption(bad)
    with pytest.raises(TypeError):
        parse_caption(None)


def test_vocabulary_covers_every_caption_word():
    words = set(vocabulary())
    for text in all_captions(1) + all_captions(2, background="black")[:2000]:
        assert set(text.split()) <= words


def test_edit_scene_changes_exactly_the_named_attribute():
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    changed_objects = {a: set() for a in EDITABLE_ATTRIBUTES}
    for seed in range(200):
        scene = sample_scene(seed)
        before = parse_caption(caption(scene))
        for attribute in EDITABLE_ATTRIBUTES:
            edited = edit_scene(scene, attribute, seed)
            assert caption(edit_scene(scene, attribute, seed)) == caption(edited)  # deterministic per seed
            after = parse_caption(caption(edited))
            # geometry is kept, and the original scene is not modified
            assert [(o.x0, o.y0, o.size) for o in edited.objects] == [(o.x0, o.y0, o.size) for o in scene.objects]
            assert parse_caption(caption(scene)) == before
            if attribute == "background":
                assert after["objects"] == before["objects"] and after["background"] != before["background"]
                assert after["background"] not in {o["color"] for o in after["objects"]}
                continue
            assert after["background"] == before["background"]
            diffs = [(k, a, b) for k, (a, b) in enumerate(zip(before["objects"], after["objects"])) if a != b]
            assert len(diffs) == 1
            k, old, new = diffs[0]
            assert {key for key in old if old[key] != new[key]} == {attribute}
            changed_objects[attribute].add(k)
            if attribute == "direction":
                assert new["direction"] == opposite[old["direction"]]
            if attribute == "speed":
                assert {old["speed"], new["speed"]} == {"slow", "fast"}
            if attribute == "color":  # still a valid scene: distinct colours, none equal to the background
                colors = [o["color"] for o in after["objects"]]
                assert len(set(colors)) == len(colors) and after["background"] not in colors
    assert all(changed_objects[a] == {0, 1} for a in ("color", "shape", "direction", "speed"))  # both objects drawn
    with pytest.raises(ValueError, match="attribute"):
        edit_scene(sample_scene(0), "size")


# ------------------------------------------------------------------------------------------------ split
def test_held_out_combinations():
    combos = list(itertools.product(SHAPES, COLORS, DIRECTIONS))
    assert len(HELD_OUT_COMBOS) == round(0.15 * len(combos))
    train = [c for c in combos if combo_split(*c) == "train"]
    # compositional: every pair of attribute values is still seen in training
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert {(c[i], c[j]) for c in combos} == {(c[i], c[j]) for c in train}


def test_split_sampling_is_disjoint():
    train = [sample_scene(seed, split="train") for seed in range(200)]
    test = [sample_scene(seed, split="test") for seed in range(200)]
    assert not any(is_held_out(s) for s in train)
    assert all(is_held_out(s) for s in test)
    train_combos = {o.combo for s in train for o in s.objects}
    assert not train_combos & HELD_OUT_COMBOS
    assert not {caption(s) for s in train} & {caption(s) for s in test}


# ------------------------------------------------------------------------------------------------ dataset
def test_build_dataset_columns_and_reproducibility():
    ds = build_dataset(12, split="train", seed=5)
    assert set(ds.column_names) == {
        "prompt", "seed", "split", "background", "num_objects", "shapes", "colors", "directions", "speeds",
        "sizes", "x0", "y0", "height", "width",
    }  # fmt: skip
    assert len(ds) == 12 and "video" not in ds.column_names
    assert build_dataset(12, split="train", seed=5)["prompt"] == ds["prompt"]
    assert build_dataset(12, split="train", seed=6)["prompt"] != ds["prompt"]
    for row in ds:
        scene = scene_from_attributes(row)
        assert caption(scene) == row["prompt"]
        assert scene == sample_scene(row["seed"], split="train")
        assert not is_held_out(scene)
        assert parse_caption(row["prompt"])["background"] == row["background"]
    test = build_dataset(12, split="test", seed=5)
    assert all(is_held_out(scene_from_attributes(row)) for row in test)
    assert not set(ds["prompt"]) & set(test["prompt"])


def test_build_dataset_with_videos():
    ds = build_dataset(3, split="train", seed=1, num_frames=5, height=32, width=48, with_videos=True)
    assert "video" in ds.column_names
    for row in ds:
        video = np.asarray(row["video"], dtype=np.uint8)
        assert video.shape == (5, 32, 48, 3)
        assert np.array_equal(video, render_video(scene_from_attributes(row), 5))
