"""ShapesWorld evaluator and rewards: ground truth scores perfectly, graded corruptions lower the metric they corrupt
(monotonically), motion is checked against the world's own velocities, per-chunk drift, reward signatures."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffusers_raven.rewards import fidelity_reward, make_shapes_reward, motion_reward, semantic_reward, shapes_reward
from diffusers_raven.shapes import (
    COLORS,
    METRIC_DESCRIPTIONS,
    ObjectSpec,
    Scene,
    caption,
    detect_frame,
    evaluate_batch,
    evaluate_video,
    evaluator,
    label_components,
    motion_summary,
    parse_caption,
    render_video,
    sample_scene,
    trajectory,
    velocities,
)

FRAMES = 21


def _scenes(seeds, num_objects=None, **kwargs):
    return [sample_scene(seed, num_objects=num_objects, **kwargs) for seed in seeds]


def _mean(videos, scenes, key, **kwargs):
    return evaluate_batch(videos, [caption(s) for s in scenes], **kwargs)["mean"][key]


# ------------------------------------------------------------------------------------------------ corruptions
def _noise(video, sigma, seed):
    rng = np.random.default_rng(seed)
    return np.clip(video / 255.0 + rng.normal(0, sigma, video.shape), 0, 1).astype(np.float32)


def _blur(video, sigma):
    v = video.astype(np.float32) / 255.0
    if sigma == 0:
        return v
    radius = math.ceil(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(v, pad, mode="edge")
        v = sum(w * np.take(padded, np.arange(i, i + v.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return v.astype(np.float32)


def _hue_rotate(video, degrees):
    theta = math.radians(degrees)
    a = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    rot = math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1 - math.cos(theta)) * np.outer(a, a)
    return np.clip(video / 255.0 @ rot.T, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------ components
def _bfs_labels(mask):
    height, width = mask.shape
    out = -np.ones(mask.shape, dtype=np.int64)
    for i in range(height):
        for j in range(width):
            if mask[i, j] and out[i, j] < 0:
                out[i, j] = i * width + j
                stack = [(i, j)]
                while stack:
                    a, b = stack.pop()
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= c < height and 0 <= d < width and mask[c, d] and out[c, d] < 0:
                            out[c, d] = i * width + j
                            stack.append((c, d))
    return out


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.55, 0.8):
        masks = rng.random((3, 23, 31)) < density
        labels = label_components(masks)
        for f in range(3):
            expected = _bfs_labels(masks[f])
            got = np.where(labels[f] >= 0, labels[f] - f * 23 * 31, -1)
            assert np.array_equal(got, expected)
    classes = np.array([[0, 0, 1, 1], [2, 0, 1, -1]])  # equal classes join, different ones do not
    assert label_components(classes).tolist() == [[0, 0, 2, 2], [4, 0, 2, -1]]


# ------------------------------------------------------------------------------------------------ detection
def test_detect_frame_recovers_the_scene():
    for seed in range(12):
        scene = sample_scene(seed, num_objects=1, height=48, width=80)
        obj = scene.objects[0]
        positions = trajectory(scene, 1)[0]
        detection = detect_frame(render_video(scene, 1)[0])
        assert detection.background == scene.background
        [found] = detection.objects
        assert (found.color, found.shape) == (obj.color, obj.shape)
        assert found.x == pytest.approx(positions[0, 0], abs=0.1)
        assert found.y == pytest.approx(positions[0, 1], abs=0.1)
        assert found.size == pytest.approx(obj.size, abs=0.1)


def test_bad_video_input():
    with pytest.raises(ValueError, match="channels last"):
        evaluate_video(np.zeros((4, 3, 16, 16), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        evaluate_video(np.zeros((2, 16, 16, 3), dtype=np.int32))
    for bad in (0, [], [4, 0], 2.5):
        with pytest.raises(ValueError, match="chunk_frames"):
            evaluate_video(np.zeros((2, 16, 16, 3), dtype=np.uint8), chunk_frames=bad)
    with pytest.raises(ValueError, match="not a ShapesWorld caption"):
        evaluate_video(np.zeros((2, 16, 16, 3), dtype=np.uint8), "a cat")


# ------------------------------------------------------------------------------------------------ ground truth
@pytest.mark.parametrize("num_objects", [1, 2])
def test_ground_truth_scores_perfectly(num_objects):
    scenes = _scenes(range(24), num_objects)
    results = [evaluate_video(render_video(s, FRAMES), caption(s)) for s in scenes]
    semantic = [r["semantic_accuracy"] for r in results]
    if num_objects == 1:
        assert min(semantic) == 1.0
        assert min(r["physics_accuracy"] for r in results) == 1.0
        assert min(r["psnr"] for r in results) > 45
    assert np.mean(semantic) >= 0.99
    assert np.mean([r["speed_error"] for r in results]) < 0.05
    assert np.mean([r["physics_accuracy"] for r in results]) > 0.97
    assert np.mean([r["consistency"] for r in results]) > 0.97


@pytest.mark.parametrize(
    ("height", "width", "num_frames", "num_objects"),
    [(96, 96, 9, None), (48, 80, 41, None), (32, 32, 13, 1)],  # two objects crowd a 32x32 frame (overlaps)
)
def test_ground_truth_other_sizes_and_lengths(height, width, num_frames, num_objects):
    scenes = _scenes(range(6), num_objects, height=height, width=width)
    result = evaluate_batch([render_video(s, num_frames) for s in scenes], scenes)  # Scene objects as captions
    assert result["mean"]["semantic_accuracy"] >= 0.99
    assert result["mean"]["psnr"] > 40


def test_ground_truth_accepts_float_and_torch_input():
    scene = sample_scene(4)
    video = render_video(scene, 9)
    a = evaluate_video(video, caption(scene))
    b = evaluate_video(torch.from_numpy(video.astype(np.float32) / 255), caption(scene))
    assert a["semantic_accuracy"] == b["semantic_accuracy"] == 1.0
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-6)


def test_motion_measured_against_world_velocities():
    """Detected speed and unfolded velocity equal the world's (independent closed-form) initial velocity."""
    for scene in _scenes(range(12), num_objects=1):
        result = evaluate_video(render_video(scene, FRAMES), caption(scene))
        [obj] = result["objects"]
        expected = velocities(scene, 1)[0, 0]
        np.testing.assert_allclose(obj["detected"]["velocity"], expected, atol=0.05)
        assert obj["detected"]["speed"] == pytest.approx(np.linalg.norm(expected), abs=0.05)


