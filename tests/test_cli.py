"""The ``diffusers-raven`` command: help texts, ``generate`` with the random tiny model, errors, video writing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusers_raven.cli import main
from diffusers_raven.pipelines import presets
from diffusers_raven.utils.video import VideoWriter, check_video_path, save_video

SMALL = ["--height", "32", "--width", "32", "--frames", "9"]
NOTE = "note: no bundled model found; using a randomly initialised tiny pipeline (the video is noise-like)"


@pytest.fixture
def no_bundled_model(tmp_path, monkeypatch):
    """Pretend the bundled model is missing (so the test keeps working once it ships)."""
    monkeypatch.setattr(presets, "BUNDLED_MODEL_DIR", tmp_path / "no-bundled-model")


def _mp4_frames(path: Path) -> np.ndarray:
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return np.stack([frame for frame in reader.iter_data()])


def _gif_frames(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.n_frames


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------- help
def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "convert" in out


def test_generate_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("PROMPT", "--prompt", "--switch-frames", "--model", "random-tiny", "--frames", "--output", "examples:"):
        assert text in out
    # today's behaviour: the bundled ShapesWorld model is the default, and the prompt can be the first argument
    assert 'diffusers-raven generate "a red circle moving right"' in out
    assert "ShapesWorld model shipped with the package" in out and "while no bundled model exists" not in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


# ---------------------------------------------------------------------- generate
def test_generate_mp4_default_model(tmp_path, capsys, no_bundled_model):
    output = tmp_path / "video.mp4"
    code, out, err = _run(
        ["generate", "--prompt", "a red circle moving right", *SMALL, "--output", str(output)], capsys
    )
    assert code == 0, err
    assert NOTE in err.splitlines()
    assert "chunk 1/1" in out and "done: 9 frames" in out and str(output) in out
    frames = _mp4_frames(output)
    assert frames.shape == (9, 128, 128, 3)  # 32 px enlarged 4x so that it is viewable


def test_generate_gif_random_tiny(tmp_path, capsys):
    output = tmp_path / "video.gif"
    code, out, err = _run(
        [
            "generate",
            "--model",
            "random-tiny",
            "--prompt",
            "a blue square",
            *SMALL,
            "--output",
            str(output),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert out == ""  # --quiet
    assert "randomly initialised tiny pipeline" in err
    assert _gif_frames(output) == 9


def test_generate_prompt_switch(tmp_path, capsys):
    output = tmp_path / "switch.mp4"
    argv = ["generate", "--model", "random-tiny", "--prompt", "a red circle", "--prompt", "a blue square"]
    argv += ["--switch-frames", "9", "--frames", "21", "--height", "32", "--width", "32", "--output", str(output)]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    chunk_lines = [line for line in out.splitlines() if line.startswith("chunk ")]
    assert len(chunk_lines) == 2
    assert chunk_lines[0].endswith("prompt 1") and chunk_lines[1].endswith("prompt 2")
    assert len(_mp4_frames(output)) == 21


def test_generate_positional_prompt(tmp_path, capsys):
    """``generate "PROMPT"`` is ``generate --prompt PROMPT``; several positional prompts make a schedule."""
    base = ["generate", "--model", "random-tiny", *SMALL, "--quiet"]
    for name, prompt in (("positional.gif", ["a red circle moving right"]),
                         ("option.gif", ["--prompt", "a red circle moving right"])):
        code, _, err = _run([*base, *prompt, "--output", str(tmp_path / name)], capsys)
        assert code == 0, err
    from PIL import Image, ImageSequence

    def frames(name):
        with Image.open(tmp_path / name) as image:
            return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]

    assert len(frames("positional.gif")) == 9
    assert all(np.array_equal(a, b) for a, b in zip(frames("positional.gif"), frames("option.gif"), strict=True))
    argv = ["generate", "--model", "random-tiny", "a red circle", "a blue square", "--switch-frames", "9",
            "--frames", "21", "--height", "32", "--width", "32", "--output", str(tmp_path / "switch.gif")]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    chunk_lines = [line for line in out.splitlines() if line.startswith("chunk ")]
    assert chunk_lines[0].endswith("prompt 1") and chunk_lines[1].endswith("prompt 2")


def test_generate_positional_prompt_with_the_bundled_model(tmp_path, capsys):
    """``diffusers-raven generate "a red circle moving right"`` with nothing else: the bundled model (one chunk here
    to keep the test short)."""
    if not presets.bundled_model_available():
        pytest.skip("no bundled model in this installation")
    output = tmp_path / "raven.gif"
    code, out, err = _run(["generate", "a red circle moving right", "--frames", "9", "--output", str(output)], capsys)
    assert code == 0, err
    assert "model: bundled ShapesWorld model" in out and "note:" not in err
    assert _gif_frames(output) == 9


# ---------------------------------------------------------------------- --continue
def _clip(path: Path, frames: int = 11) -> Path:
    """A smooth moving-gradient clip of ``frames`` frames at 32×32 (written enlarged to 128×128)."""
    y, x = np.mgrid[0:32, 0:32] / 31.0
    video = np.stack([np.stack([x, y, (x + y + 0.1 * f) % 1.0], axis=-1) for f in range(frames)])
    return save_video(video.astype(np.float32), path)


def test_generate_continue_clip_equals_the_pipeline(tmp_path, capsys):
    """``--continue`` writes what the pipeline makes of the clip read from the file (``video=``, same seed): the clip's
    chunk (the last 9 of its 11 frames, resized from 128×128 with a note) then two generated chunks."""
    import torch

    from diffusers_raven.utils.video import read_video

    clip, output = _clip(tmp_path / "clip.mp4"), tmp_path / "continued.gif"
    argv = ["generate", "--model", "random-tiny", "--prompt", "a red circle", "--height", "32", "--width", "32",
            "--seed", "4", "--continue", str(clip), "--output", str(output)]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "continuing" in out and "11 frames of 128x128, 9 used (3 latent frames)" in out
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert any("128×128" in n and "resized to 32×32" in n for n in notes), err
    assert any("11 frames" in n and "last 9" in n for n in notes), err
    chunk_lines = [line for line in out.splitlines() if line.startswith("chunk ")]
    assert len(chunk_lines) == 3 and chunk_lines[0].endswith("(the clip, encoded and decoded)")
    assert "done: 33 frames" in out

    pipe, _ = presets.load_pipeline("random-tiny")
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red circle", num_frames=33, height=32, width=32, video=read_video(clip),
                  generator=torch.Generator().manual_seed(4)).frames[0]
    reference = save_video(frames, tmp_path / "reference.gif")
    assert np.array_equal(read_video(output), read_video(reference))

    output = tmp_path / "new_only.gif"
    code, out, err = _run([*argv[:-1], str(output), "--without-clip", "--frames", "45"], capsys)
    assert code == 0, err
    assert _gif_frames(output) == 36 and "done: 36 frames" in out  # 3 generated chunks after the 9-frame clip


def test_generate_continue_an_image(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "start.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    output = tmp_path / "from_image.gif"
    argv = ["generate", "--model", "random-tiny", "--prompt", "a red circle", "--height", "32", "--width", "32",
            "--continue", str(image), "--output", str(output)]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "1 used (1 latent frames)" in out and _gif_frames(output) == 1 + 24


@pytest.mark.skipif(not presets.bundled_model_available(), reason="the bundled model is not installed")
def test_generate_continue_with_the_bundled_model(tmp_path, capsys):
    """End to end with the bundled model: the output starts with the clip (VAE round trip and H.264: mean difference
    below 0.02) and goes on without a jump at the seam (the change from the clip's last frame to the first new one is
    no larger than the video's largest change between consecutive frames)."""
    from diffusers_raven.utils.video import read_video

    prompt = ["--prompt", "a red circle moving right on a black background"]
    clip, output = tmp_path / "clip.mp4", tmp_path / "continued.mp4"
    assert _run(["generate", *prompt, "--frames", "21", "--output", str(clip)], capsys)[0] == 0
    code, out, err = _run(["generate", *prompt, "--continue", str(clip), "--output", str(output)], capsys)
    assert code == 0, err
    given, video = read_video(clip) / 255.0, read_video(output) / 255.0
    assert video.shape == (45, 128, 128, 3)
    assert np.abs(video[:21] - given).mean() < 0.02
    steps = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))
    assert steps[20] <= steps.max() and steps[20] < 0.02, steps


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "a circle", "--frames", "10"], "num_frames"),
        (["--prompt", "a circle", "--frames", "0"], "--frames"),
        (["--prompt", "a circle", "--model", "./does-not-exist"], "not found"),
        (["--prompt", "a circle", "--output", "x.avi"], ".mp4 or .gif"),
        (["--prompt", "a circle", "--height", "40"], "multiples of 16"),
        (["--prompt", "a", "--prompt", "b"], "--switch-frames"),
        (["--prompt", "a", "--prompt", "b", "--switch-frames", "9", "13"], "--switch-frames"),
        (["--prompt", "a", "--steps", "0"], "--steps"),
        (["--prompt", "a", "--sink-frames", "3"], "window_frames"),
        (["--prompt", "a", "--device", "nonsense"], "--device"),
        (["--prompt", "a", "--continue", "no-such-clip.mp4"], "--continue no-such-clip.mp4: no such file"),
        (["--prompt", "a", "--continue", "{bad}"], "cannot read video"),
        (["--prompt", "a", "--continue", "{clip}", "--frames", "21"], "--frames counts the whole video"),
        (["--prompt", "a", "--without-clip"], "--without-clip needs --continue"),
        ([], "give a prompt"),
        (["a circle", "--prompt", "a square"], "not both"),
        ([""], "the prompt is empty"),
        (["a", "b"], "--switch-frames"),
    ],
)
def test_generate_errors_are_one_line(tmp_path, capsys, extra, expected):
    output = tmp_path / "out.mp4"
    (tmp_path / "bad.mp4").write_text("not a video")
    extra = [e.format(bad=tmp_path / "bad.mp4", clip=_clip(tmp_path / "clip.mp4", frames=21)) for e in extra]
    argv = ["generate", "--model", "random-tiny", "--height", "32", "--width", "32", "--output", str(output)]
    code, _, err = _run([*argv, *extra], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("diffusers-raven generate: error:")
    assert expected in errors[0]
    assert not output.exists()


def test_missing_model_folder_message(capsys):
    code, _, err = _run(["generate", "--prompt", "a circle", "--model", "./does-not-exist"], capsys)
    assert code == 2
    assert "'./does-not-exist' not found" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------- the installed command
def _command() -> list[str]:
    script = Path(sys.executable).parent / "diffusers-raven"
    if script.exists():
        return [str(script)]
    found = shutil.which("diffusers-raven")
    return [found] if found else [sys.executable, "-m", "diffusers_raven.cli"]


def test_console_script_help():
    result = subprocess.run([*_command(), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "convert" in result.stdout


def test_console_script_error_is_one_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*_command(), "generate", "--prompt", ""], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "diffusers-raven generate: error: --prompt is empty: give the text the video should show."
    ]


# ---------------------------------------------------------------------- presets
def test_resolve_model(tmp_path, no_bundled_model):
    assert presets.DEFAULT_MODEL == "bundled"
    fallback = presets.resolve_model(None)
    assert fallback.is_random and fallback.fallback
    assert presets.resolve_model("bundled") == fallback
    explicit = presets.resolve_model("random-tiny")
    assert explicit.is_random and not explicit.fallback
    assert presets.resolve_model("owner/name").kind == "hub"
    for missing in ("./nope", "../nope", "/definitely/not/here", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="not found"):
            presets.resolve_model(missing)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        presets.resolve_model(str(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        presets.resolve_model(str(tmp_path / "file.txt"))


def test_load_pipeline_random_and_folder(tmp_path, no_bundled_model):
    pipe, description = presets.load_pipeline()
    assert "randomly initialised tiny pipeline" in description and "no bundled model" in description
    assert pipe.default_height == 128
    again, _ = presets.load_pipeline("random-tiny")
    assert all(
        (a == b).all() for a, b in zip(pipe.transformer.state_dict().values(), again.transformer.state_dict().values())
    )
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    loaded, description = presets.load_pipeline(str(folder))
    assert description == f"local folder {folder}"
    assert type(loaded.transformer).__name__ == "CausalWanTransformer3DModel"


def test_load_pipeline_dtype(tmp_path, no_bundled_model):
    """``dtype`` (diffusers' current name) loads without a deprecation warning; ``torch_dtype`` still works, warns."""
    import warnings

    import torch

    folder = tmp_path / "pipe"
    presets.random_tiny_pipeline().save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe, _ = presets.load_pipeline(str(folder), dtype=torch.bfloat16)
        tiny, _ = presets.load_pipeline("random-tiny", dtype=torch.bfloat16)
    for loaded in (pipe, tiny):
        assert loaded.transformer.patch_embedding.weight.dtype == torch.bfloat16
        assert loaded.vae.dtype == torch.bfloat16
    with pytest.warns(FutureWarning, match="pass `dtype`"):
        old, _ = presets.load_pipeline(str(folder), torch_dtype=torch.bfloat16)
    assert old.transformer.patch_embedding.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`dtype` only"):
        presets.load_pipeline(str(folder), dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_bundled_model_is_used_when_present(tmp_path, monkeypatch):
    folder = tmp_path / "shapesworld"
    presets.random_tiny_pipeline(seed=1).save_pretrained(folder)
    monkeypatch.setattr(presets, "BUNDLED_MODEL_DIR", folder)
    resolved = presets.resolve_model(None)
    assert resolved.kind == "bundled" and not resolved.is_random
    _, description = presets.load_pipeline("bundled")
    assert description.startswith("bundled ShapesWorld model")


def test_hub_id_that_cannot_be_loaded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        presets.load_pipeline("nobody-raven-test/no-such-model")


# ---------------------------------------------------------------------- video files
def test_save_video_pads_odd_sizes_for_mp4(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 7, 9, 3), dtype=np.uint8)
    path = save_video(frames, tmp_path / "odd.mp4", fps=8, min_size=0)
    assert _mp4_frames(path).shape == (5, 8, 10, 3)
    path = save_video(frames / 255.0, tmp_path / "small.mp4", min_size=64)  # float input, 10x enlargement
    assert _mp4_frames(path).shape == (5, 70, 90, 3)


def test_video_writer_appends_chunks(tmp_path):
    # Every frame differs (Pillow merges identical consecutive GIF frames); the first is dark, the last bright.
    ramp = np.linspace(0.2, 0.8, 21, dtype=np.float32)[:, None, None, None] * np.ones((21, 16, 16, 3), np.float32)
    chunks = [ramp[:9], ramp[9:]]
    for name in ("chunks.mp4", "chunks.gif"):
        with VideoWriter(tmp_path / name, fps=16, min_size=32) as writer:
            for chunk in chunks:
                writer.append(chunk)
            assert writer.frames_written == 21
        frames = _mp4_frames(writer.path) if name.endswith(".mp4") else None
        if frames is not None:
            assert frames.shape == (21, 32, 32, 3)
            assert abs(frames[0].mean() - 51) < 4 and abs(frames[-1].mean() - 204) < 4
        else:
            assert _gif_frames(writer.path) == 21


def test_video_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        check_video_path("clip.avi")
    with pytest.raises(ValueError, match="no extension"):
        save_video(np.zeros((1, 8, 8, 3)), tmp_path / "clip")
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        save_video(np.zeros((2, 8, 8)), tmp_path / "clip.gif")
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "clip.gif", fps=0)
    writer = VideoWriter(tmp_path / "clip.gif")
    writer.append(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="frame size changed"):
        writer.append(np.zeros((1, 16, 8, 3)))
    writer.close()


def test_read_video_round_trip_and_errors(tmp_path):
    """``read_video`` reads back what ``save_video`` wrote (mp4 within H.264 error, GIF exactly), keeps the last
    ``max_frames``, and turns missing or unreadable files into clear errors."""
    from diffusers_raven.utils.video import read_video

    ramp = np.linspace(0.1, 0.9, 13, dtype=np.float32)[:, None, None, None] * np.ones((13, 16, 16, 3), np.float32)
    expected = (ramp * 255).round().astype(np.uint8)
    mp4 = read_video(save_video(ramp, tmp_path / "ramp.mp4", min_size=0))
    assert mp4.shape == (13, 16, 16, 3) and mp4.dtype == np.uint8
    assert np.abs(mp4.astype(int) - expected).max() <= 3
    gif = read_video(save_video(ramp, tmp_path / "ramp.gif", min_size=0))
    assert np.array_equal(gif, expected)
    assert np.array_equal(read_video(tmp_path / "ramp.gif", max_frames=4), expected[-4:])
    assert np.array_equal(read_video(tmp_path / "ramp.mp4", max_frames=4), mp4[-4:])
    with pytest.raises(FileNotFoundError, match="no such video file"):
        read_video(tmp_path / "missing.mp4")
    for name in ("broken.mp4", "broken.gif"):
        (tmp_path / name).write_text("not a video")
        with pytest.raises(ValueError, match="cannot read video"):
            read_video(tmp_path / name)


# ---------------------------------------------------------------------- eval
def test_eval_writes_shapesworld_metrics(tmp_path, capsys):
    import json

    out_file = tmp_path / "metrics.json"
    code, out, _ = _run(["eval", "--model", "random-tiny", "--videos", "2", "--frames", "21", "--quiet",
                         "--output", str(out_file)], capsys)
    assert code == 0 and "wrote" in out
    result = json.loads(out_file.read_text())
    assert result["num_videos"] == 2 and result["split"] == "test"
    assert 0.0 <= result["mean"]["semantic_accuracy"] <= 1.0
    assert [c["chunk"] for c in result["per_chunk"]] == [0, 1]  # 9 + 12 frames: the pipeline's two chunks
    assert len(result["captions"]) == 2


@pytest.mark.parametrize("extra,expected", [(["--frames", "10"], "num_frames"), (["--videos", "0"], "--videos")])
def test_eval_errors_are_one_line(tmp_path, capsys, extra, expected):
    code, _, err = _run(["eval", "--model", "random-tiny", *extra], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
