"""trainers/shapes_long_stream.py: a tiny pipeline streamed for a few latent frames; the JSON's structure, per-chunk
scores equal to the evaluator's on the pipeline's ordinary output, the ground-truth metrics on the right frames."""

import json
import math

import numpy as np
import pytest
import torch

from diffusers_raven.shapes import (
    BACKGROUNDS,
    caption,
    detect_video,
    evaluate_video,
    render_video,
)
from recipe_utils import load_recipe

LATENT_FRAMES = 15  # 5 chunks of 3 latent frames: 57 frames in chunks of 9, 12, 12, 12, 12
NUM_FRAMES = 57
STARTS = [0, 9, 21, 33, 45]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("shapes_long_stream")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from diffusers_raven.pipelines.presets import random_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_pipeline")
    random_tiny_pipeline().save_pretrained(folder)
    return str(folder)


def psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 50.0 if mse <= 1e-5 else min(50.0, -10 * math.log10(mse))


def test_stream_json_and_per_chunk_scores(recipe, tiny_folder, tmp_path):
    output, plot, strip = tmp_path / "long.json", tmp_path / "long.png", tmp_path / "frames.png"
    common = ["--latent_frames", str(LATENT_FRAMES), "--window_frames", "6", "--sink_frames", "1", "--captions", "1",
              "--frame_indices", "0", "10", "-1", "--smooth", "2", "--detect_block", "20", "--height", "32", "--width", "32",
              "--output", str(output)]
    report = recipe.main(["--pipeline", f"tiny={tiny_folder}", *common, "--plot", str(plot),
                          "--frames_plot", str(strip)])
    assert plot.stat().st_size > 0 and strip.stat().st_size > 0
    saved = json.loads(output.read_text())
    assert saved["models"].keys() == report["models"].keys() == {"tiny"}
    settings = saved["settings"]
    assert settings["num_frames"] == NUM_FRAMES and settings["chunk_pixel_frames"] == [9, 12]
    assert settings["frame_indices"] == [0, 10, NUM_FRAMES - 1] and settings["rope"] == "relative"
    names = [p["name"] for p in saved["prompts"]]
    assert names == ["example", "example_as_typed", "held_out_0"]
    assert saved["prompts"][1]["prompt"] == "a blue square moving left"
    assert saved["prompts"][0]["prompt"] == saved["prompts"][1]["caption"] == \
        "a blue square moving slowly left on a gray background"
    model = saved["models"]["tiny"]
    assert model["mean_over"] == 2 and model["num_chunks"] == 5
    assert set(model["prompts"]) == set(names) and set(model["frames"]) == {"example", "example_as_typed"}
    for entry in model["prompts"].values():
        cols = entry["chunks"]
        assert cols["start"] == STARTS and cols["end"] == STARTS[1:] + [NUM_FRAMES]
        assert all(len(cols[k]) == 5 for k in (*recipe.CHUNK_METRICS, *recipe.CHUNK_LABELS))
        assert set(entry["onsets"]) == set(recipe.ONSET_RULES)
        assert entry["whole"]["start"] == 0 and entry["whole"]["end"] == NUM_FRAMES

    # the same frames from the pipeline's ordinary output (one call, same generator and cache settings)
    from diffusers_raven import CausalVideoPipeline

    pipe = CausalVideoPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = saved["prompts"]
    frames = pipe([p["prompt"] for p in prompts], num_frames=NUM_FRAMES, height=32, width=32, window_frames=6,
                  sink_frames=1, rope="relative", generator=torch.Generator().manual_seed(settings["seed"]),
                  max_sequence_length=18, output_type="np").frames
    videos = np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)
    for prompt, video in zip(prompts, videos):
        cols = model["prompts"][prompt["name"]]["chunks"]
        scene = recipe.scene_of(prompt)
        expected = evaluate_video(video, prompt["caption"], chunk_frames=[9, 12])["per_chunk"]
        for key in recipe.EVALUATOR_METRICS:
            want = [None if c.get(key) is None else round(c[key], 4) for c in expected]
            assert cols[key] == want, key
        # ground-truth metrics recomputed independently, frame by frame
        truth = render_video(scene, NUM_FRAMES)
        bg = np.asarray(BACKGROUNDS[scene.background]) / 255.0
        dets = detect_video(video)
        for k, (start, end) in enumerate(zip(cols["start"], cols["end"])):
            offset = video[start:end].astype(np.int64) - np.asarray(BACKGROUNDS[scene.background])
            near = (offset**2).sum(-1) <= 2601  # within 0.2 * 255 of the caption's background, in integers
            assert cols["background_fraction"][k] == pytest.approx(near.mean(), abs=1e-4)
            assert cols["psnr_truth"][k] == pytest.approx(
                np.mean([psnr(video[t] / 255.0, truth[t] / 255.0) for t in range(start, end)]), abs=1e-3)
            largest = [max([o.area for o in dets[t].objects], default=0.0) for t in range(start, end)]
            assert cols["largest_area"][k] == pytest.approx(float(np.median(largest)), abs=1e-3)
            border = [np.linalg.norm(np.asarray(dets[t].background_rgb) - bg) for t in range(start, end)]
            assert cols["background_distance"][k] == pytest.approx(float(np.mean(border)), abs=1e-4)
        if prompt["name"] in model["frames"]:
            for index, text in zip(settings["frame_indices"], model["frames"][prompt["name"]]):
                np.testing.assert_array_equal(recipe.png_frame(text), video[index])

    # derived columns: the largest object's area over the scene's largest; --replot recomputes them and the onsets
    for prompt in prompts:
        cols = model["prompts"][prompt["name"]]["chunks"]
        largest = max(4 * o["size"] ** 2 if o["shape"] == "square" else math.pi * o["size"] ** 2
                      if o["shape"] == "circle" else 2 * o["size"] ** 2 for o in prompt["scene"]["objects"])
        assert cols["largest_area_ratio"] == pytest.approx([a / largest for a in cols["largest_area"]], abs=1e-3)
    stripped = json.loads(output.read_text())
    for entry in stripped["models"]["tiny"]["prompts"].values():
        del entry["chunks"]["largest_area_ratio"]
    output.write_text(json.dumps(stripped))
    replotted = recipe.main(["--replot", "--output", str(output), "--smooth", "3", "--plot", str(plot)])
    assert replotted["settings"]["smooth"] == 3
    for name, entry in replotted["models"]["tiny"]["prompts"].items():
        assert entry["chunks"]["largest_area_ratio"] == model["prompts"][name]["chunks"]["largest_area_ratio"]
        assert entry["onsets"] == recipe.onsets(entry["chunks"], 3)
    areas = replotted["models"]["tiny"]["frame_areas"]["example"]
    assert areas["color"] == "blue" and len(areas["areas"]) == 3 and areas["scene_area"] == pytest.approx(4 * 4.5**2)

    # --append adds a model and keeps the first; other settings are refused
    recipe.main(["--pipeline", f"again={tiny_folder}", *common, "--append"])
    appended = json.loads(output.read_text())
    assert list(appended["models"]) == ["tiny", "again"]
    assert appended["models"]["again"]["prompts"]["example"]["chunks"] == model["prompts"]["example"]["chunks"]
    with pytest.raises(SystemExit, match="other settings"):
        recipe.main(["--pipeline", f"other={tiny_folder}", *common, "--append", "--window_frames", "9"])


