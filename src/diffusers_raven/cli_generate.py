"""The ``diffusers-raven generate`` sub-command: stream a video from a prompt (or continue a clip) and write it chunk
by chunk.

Heavy imports (torch, diffusers) happen only when the command runs, so ``diffusers-raven --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from .cli import CLIError

__all__ = ["RANDOM_MODEL_NOTE", "add_generate_parser", "run_generate"]

RANDOM_MODEL_NOTE = "using a randomly initialised tiny pipeline (the video is noise-like)"

_DESCRIPTION = """\
Generate a video from a text prompt with a streaming (chunk-by-chunk) causal video diffusion model.

The prompt is the first argument (or --prompt TEXT). The default model is the small ShapesWorld model shipped with
the package: 64x64 videos of coloured shapes on a plain background, following captions such as "a red circle moving
right on a black background" (colours, shapes, directions and speeds, backgrounds; two objects joined by "and").

Each chunk of frames is written to the output file as soon as it is decoded, and one line per chunk reports its
latency. Frame counts follow the model's chunking: with the usual 3 latent frames per chunk and the VAE's 4x
temporal compression, valid --frames values are 9 (one chunk), 21, 33, 45, ... (12 more per chunk).

With --continue CLIP, the video continues a clip (.mp4, .gif or any video ffmpeg reads; one image works too, as a
one-frame clip): the clip is encoded with the VAE chunk by chunk and written to the model's cache, and generation
goes on from its last frame. --frames then counts the whole video, the clip included (by default the clip plus
two chunks, 24 frames). The clip's frames are resized to the output size, and only its last 1 + 4·k frames are used
(with --window-frames, at most window - chunk latent frames); each change is printed as a note.
"""

_EPILOG = """\
models (--model):
  bundled       the small ShapesWorld model shipped with the package (the default; an installation without its
                files falls back to a randomly initialised tiny pipeline and prints a note saying so).
  random-tiny   a randomly initialised tiny pipeline: noise-like video, useful to try the machinery offline.
  FOLDER        a pipeline folder written by CausalVideoPipeline.save_pretrained (model_index.json and the
                tokenizer, text_encoder, transformer, vae and scheduler sub-folders).
  OWNER/NAME    a Hugging Face Hub repository holding such a folder.

examples:
  diffusers-raven generate "a red circle moving right"                       # writes raven.mp4
  diffusers-raven generate "a blue square moving quickly up on a gray background" --frames 45 --output square.gif
  diffusers-raven generate "a red circle moving right" "a red circle moving left" \\
      --switch-frames 21 --frames 45           # prompt switch: the second prompt takes over at frame 21
  diffusers-raven generate "a green triangle moving left" --frames 81 --window-frames 9 --sink-frames 3
  diffusers-raven generate "a red circle moving right" --continue clip.mp4 --output continued.mp4
  diffusers-raven generate --prompt "a red circle moving right"              # the prompt as an option works too
  diffusers-raven generate "..." --model path/to/pipeline --height 256 --width 256 --steps 4
