"""The ``diffusers-raven eval`` sub-command: ShapesWorld metrics of a model, written as JSON.

It samples captions of one split (held-out combinations by default), generates a video per caption with the
model's streaming sampler, and scores the videos with the analytic evaluator (semantic accuracy, motion, fidelity,
consistency), overall and per chunk (drift).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .cli import CLIError

__all__ = ["add_eval_parser", "run_eval"]

_EPILOG = """\
examples:
  diffusers-raven eval --output metrics.json                         # the default model, 16 held-out captions
  diffusers-raven eval --model path/to/pipeline --videos 64 --frames 81 --output long.json
"""


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command."""
    parser = subparsers.add_parser(
        "eval",
        help="ShapesWorld metrics of a model (JSON)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="bundled (default), random-tiny, a folder or a Hub id")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="captions of held-out combinations (test, default) or of training ones")
    parser.add_argument("--videos", type=int, default=16, help="number of videos (default 16)")
    parser.add_argument("--frames", type=int, default=21, help="output frames per video (default 21)")
    parser.add_argument("--objects", type=int, default=None, choices=(1, 2), help="objects per scene (default: mixed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the captions and the noise")
    parser.add_argument("--window-frames", type=int, default=None, help="attention window in latent frames")
    parser.add_argument("--sink-frames", type=int, default=0, help="attention sink frames")
    parser.add_argument("--output", default="shapesworld_metrics.json", help="where to write the JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    if args.videos < 1:
        raise CLIError(f"--videos must be at least 1, got {args.videos}")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise CLIError(f"--frames must be 1 + 4k output frames (num_frames), got {args.frames}")
    import torch

    from .pipelines.presets import load_pipeline
    from .shapes import caption, evaluate_batch, sample_scene

    started = time.perf_counter()
    pipe, description = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_height
    captions = [caption(sample_scene(args.seed + i, num_objects=args.objects, split=args.split))
                for i in range(args.videos)]
    videos = []
    for i, text in enumerate(captions):
        video = pipe(text, num_frames=args.frames, height=size, width=size, window_frames=args.window_frames,
                     sink_frames=args.sink_frames, generator=torch.Generator().manual_seed(args.seed + i)).frames[0]
        videos.append(video)
        if not args.quiet:
            print(f"video {i + 1}/{len(captions)}: {text}", flush=True)
    first_chunk = 1 + pipe.vae_scale_factor_temporal * (pipe.chunk_frames - 1)
    result = evaluate_batch(videos, captions, chunk_frames=[first_chunk, pipe.vae_scale_factor_temporal * pipe.chunk_frames])
    result.update({
        "model": description,
        "split": args.split,
        "frames": args.frames,
        "size": size,
        "seed": args.seed,
        "window_frames": args.window_frames,
        "sink_frames": args.sink_frames,
        "captions": captions,
        "seconds": round(time.perf_counter() - started, 1),
        "command": "diffusers-raven " + " ".join(sys.argv[1:]) if sys.argv else None,
    })
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2, default=float)
    mean = result["mean"]
    summary = ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if isinstance(v, float))
    print(f"{description}: {summary}")
    print(f"wrote {args.output}")
    return 0
