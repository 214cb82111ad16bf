"""How the ShapesWorld teacher's held-out semantic accuracy grows with its training steps, and what that projects.

    python benchmarks/teacher_scaling.py                    # a second: reads the saved chain results only

Every teacher of the 8x-VAE chain that ran the committed recipe (width 192, learning rate 5e-4, a warm-up and a
cosine over its whole budget, so each ended annealed) was scored by ``trainers/shapes_eval_chain.py`` on the same
128 held-out captions (``--eval_seed 1000001000``, 48 Euler steps, CFG 3). This reads, from
``docs/experiments/shapesworld/results/``, each teacher's step count (its training JSON) and its per-video semantic
accuracy (its 128-caption JSON), checks that the captions are the same in every file and that the evaluator scores
them alike, and fits

    semantic accuracy = a + b * log2(steps / 10,000)

by least squares over the teachers. Its uncertainty comes from a bootstrap over the 128 videos, resampled jointly
for all teachers (they share the captions): each draw refits the line and projects the steps at which it reaches
``--target`` (0.85 by default, the aim of the bundled model). The hours that would take use the measured rate of
the fastest whole stage (the round-3 teacher: training seconds / steps). The same fit is given per attribute
(without bootstrap), and beside it the VAE round trip of the same captions: ground-truth videos encoded and decoded,
the level a generator of these latents would reach with perfect latents.

A log-linear fit over four budgets between 6,366 and 21,840 steps is a description, not a law; the projection says
how far outside the measured range the target lies, not when it would be reached. Teachers left out of the fit
(another learning rate, a snapshot in the middle of a cosine) are listed with their residual from the line.
Writes ``benchmarks/results/teacher_scaling.json``.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, argument_parser, print_table, write_results  # noqa: E402

RESULTS = REPO_ROOT / "docs" / "experiments" / "shapesworld" / "results"
ATTRIBUTES = ("background", "count", "color", "shape", "direction", "speed")

#: (name, training JSON, 128-caption JSON, model name in it); the fitted teachers
FITTED = (
    ("round2", "shapes_teacher.json", "shapes_teacher_long_128.json", "round2"),
    ("compiled", "shapes_teacher_compile.json", "shapes_teacher_compile_128.json", "compiled"),
    ("round3", "shapes_teacher_threads.json", "shapes_teacher_threads_128.json", "chain3"),
    ("long_165min", "shapes_teacher_long.json", "shapes_teacher_long_128.json", "long"),
)
#: teachers scored on the same captions but not fitted: (name, steps or training JSON, 128-caption JSON, model, why)
OTHERS = (
    ("lr1e3", "shapes_teacher_lr1e3.json", "shapes_teacher_lr1e3_128.json", "lr1e3", "peak learning rate 1e-3"),
    ("long_165min_step12342", 12342, "shapes_teacher_long12342_128.json", "long12342",
     "snapshot of the 165-minute run in the middle of its cosine"),
)
STEP_REFERENCE = 10_000


def fit_log_steps(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares ``values = a + b * log2(steps / STEP_REFERENCE)``; returns ``(a, b)``."""
    x = np.log2(np.asarray(steps, dtype=float) / STEP_REFERENCE)
    y = np.asarray(values, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"steps and values must be 1-D of the same length >= 2, got {x.shape} and {y.shape}")
    x_mean, y_mean = x.mean(), y.mean()
    b = float(((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum())
    return float(y_mean - b * x_mean), b


def steps_to_reach(a: float, b: float, target: float) -> float:
    """Steps at which the fitted line reaches ``target`` (``inf`` if it never rises to it)."""
    if b <= 0:
        return math.inf
    exponent = (target - a) / b
    return STEP_REFERENCE * 2.0**exponent if exponent < 1000 else math.inf


@functools.cache
def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def check_comparable(data: dict, reference: dict, name: str) -> None:
    """Refuse a chain result scored on other captions or frames, or by an evaluator that scores differently.

    The evaluator's fingerprint also changes with code that does not touch the scores (the motion summary was added
    later), so a different fingerprint is accepted when the ground truth and the VAE round trip, scored in both
    files, agree video by video.
    """
    if data["captions"] != reference["captions"] or data["num_frames"] != reference["num_frames"]:
        raise SystemExit(f"{name} was scored on other captions or another length than {FITTED[0][2]}")
    if data["evaluator"] == reference["evaluator"]:
        return
    for model in ("ground_truth", "vae_round_trip"):
        if data["models"][model]["semantic_accuracy_per_video"] != reference["models"][model]["semantic_accuracy_per_video"]:
            raise SystemExit(f"{name}: evaluator {data['evaluator']} scores {model} differently from evaluator "
                             f"{reference['evaluator']} of {FITTED[0][2]}")


def _model(chain_file: str, model: str) -> tuple[dict, dict]:
    data = _load(chain_file)
    if model not in data["models"]:
        raise KeyError(f"{chain_file} has no model {model!r} (models: {sorted(data['models'])})")
    return data, data["models"][model]


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.85, help="semantic accuracy to project the steps for")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws over the videos")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    args = parser.parse_args()
    if not 0.0 < args.target <= 1.0:
        raise SystemExit(f"--target must be in (0, 1], got {args.target}")
    if args.bootstrap < 10:
        raise SystemExit(f"--bootstrap must be at least 10, got {args.bootstrap}")
    started = time.perf_counter()

    reference = None
    rows = []
    for name, train_file, chain_file, model in FITTED:
        train = _load(train_file)
        data, scores = _model(chain_file, model)
        if reference is None:
            reference = data
            round_trip = data["models"]["vae_round_trip"]
        else:
            check_comparable(data, reference, chain_file)
        rows.append({
            "name": name,
            "steps": int(train["steps"]),
            "train_seconds": float(train["train_wall_seconds"]),
            "seconds_per_step": float(train["train_wall_seconds"]) / int(train["steps"]),
            "training_json": (RESULTS / train_file).relative_to(REPO_ROOT).as_posix(),
            "scores_json": f"{(RESULTS / chain_file).relative_to(REPO_ROOT).as_posix()}:{model}",
            "semantic_accuracy": float(scores["semantic_accuracy"]),
            "semantic_accuracy_stderr": float(scores["semantic_accuracy_stderr"]),
            "per_video": np.asarray(scores["semantic_accuracy_per_video"], dtype=float),
            **{f"{attr}_accuracy": float(scores[f"{attr}_accuracy"]) for attr in ATTRIBUTES},
        })

    steps = np.asarray([r["steps"] for r in rows], dtype=float)
    per_video = np.stack([r["per_video"] for r in rows])  # [teachers, videos]
    a, b = fit_log_steps(steps, per_video.mean(axis=1))
    fastest = min(rows, key=lambda r: r["seconds_per_step"])

    rng = np.random.default_rng(args.seed)
    num_videos = per_video.shape[1]
    slopes, projected = [], []
    for _ in range(args.bootstrap):
        pick = rng.integers(0, num_videos, num_videos)
        a_i, b_i = fit_log_steps(steps, per_video[:, pick].mean(axis=1))
        slopes.append(b_i)
        projected.append(steps_to_reach(a_i, b_i, args.target))
    slopes, projected = np.asarray(slopes), np.asarray(projected)
    finite = np.isfinite(projected)

    def quantiles(values: np.ndarray) -> dict[str, float]:
        q = np.quantile(values, [0.05, 0.5, 0.95])
        return {"q05": float(q[0]), "median": float(q[1]), "q95": float(q[2])}

    target_steps = steps_to_reach(a, b, args.target)
    per_attribute = {}
    for attr in ATTRIBUTES:
        a_k, b_k = fit_log_steps(steps, [r[f"{attr}_accuracy"] for r in rows])
        per_attribute[attr] = {"intercept_at_10k_steps": a_k, "per_doubling": b_k,
                               "vae_round_trip": float(round_trip[f"{attr}_accuracy"])}

    others = []
    for name, train, chain_file, model, why in OTHERS:
        n = train if isinstance(train, int) else int(_load(train)["steps"])
        data, scores = _model(chain_file, model)
        check_comparable(data, reference, chain_file)
        value = float(scores["semantic_accuracy"])
        others.append({"name": name, "steps": n, "semantic_accuracy": value, "why_not_fitted": why,
                       "residual_from_fit": value - (a + b * math.log2(n / STEP_REFERENCE))})

    print_table(["teacher", "steps", "s/step", "semantic", "stderr", "fit", "shape", "direction"],
                [[r["name"], r["steps"], r["seconds_per_step"], r["semantic_accuracy"], r["semantic_accuracy_stderr"],
                  a + b * math.log2(r["steps"] / STEP_REFERENCE), r["shape_accuracy"], r["direction_accuracy"]]
                 for r in rows])
    hours = target_steps * fastest["seconds_per_step"] / 3600
    print(f"\nfit: semantic = {a:.3f} + {b:.4f} * log2(steps / {STEP_REFERENCE})  "
          f"(bootstrap slope {np.quantile(slopes, 0.05):.4f} .. {np.quantile(slopes, 0.95):.4f})")
    print(f"{args.target} reached at {target_steps:,.0f} steps = {hours:,.0f} h at {fastest['seconds_per_step']:.3f} "
          f"s/step ({fastest['name']}); VAE round trip of the same captions {round_trip['semantic_accuracy']:.3f}")
    for o in others:
        print(f"not fitted: {o['name']} ({o['why_not_fitted']}): {o['semantic_accuracy']:.3f} at {o['steps']:,} "
              f"steps, {o['residual_from_fit']:+.3f} from the line")

    write_results("teacher_scaling", {
        "target": args.target,
        "num_videos": num_videos,
        "fit": {"model": f"semantic = a + b * log2(steps / {STEP_REFERENCE})", "a": a, "b_per_doubling": b,
                "bootstrap_draws": args.bootstrap, "bootstrap_seed": args.seed,
                "bootstrap_b_per_doubling": quantiles(slopes)},
        "projection": {
            "steps": target_steps,
            "doublings_beyond_largest_budget": math.log2(target_steps / steps.max()),
            "hours_at_fastest_stage_rate": hours,
            "fastest_stage": fastest["name"],
            "fastest_stage_seconds_per_step": fastest["seconds_per_step"],
            "bootstrap_steps": quantiles(projected) if finite.any() else None,
            "bootstrap_fraction_never": float(1.0 - finite.mean()),
        },
        "vae_round_trip_semantic_accuracy": float(round_trip["semantic_accuracy"]),
        "per_attribute": per_attribute,
        "teachers": [{k: v for k, v in r.items() if k != "per_video"} for r in rows],
        "not_fitted": others,
    }, started)


if __name__ == "__main__":
    main()