# ------------------------------------------------------------------------------------------------ corruptions
SHORT = 9  # frames: enough for colour and fidelity


@pytest.fixture(scope="module")
def short_clips():
    scenes = _scenes(range(12))
    return scenes, [render_video(s, SHORT) for s in scenes]


def test_noise_lowers_fidelity_monotonically(short_clips):
    scenes, videos = short_clips
    psnr = [_mean([_noise(v, s, i) for i, v in enumerate(videos)], scenes, "psnr") for s in (0, 0.02, 0.05, 0.1, 0.2)]
    assert all(b < a for a, b in zip(psnr, psnr[1:])), psnr


def test_blur_lowers_fidelity_monotonically(short_clips):
    scenes, videos = short_clips
    psnr = [_mean([_blur(v, s) for v in videos], scenes, "psnr") for s in (0, 0.5, 1.0, 1.5, 2.0)]
    assert all(b < a for a, b in zip(psnr, psnr[1:])), psnr


def test_colour_shift_lowers_colour_accuracy(short_clips):
    scenes, videos = short_clips
    colour, semantic = [], []
    for degrees in (0, 10, 20, 30, 45, 60):
        result = evaluate_batch([_hue_rotate(v, degrees) for v in videos], [caption(s) for s in scenes])["mean"]
        colour.append(result["color_accuracy"])
        semantic.append(result["semantic_accuracy"])
    assert colour[0] == 1.0 and semantic[0] == 1.0
    assert all(b <= a for a, b in zip(colour, colour[1:])), colour
    assert all(b <= a for a, b in zip(semantic, semantic[1:])), semantic
    assert colour[-1] < colour[0] and semantic[-1] < semantic[0]


@pytest.fixture(scope="module")
def clips():
    scenes = _scenes(range(12))
    return scenes, [render_video(s, FRAMES) for s in scenes]