def test_scores_follow_the_frames(recipe):
    """On a rendered scene the ground-truth metrics are exact, and corrupting one chunk's frames (a green
    background, a swollen object) changes that chunk's scores only."""
    prompts = recipe.build_prompts(0, 0, 64, 64, None)
    scene = recipe.scene_of(prompts[0])
    video = render_video(scene, NUM_FRAMES)
    clean = recipe.score_video(video, scene, [9, 12], block=7)
    expected = evaluate_video(video, caption(scene), chunk_frames=[9, 12])["per_chunk"]
    for key in recipe.EVALUATOR_METRICS:
        assert [c[key] for c in clean["chunks"]] == [c.get(key) for c in expected], key
    area = 4 * 9.0**2
    for c in clean["chunks"]:
        assert c["semantic_accuracy"] == 1.0 and c["psnr_truth"] == 50.0 and c["psnr_placed"] > 40
        assert c["object_area_ratio"] == pytest.approx(1.0, abs=0.01)
        assert c["background_fraction"] == pytest.approx(1 - area / 4096, abs=0.01)
        assert c["background_distance"] < 1e-6 and c["off_background_colour"] == "blue"

    corrupted = video.copy()
    s, e = STARTS[2], STARTS[3]
    grey = (corrupted[s:e] == np.asarray(BACKGROUNDS["gray"], dtype=np.uint8)).all(-1)
    corrupted[s:e][grey] = (40, 180, 60)  # the background of chunk 2 turns green
    bad = recipe.score_video(corrupted, scene, [9, 12], block=7)
    for k, (a, b) in enumerate(zip(clean["chunks"], bad["chunks"])):
        if k == 2:
            # the evaluator names the nearest of the four backgrounds: a green one still reads as gray
            assert b["background"] == "gray" and b["background_fraction"] < 0.1
            assert b["off_background_colour"] == "green" and b["background_distance"] > 0.3
        else:
            assert a["background_fraction"] == b["background_fraction"] and b["background_accuracy"] == 1.0

    swollen = video.copy()
    s, e = STARTS[3], STARTS[4]
    for t in range(s, e):  # chunk 3: the square drawn with twice the half-extent (four times the area)
        big = recipe.Scene(background="gray", objects=[{**scene.objects[0].__dict__, "size": 18.0, "x0": 32.0,
                                                        "y0": 32.0, "speed": "slow"}])
        swollen[t] = render_video(big, 1)[0]
    ratios = [c["object_area_ratio"] for c in recipe.score_video(swollen, scene, [9, 12], block=7)["chunks"]]
    assert ratios[3] == pytest.approx(4.0, rel=0.05)
    assert all(r == pytest.approx(1.0, abs=0.01) for k, r in enumerate(ratios) if k != 3)


def test_range_table(recipe, tmp_path):
    """--table: frame-range means of a report (a chunk counted in the range of its first frame), checked by hand."""
    starts = list(range(0, 3000, 12))
    semantic = [0.5 + 0.001 * i for i in range(len(starts))]
    cols = {"chunk": list(range(len(starts))), "start": starts, "end": [s + 12 for s in starts],
            "semantic_accuracy": semantic, "largest_area_ratio": [None] * len(starts)}
    report = {"models": {"m": {"mean": cols, "mean_over": 3, "prompts": {"example": {"chunks": cols}}}}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    table = recipe.main(["--table", "--output", str(path)])["table"]
    rows = [line for line in table.splitlines() if line.startswith("| m | mean of 3 | semantic")]
    expected = [np.mean([v for s, v in zip(starts, semantic) if a <= s <= b]) for a, b in
                ((0, 20), (21, 499), (500, 999), (1000, 1999), (2000, 10**9))]
    assert rows and [float(c) for c in rows[0].split("|")[4:9]] == pytest.approx(expected, abs=5e-4)
    assert "2000–2999" in table.splitlines()[0]  # the last chunk ends (exclusive) at 3000
    assert "| m | mean of 3 | largest object / scene's largest | – | – | – | – | – |" in table  # no values: dashes