"""


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``generate`` sub-command on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "generate",
        help="generate a video from a prompt (streamed and written chunk by chunk)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prompts",
        nargs="*",
        metavar="PROMPT",
        help="what the video shows; several prompts with --switch-frames change prompt mid-video",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="the prompt as an option instead (repeat it for a prompt schedule: --prompt A --prompt B)",
    )
    parser.add_argument(
        "--switch-frames",
        type=int,
        nargs="+",
        metavar="FRAME",
        help="output frames at which the next prompt takes over (one per extra prompt, increasing); a switch "
        "applies from the first chunk starting at or after that frame",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="'bundled' (default: the ShapesWorld model shipped with the package), 'random-tiny', a pipeline "
        "folder or a Hub repository id (see below)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        metavar="N",
        help="number of output frames: 9, 21, 33, ... (default: 21); with --continue, the whole video's, the clip "
        "included (default: the clip plus 24 frames)",
    )
    parser.add_argument(
        "--continue",
        dest="continue_clip",
        default=None,
        metavar="CLIP",
        help="a video (or image) to continue: .mp4, .gif, ...; the output starts with it (decoded by the model's VAE)",
    )
    parser.add_argument(
        "--without-clip",
        action="store_true",
        help="with --continue, write only the frames generated after the clip",
    )
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        metavar="PIXELS",
        help="frame height in pixels (default: the model's size, 64 for the bundled model)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        metavar="PIXELS",
        help="frame width in pixels (default: the model's size, 64 for the bundled model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the noise (default: 0)")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps per chunk (default: the scheduler's, 4)"
    )
    parser.add_argument(
        "--window-frames",
        type=int,
        default=None,
        metavar="N",
        help="attend only to the last N latent frames (default: the whole history)",
    )
    parser.add_argument(
        "--sink-frames",
        type=int,
        default=0,
        metavar="N",
        help="always keep the first N latent frames in the window (needs --window-frames; default: 0)",
    )
    parser.add_argument(
        "--rope",
        choices=("absolute", "relative"),
        default=None,
        help="positions of cached frames: absolute (default for a fixed length) or relative to the window",
    )
    parser.add_argument("--fps", type=float, default=16, help="frames per second of the written video (default: 16)")
    parser.add_argument(
        "--output", default="raven.mp4", metavar="PATH", help="output file, .mp4 or .gif (default: raven.mp4)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the transformer blocks with torch.compile (pipe.enable_compile(); pays on GPUs and large models, "
        "not for the bundled model on a CPU; the first chunks include the compilation)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors and notes")
    parser.set_defaults(func=run_generate)
    return parser


def _check_args(args: argparse.Namespace) -> list[str]:
    """Checks that need no model; returns the prompt schedule (the positional prompts, or the --prompt options)."""
    if args.prompts and args.prompt:
        raise CLIError("give the prompt as an argument or with --prompt, not both.")
    option = not args.prompts
    prompts = list(args.prompts or args.prompt or [])
    if not prompts:
        raise CLIError('give a prompt: diffusers-raven generate "a red circle moving right" (or --prompt TEXT).')
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            which = "--prompt" if option else "the prompt"
            which = which if len(prompts) == 1 else f"{which} number {i + 1}"
            raise CLIError(f"{which} is empty: give the text the video should show.")
    switches = args.switch_frames
    if len(prompts) > 1 and not switches:
        raise CLIError(
            f"{len(prompts)} prompts need --switch-frames with {len(prompts) - 1} frame(s) at which to switch."
        )
    if switches and len(switches) != len(prompts) - 1:
        raise CLIError(
            f"--switch-frames has {len(switches)} frame(s) but there are {len(prompts)} prompts; give one switch "
            "frame per extra prompt."
        )
    if args.frames is not None and args.frames < 1:
        raise CLIError(f"--frames must be positive (num_frames = 1 + 4·k), got {args.frames}.")
    if args.without_clip and args.continue_clip is None:
        raise CLIError("--without-clip needs --continue CLIP.")
    if args.continue_clip is not None:
        from pathlib import Path

        if not Path(args.continue_clip).is_file():
            raise CLIError(f"--continue {args.continue_clip}: no such file.")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name} must be a positive number of pixels, got {value}.")
    if args.fps <= 0:
        raise CLIError(f"--fps must be positive, got {args.fps:g}.")
    return prompts


def _read_clip(path: str) -> Any:
    """The frames of the clip to continue, ``[F, H, W, 3]`` uint8 (a still image is a one-frame clip)."""
    from .utils.video import read_video

    try:
        return read_video(path)
    except (ValueError, ImportError) as err:
        video_error = err
    try:  # not a video: maybe an image
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError):
        raise CLIError(f"--continue {path}: {video_error}") from None


def _clip_frame_counts(pipe: Any, frames: int | None, clip_frames: int, window_frames: int | None) -> tuple[int, int]:
    """``(whole video's frames, clip's latent frames)`` for --continue: --frames checked against the clip (the whole
    video is 1 + t·(P + c·n − 1) frames for a clip of P latent frames), or the default, the clip plus two chunks."""
    t, c = pipe.vae_scale_factor_temporal, pipe.chunk_frames
    kept, latent = pipe.clip_frames_kept(clip_frames, window_frames)
    if frames is None:
        return 1 + t * (latent + 2 * c - 1), latent
    total = (frames - 1) // t + 1
    if (frames - 1) % t or total <= latent or (total - latent) % c:
        examples = ", ".join(str(1 + t * (latent + c * n - 1)) for n in (1, 2, 3))
        raise CLIError(
            f"--frames counts the whole video, the clip included: the {kept} frames used of the clip are {latent} "
            f"latent frames, so --frames must be 1 + {t}·({latent} + {c}·n − 1), e.g. {examples}; got {frames}."
        )
    return frames, latent


@contextlib.contextmanager
def _pipeline_warnings_as_notes() -> Iterator[None]:
    """Print the pipeline's warnings (a clip resized or cut) as ``note:`` lines on stderr while the command runs."""

    class Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            print(f"note: {record.getMessage()}", file=sys.stderr, flush=True)

    package = logging.getLogger("diffusers_raven")
    handler, propagate = Notes(level=logging.WARNING), package.propagate
    package.addHandler(handler)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.propagate = propagate


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"unknown --device {name!r} ({err}).") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available on this machine; use --device cpu.")
    return device


