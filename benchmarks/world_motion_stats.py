"""How often a ShapesWorld object moves the way its caption says, over a whole clip.

    python benchmarks/world_motion_stats.py                 # a few seconds
    python benchmarks/world_motion_stats.py --scenes 10000 --frames 21

A caption names each object's initial direction and speed class; the world then bounces the object off the walls.
From the world's closed-form velocities (``velocities``, no rendering, no evaluator) this counts, per speed class,
over the objects of training-split scenes ``sample_scene(i, split="train")``:

- ``frames_along_caption``: the mean fraction of a clip's frames in which the object moves along its captioned
  direction (its velocity has a positive component along it);
- ``mostly_against_caption``: the fraction of objects that move against their captioned direction in more than half
  of the frames (a bounce early in the clip);
- ``bounced``: the fraction that bounce at least once, and ``bounced_in_first_4_frames`` within frames 1-4 (one
  latent frame of a 4x temporal VAE).

A generator that learnt "left means move left" and no walls would be right for ``frames_along_caption`` of the frames;
following the captions needs the reflections too. Writes ``benchmarks/results/world_motion_stats.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, print_table, setup, write_results  # noqa: E402

from diffusers_raven.shapes import DIRECTIONS, SPEEDS, sample_scene, velocities  # noqa: E402


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000, help="training-split scenes")
    parser.add_argument("--frames", type=int, default=21, help="clip length")
    args = parser.parse_args()
    if args.scenes < 1:
        raise SystemExit(f"--scenes must be at least 1, got {args.scenes}")
    if args.frames < 6:
        raise SystemExit(f"--frames must be at least 6 (frames 1-4 after the first), got {args.frames}")
    setup(args.threads)
    started = time.perf_counter()
    rows: dict[str, list[tuple[float, bool, bool]]] = {name: [] for name in SPEEDS}
    for seed in range(args.scenes):
        scene = sample_scene(seed, split="train")
        v = velocities(scene, args.frames)  # [frames, objects, 2]
        for k, obj in enumerate(scene.objects):
            along = v[:, k] @ np.asarray(DIRECTIONS[obj.direction], dtype=float) > 0
            flips = (np.sign(v[1:, k]) != np.sign(v[:-1, k])).any(axis=1)  # flips[t - 1]: a bounce into frame t
            rows[obj.speed].append((float(along.mean()), bool(flips.any()), bool(flips[:4].any())))
    results, table = {}, []
    for name, values in rows.items():
        frac, bounced, early = (np.asarray(c) for c in zip(*values))
        results[name] = {
            "objects": len(values),
            "frames_along_caption": float(frac.mean()),
            "mostly_against_caption": float((frac < 0.5).mean()),
            "bounced": float(bounced.mean()),
            "bounced_in_first_4_frames": float(early.mean()),
        }
        table.append([name, *results[name].values()])
    print_table(["speed", *results[next(iter(results))]], table)
    write_results("world_motion_stats", {"num_scenes": args.scenes, "num_frames": args.frames, "split": "train",
                                         "results": results}, started)


if __name__ == "__main__":
    main()