def test_frozen_frames_raise_speed_error_monotonically(clips):
    scenes, videos = clips
    errors = []
    for k in (0, 3, 6, 9):
        frozen = [
            np.concatenate([v[: FRAMES - k], np.repeat(v[FRAMES - k - 1 : FRAMES - k], k, axis=0)]) for v in videos
        ]
        errors.append(_mean(frozen, scenes, "speed_error"))
    assert all(b > a for a, b in zip(errors, errors[1:])), errors


def test_mirrored_video_has_the_wrong_direction():
    scenes = [s for s in _scenes(range(60), num_objects=1) if s.objects[0].direction in ("left", "right")][:8]
    videos = [render_video(s, FRAMES) for s in scenes]
    assert _mean(videos, scenes, "direction_accuracy") == 1.0
    mirrored = [v[:, :, ::-1] for v in videos]
    assert _mean(mirrored, scenes, "direction_accuracy") == 0.0
    assert _mean(mirrored, scenes, "direction_error") == pytest.approx(180.0, abs=1.0)


def test_time_reversed_video_direction_follows_the_bounce_count():
    """Reversed, an object starts with minus its final velocity: that matches the caption iff it bounced an odd
    number of times (read from the world's closed-form velocities, not from the evaluator)."""
    scenes = _scenes(range(16), num_objects=1)
    accuracies = []
    for scene in scenes:
        v = velocities(scene, FRAMES)[:, 0]
        expected = float(np.sign(-v[-1]) @ np.sign(v[0]) > 0)
        result = evaluate_video(render_video(scene, FRAMES)[::-1], caption(scene))
        assert result["direction_accuracy"] == expected
        accuracies.append(result["direction_accuracy"])
    assert np.mean(accuracies) < 1.0


def test_motion_summary_against_the_world_and_corruptions():
    """Ground truth: nothing static, class medians at the world's speeds, velocities along the caption (cosine 1).
    Frozen videos are all static; mirrored ones reverse the horizontal movers only (cosine from the captions)."""
    scenes = _scenes(range(24))
    captions = [caption(s) for s in scenes]
    videos = [render_video(s, FRAMES) for s in scenes]
    truth = motion_summary(evaluate_batch(videos, captions, return_per_video=True)["per_video"], 64, 64)
    num_objects = sum(len(s.objects) for s in scenes)
    assert truth["num_objects"] == num_objects
    assert truth["static_fraction"] == 0.0
    assert truth["direction_cosine"] == pytest.approx(1.0, abs=1e-3)
    for name, speed in truth["class_speeds"].items():  # world speeds, read from the initial velocities
        expected = [float(np.linalg.norm(velocities(s, 1)[0, k])) for s in scenes for k, o in enumerate(s.objects)
                    if o.speed == name]
        assert truth["speed_median"][name] == pytest.approx(float(np.median(expected)), abs=0.05)
        assert truth["speed_median"][name] == pytest.approx(speed, abs=0.05)

    frozen = [np.repeat(v[:1], FRAMES, axis=0) for v in videos]
    still = motion_summary(evaluate_batch(frozen, captions, return_per_video=True)["per_video"], 64, 64)
    assert still["static_fraction"] == 1.0 and still["direction_cosine"] is None

    one = _scenes(range(16), num_objects=1)
    mirrored = [render_video(s, FRAMES)[:, :, ::-1] for s in one]
    summary = motion_summary(evaluate_batch(mirrored, [caption(s) for s in one], return_per_video=True)["per_video"],
                             64, 64)
    horizontal = sum(s.objects[0].direction in ("left", "right") for s in one)
    assert 0 < horizontal < len(one)
    assert summary["direction_cosine"] == pytest.approx((len(one) - 2 * horizontal) / len(one), abs=0.02)


