"""Reward against training time for RL runs of ``trainers/shapes_grpo.py`` and ``trainers/shapes_kvpo.py``: one
plot, one curve per run.

    python trainers/shapes_rl_plot.py --run cmgrpo=out/grpo/consistency --run flowgrpo=out/grpo/sde \\
        --output docs/experiments/shapesworld/images/shapes_rl_reward.png \\
        --summary docs/experiments/shapesworld/results/shapes_rl_curves.json

Each run's ``grpo_results.json`` (or ``kvpo_results.json``) holds the logged reward against training time (``reward_curve``: one point per
logging interval). The plot shows, for every reward function and for the weighted sum (``reward``), a moving
average over ``--smooth_minutes`` of training time against training minutes. The summary JSON gives per run and per
metric the mean over the first and the last ``--window_minutes`` of training and their difference with its
standard error (the logged points of a window treated as independent). A KVPO run's rewards are those of its
anchor and branches at its own video length (93 frames in the recipe), a CM-GRPO run's those of its rollouts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

RESULT_FILES = ("grpo_results.json", "kvpo_results.json")


def load_curve(folder: str) -> tuple[list[dict], dict]:
    candidates = [os.path.join(folder, name) for name in RESULT_FILES]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise SystemExit(f"--run: {folder} holds none of {', '.join(RESULT_FILES)} (run trainers/shapes_grpo.py "
                         "or trainers/shapes_kvpo.py first)")
    with open(path) as f:
        results = json.load(f)
    curve = results.get("reward_curve") or []
    if not curve:
        raise SystemExit(f"--run: {path} holds no reward curve")
    return curve, results


def metric_names(curve: list[dict]) -> list[str]:
    names = sorted({k for point in curve for k in point if k.startswith("rewards/") and k.endswith("/mean")})
    return ["reward", *names]


def series(curve: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(p["train_seconds"] / 60.0, p[name]) for p in curve if name in p]
    minutes, values = (np.array(v, dtype=float) for v in zip(*points))
    return minutes, values


def moving_average(minutes: np.ndarray, values: np.ndarray, width: float) -> np.ndarray:
    return np.array([values[(minutes > m - width) & (minutes <= m)].mean() for m in minutes])


def window_stats(minutes: np.ndarray, values: np.ndarray, width: float) -> dict:
    first, last = values[minutes <= minutes[0] + width], values[minutes >= minutes[-1] - width]

    def stats(x):
        return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan"))

    (m0, s0), (m1, s1) = stats(first), stats(last)
    return {"first": m0, "first_stderr": s0, "last": m1, "last_stderr": s1, "change": m1 - m0,
            "change_stderr": math.hypot(s0, s1), "points": [len(first), len(last)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="label=folder of a shapes_grpo.py run")
    parser.add_argument("--output", required=True, help="PNG file of the plot")
    parser.add_argument("--summary", default=None, help="JSON file of the first/last-window means")
    parser.add_argument("--smooth_minutes", type=float, default=5.0)
    parser.add_argument("--window_minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--run must be label=folder, got {item!r}")
        runs[label] = load_curve(folder)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(next(iter(runs.values()))[0])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    summary = {"command": "python trainers/shapes_rl_plot.py " + " ".join(sys.argv[1:] if argv is None else argv), "runs": {}}
    for label, (curve, results) in runs.items():
        summary["runs"][label] = {"steps": results.get("steps"), "train_seconds": results.get("train_seconds"),
                                  "sampler": results.get("config", {}).get("sampler"), "metrics": {}}
        for ax, name in zip(axes[0], names):
            minutes, values = series(curve, name)
            ax.plot(minutes, moving_average(minutes, values, args.smooth_minutes), label=label)
            summary["runs"][label]["metrics"][name] = window_stats(minutes, values, args.window_minutes)
    for ax, name in zip(axes[0], names):
        ax.set_title(name.removeprefix("rewards/").removesuffix("/mean"))
        ax.set_xlabel("training minutes")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"moving average ({args.smooth_minutes:g} min)")
    axes[0][0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=110)
    plt.close(fig)
    print(f"wrote {args.output}")
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.summary}")
    return summary


if __name__ == "__main__":
    main()