def run_generate(args: argparse.Namespace) -> int:
    """Run the ``generate`` sub-command; returns the exit code."""
    prompts = _check_args(args)
    from .utils.video import check_video_path

    check_video_path(args.output)  # before loading anything

    import torch

    from .pipelines.presets import load_pipeline, resolve_model
    from .utils.video import VideoWriter

    device = _device(args.device)
    clip = _read_clip(args.continue_clip) if args.continue_clip is not None else None  # bad files fail fast
    resolved = resolve_model(args.model)
    say = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))

    if resolved.is_random:
        reason = "no bundled model found; " if resolved.fallback else ""
        print(f"note: {reason}{RANDOM_MODEL_NOTE}", file=sys.stderr, flush=True)
    t_load = time.perf_counter()
    pipe, description = load_pipeline(args.model)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe.enable_compile()
    height = args.height or pipe.default_height
    width = args.width or pipe.default_width
    say(f"model: {description} (loaded in {time.perf_counter() - t_load:.1f} s, device {device})")

    clip_latent_frames, num_frames = 0, args.frames or 21
    if clip is not None:
        num_frames, clip_latent_frames = _clip_frame_counts(pipe, args.frames, len(clip), args.window_frames)
        say(
            f"continuing {args.continue_clip}: {len(clip)} frames of {clip.shape[2]}x{clip.shape[1]}, "
            f"{pipe.clip_frames_kept(len(clip), args.window_frames)[0]} used ({clip_latent_frames} latent frames)"
        )

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with _pipeline_warnings_as_notes():
        stream = pipe.stream(
            prompt=prompts if args.switch_frames else prompts[0],
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=args.steps,
            generator=generator,
            window_frames=args.window_frames,
            sink_frames=args.sink_frames,
            switch_frames=args.switch_frames,
            rope=args.rope,
            output_type="np",
            video=clip,
            return_prefix=not args.without_clip,
        )
    latent_frames = pipe.latent_frames_for(num_frames)
    clip_chunks = -(-clip_latent_frames // pipe.chunk_frames)
    num_chunks = clip_chunks + -(-(latent_frames - clip_latent_frames) // pipe.chunk_frames)
    steps = len(pipe.scheduler.timesteps)
    what = f"{num_frames} frames" if clip is None else f"{num_frames} frames (the clip's included)"
    say(
        f"generating {what} at {width}x{height} in {num_chunks - clip_chunks} chunk(s), {steps} step(s) per chunk, "
        f"seed {args.seed}"
    )
    try:
        writer = VideoWriter(args.output, fps=args.fps)
    except ImportError as err:
        raise CLIError(str(err)) from err

    start = time.perf_counter()
    try:
        with writer, _pipeline_warnings_as_notes():
            while True:
                t_chunk = time.perf_counter()
                chunk = next(stream, None)
                if chunk is None:
                    break
                latency = time.perf_counter() - t_chunk
                frames = chunk.frames[0]
                writer.append(frames)
                prompt_note = f", prompt {chunk.prompt_index + 1}" if args.switch_frames else ""
                clip_note = " (the clip, encoded and decoded)" if chunk.is_prefix else ""
                say(
                    f"chunk {chunk.chunk_index + 1}/{num_chunks}: frames {chunk.frame_start}-"
                    f"{chunk.frame_start + len(frames) - 1} ({writer.frames_written} so far) in {latency:.2f} s"
                    f"{prompt_note}{clip_note}"
                )
    finally:
        stream.close()
    elapsed = time.perf_counter() - start
    rate = writer.frames_written / elapsed if elapsed > 0 else float("inf")
    say(
        f"done: {writer.frames_written} frames in {elapsed:.1f} s ({rate:.1f} frames/s); "
        f"wrote {writer.path} ({writer.frames_written / args.fps:.1f} s at {args.fps:g} fps)"
    )
    return 0