def test_bounces_unfold_with_misjudged_walls():
    """A blurred or distorted object's size, hence its wall, is misjudged by a pixel or two: the unfolded velocity
    of a bouncing path (closed-form triangle wave, not the world module) stays the true one within the tolerance,
    and without the tolerance the same path is unfolded wrongly (the check can fail)."""
    lo, hi, frames = 9.0, 55.0, 21
    for p0, v in ((50.0, 1.0), (51.0, 2.5), (12.0, -2.5), (30.0, 2.5)):  # first step no bounce (no continuity)
        m = (p0 - lo + v * np.arange(frames)) % (2 * (hi - lo))  # reflected into [lo, hi]: a triangle wave
        pos = lo + np.where(m <= hi - lo, m, 2 * (hi - lo) - m)
        gaps = np.ones(frames - 1)
        for shift in (-2.0, -1.0, 1.0, 2.0):  # walls estimated from a size misjudged by `shift` px
            unfolded = evaluator._unfold_axis(pos, gaps, lo + shift, hi - shift, abs(v), evaluator.WALL_TOLERANCE,
                                              evaluator.BOUNCE_MARGIN)
            np.testing.assert_allclose(unfolded, v, atol=1e-6, err_msg=f"p0={p0} v={v} shift={shift}")
    wrong = evaluator._unfold_axis(pos, gaps, lo - 2.0, hi + 2.0, 2.5, 0.0)
    assert np.abs(wrong - 2.5).max() > 1.0


def test_blur_keeps_direction_and_speed():
    """Blur corrupts fidelity (and, strongly blurred, shape) but not motion: bounces off walls that a blurred
    object's size puts a pixel or two off are still unfolded."""
    scenes = _scenes(range(10**9, 10**9 + 24), split="test")
    videos = [render_video(s, FRAMES) for s in scenes]
    for sigma in (1.0, 1.5, 2.0):
        result = evaluate_batch([_blur(v, sigma) for v in videos], [caption(s) for s in scenes])["mean"]
        assert result["direction_accuracy"] == 1.0, (sigma, result)
        assert result["speed_accuracy"] == 1.0, (sigma, result)


