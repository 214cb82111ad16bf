"""How the ShapesWorld evaluator's motion and shape measures hold up on degraded ground truth.

    python benchmarks/eval_motion_robustness.py            # ~1 minute on one core
    python benchmarks/eval_motion_robustness.py --videos 8 # quicker

Held-out scenes (``sample_scene(10**9 + i, split="test")``, 21 frames, 64x64) are scored as rendered, blurred
(Gaussian, sigma 1 / 1.5 / 2 px) and after a round trip through the bundled model's VAE (encode to the posterior mode,
decode). Each setting is scored twice: with the evaluator's wall tolerance (``WALL_TOLERANCE``, the default) and with
it set to 0 (walls exactly where the track's median detected size puts them). Every caption attribute is a property
of the rendered scene, so the ideal score is 1 everywhere; what a degradation costs shows which measure it hits.

Writes ``benchmarks/results/eval_motion_robustness.json``; ``docs/shapesworld.md`` quotes its numbers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, print_table, setup, write_results  # noqa: E402
from eval_validation import blur  # noqa: E402

from diffusers_raven.pipelines import presets  # noqa: E402
from diffusers_raven.shapes import (  # noqa: E402
    caption,
    evaluate_batch,
    evaluator,
    render_video,
    sample_scene,
    vae_round_trip,
)

NUM_FRAMES = 21
KEYS = ("semantic_accuracy", "count_accuracy", "color_accuracy", "shape_accuracy", "direction_accuracy",
        "speed_accuracy", "physics_accuracy", "direction_error")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24, help="held-out scenes per setting")
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(presets.BUNDLED_MODEL_DIR / "vae").eval()
    scenes = [sample_scene(10**9 + i, split="test") for i in range(args.videos)]
    captions = [caption(s) for s in scenes]
    truth = [render_video(s, NUM_FRAMES) for s in scenes]
    settings = {"rendered": truth}
    for sigma in (1.0, 1.5, 2.0):
        settings[f"blur {sigma:g} px"] = [blur(v, sigma) for v in truth]
    settings["VAE round trip"] = vae_round_trip(vae, truth)

    default_tolerance = evaluator.WALL_TOLERANCE
    results, rows = {}, []
    for name, videos in settings.items():
        results[name] = {}
        for label, tolerance in (("wall tolerance", default_tolerance), ("exact walls", 0.0)):
            evaluator.WALL_TOLERANCE = tolerance
            try:
                mean = evaluate_batch(videos, captions)["mean"]
            finally:
                evaluator.WALL_TOLERANCE = default_tolerance
            results[name][label] = {k: mean[k] for k in KEYS}
            rows.append([name, label, *[mean[k] for k in KEYS]])
    print_table(["setting", "walls", *KEYS], rows)
    write_results("eval_motion_robustness", {
        "num_videos": args.videos,
        "num_frames": NUM_FRAMES,
        "wall_tolerance_px": default_tolerance,
        "bounce_margin_px_per_frame": evaluator.BOUNCE_MARGIN,
        "vae": "bundled ShapesWorld model (diffusers_raven/assets/shapesworld/vae)",
        "results": results,
    }, started)


if __name__ == "__main__":
    main()