def test_only_the_most_persistent_objects_are_matched():
    """The caption's objects are matched among as many objects as it names, the most persistent first: a red circle
    present in 11 of 21 frames next to a blue square present in all of them does not satisfy 'a red circle'."""
    square = ObjectSpec(shape="square", color="blue", size=8.0, x0=16.0, y0=16.0, direction="right", speed="slow")
    circle = ObjectSpec(shape="circle", color="red", size=8.0, x0=44.0, y0=44.0, direction="left", speed="slow")
    both = render_video(Scene(background="black", objects=[square, circle]), FRAMES)
    alone = render_video(Scene(background="black", objects=[square]), FRAMES)
    video = np.concatenate([both[:11], alone[11:]])
    wanted = caption(Scene(background="black", objects=[circle]))
    result = evaluate_video(video, wanted)
    assert result["num_objects"] == 2
    [match] = result["objects"]
    assert match["detected"]["color"] == "blue" and result["color_accuracy"] == 0.0
    # with the circle present throughout it is found, since it is larger than the square
    full = evaluate_video(render_video(Scene(background="black", objects=[square, replace(circle, size=9.0)]), FRAMES),
                          wanted)
    assert full["color_accuracy"] == 1.0 and full["shape_accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------ drift
def test_per_chunk_metrics_cover_the_video():
    scene = sample_scene(7, num_objects=2)
    video = render_video(scene, 50)
    result = evaluate_video(video, caption(scene), chunk_frames=21)
    chunks = result["per_chunk"]
    assert [(c["chunk"], c["start"], c["end"]) for c in chunks] == [(0, 0, 21), (1, 21, 42), (2, 42, 50)]
    for chunk in chunks:
        assert chunk["semantic_accuracy"] == 1.0
        assert set(METRIC_DESCRIPTIONS) <= set(chunk)
    assert evaluate_video(video, caption(scene))["per_chunk"] == []
    pipeline_chunks = evaluate_video(video, caption(scene), chunk_frames=[9, 12])["per_chunk"]  # 9, 12, 12, ...
    assert [(c["start"], c["end"]) for c in pipeline_chunks] == [(0, 9), (9, 21), (21, 33), (33, 45), (45, 50)]
    json.dumps(result, allow_nan=False)


def test_drift_shows_in_later_chunks():
    """Noise that grows chunk by chunk lowers the per-chunk PSNR chunk by chunk; the clean video stays flat."""
    scenes = _scenes(range(4))
    clean = [render_video(s, 63) for s in scenes]
    drifting = []
    for i, v in enumerate(clean):
        noisy = v.astype(np.float32) / 255
        for k, sigma in enumerate((0.0, 0.04, 0.08)):
            noisy[21 * k : 21 * (k + 1)] = _noise(v[21 * k : 21 * (k + 1)], sigma, seed=10 * i + k)
        drifting.append(noisy)
    captions = [caption(s) for s in scenes]
    gt = evaluate_batch(clean, captions, chunk_frames=21)
    drift = evaluate_batch(drifting, captions, chunk_frames=21, return_per_video=True)
    assert [c["semantic_accuracy"] for c in gt["per_chunk"]] == [1.0, 1.0, 1.0]
    psnr = [c["psnr"] for c in drift["per_chunk"]]
    assert psnr[0] > psnr[1] > psnr[2]
    assert len(drift["per_video"]) == 4 and drift["per_chunk"][2]["num_videos"] == 4
    json.dumps(drift, allow_nan=False)


def test_evaluate_without_caption():
    scene = sample_scene(2, num_objects=1)
    result = evaluate_video(render_video(scene, 9))
    assert "semantic_accuracy" not in result and result["num_objects"] == 1 and result["psnr"] > 45
    assert result["speed"] == pytest.approx(np.linalg.norm(velocities(scene, 1)[0, 0]), abs=0.05)


# ------------------------------------------------------------------------------------------------ rewards
def _wrong_caption(prompt):
    parsed = parse_caption(prompt)
    used = {parsed["background"], *(o["color"] for o in parsed["objects"])}
    spare = [c for c in COLORS if c not in used]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    objects = [
        ObjectSpec(o["shape"], spare[i], 8, 32, 32, opposite[o["direction"]], o["speed"])
        for i, o in enumerate(parsed["objects"])
    ]
    return caption(Scene(parsed["background"], objects))


def _as_batch(videos):
    return torch.stack([torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255 for v in videos])


@pytest.fixture(scope="module")
def reward_batch():
    scenes = _scenes(range(4))
    return [caption(s) for s in scenes], _as_batch([render_video(s, 13) for s in scenes])


def test_reward_signature_range_and_names(reward_batch):
    prompts, videos = reward_batch
    prompts = [*prompts[:3], "a cat playing the piano"]
    for fn in (semantic_reward, motion_reward, fidelity_reward, shapes_reward):
        values = fn(prompts, videos, seed=[0, 1, 2, 3], attributes=None)  # extra dataset columns are ignored
        assert len(values) == 4 and values[3] is None
        assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in values[:3])
        assert min(values[:3]) > 0.95  # ground truth
    names = [fn.__name__ for fn in (semantic_reward, motion_reward, fidelity_reward, shapes_reward)]
    assert names == ["semantic_reward", "motion_reward", "fidelity_reward", "shapes_reward"]


def test_rewards_drop_for_bad_videos(reward_batch):
    prompts, videos = reward_batch
    static = videos[:, :1].expand_as(videos).contiguous()
    assert motion_reward(prompts, static) == [0.0] * 4
    noisy = (videos + 0.1 * torch.randn_like(videos)).clamp(0, 1)
    assert max(fidelity_reward(prompts, noisy)) < 0.5
    wrong = [_wrong_caption(p) for p in prompts]  # every object with another colour and the opposite direction
    assert max(semantic_reward(wrong, videos)) <= 4 / 6
    assert all(a < b for a, b in zip(shapes_reward(wrong, videos), shapes_reward(prompts, videos)))


def test_make_shapes_reward_weights(reward_batch):
    prompts, videos = reward_batch
    only_semantic = make_shapes_reward(semantic=1.0, motion=0.0, fidelity=0.0, name="shapes_semantic_only")
    assert only_semantic.__name__ == "shapes_semantic_only"
    assert only_semantic(prompts, videos) == pytest.approx(semantic_reward(prompts, videos))
    with pytest.raises(ValueError, match="weights"):
        make_shapes_reward(semantic=-1.0)
    with pytest.raises(ValueError, match="prompts"):
        semantic_reward(prompts[:2], videos)
