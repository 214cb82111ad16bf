"""The bundled model's stream, eager and compiled, against the code of an earlier commit: one run, interleaved.

Three variants stream the same prompts with the same seeds, in turn (the order rotating every repeat), so that all
see the same machine load:

- ``baseline``: the eager pipeline of ``--baseline`` (default: the commit before the per-pass cuts and the compiled
  path), run in a child process from a git worktree of that commit, which streams when asked;
- ``eager``: this checkout's pipeline;
- ``compiled``: the same pipeline after ``pipe.enable_compile()`` (regional ``torch.compile`` of the transformer's
  blocks, inductor backend). Compilation happens in an untimed warm-up stream of each length.

Each stream is what ``bench_default_model.py`` times (``pipe.stream(...)`` from the prompt to decoded 64x64 frames,
``output_type="np"``), for the training length (21 frames) and 4x that. The figures are the medians of the
per-repeat ratios of the stream seconds, ``baseline / eager``, ``baseline / compiled`` and ``eager / compiled``,
and the share of the stream spent in the transformer (eager, from a profile of one stream).

    python benchmarks/bench_compiled_stream.py
    python benchmarks/bench_compiled_stream.py --baseline <commit> --repeats 5
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import REPO_ROOT, argument_parser, header, median, print_table, result_name, setup, write_results

from diffusers_raven.pipelines.presets import load_pipeline
from diffusers_raven.shapes import caption, sample_scene

DEFAULT_BASELINE = "1989645"  # the commit before the per-pass cuts, the cache-only context pass and the compiled path
SPEEDUP_TARGET = 1.5

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
torch.set_grad_enabled(False)
from diffusers_raven.pipelines.presets import load_pipeline
pipe, _ = load_pipeline(None)
pipe.set_progress_bar_config(disable=True)
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    start = time.perf_counter()
    for chunk in pipe.stream(request["prompt"], num_frames=request["num_frames"],
                             generator=torch.Generator().manual_seed(request["seed"]), output_type="np"):
        pass
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


def stream_seconds(pipe, prompt: str, num_frames: int, seed: int) -> float:
    start = time.perf_counter()
    for _ in pipe.stream(prompt, num_frames=num_frames, generator=torch.Generator().manual_seed(seed), output_type="np"):
        pass
    return time.perf_counter() - start


class Baseline:
    """The baseline commit's pipeline in a child process (a git worktree of the commit, its ``src`` first on the
    path)."""

    def __init__(self, commit: str, threads: int) -> None:
        self.commit = subprocess.run(
            ["git", "rev-parse", commit], cwd=REPO_ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
        self.tree = tempfile.mkdtemp(prefix="raven-baseline-")
        subprocess.run(["git", "worktree", "add", "--detach", self.tree, self.commit], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        env = {**os.environ, "PYTHONPATH": os.path.join(self.tree, "src"), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env, cwd=self.tree,
        )
        assert self.process.stdout.readline().strip() == "ready"

    def stream_seconds(self, prompt: str, num_frames: int, seed: int) -> float:
        request = {"prompt": prompt, "num_frames": num_frames, "seed": seed}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        subprocess.run(["git", "worktree", "remove", "--force", self.tree], cwd=REPO_ROOT, capture_output=True)


def ratios(numerators: list[float], denominators: list[float]) -> dict:
    """Median, min and max of the per-stream ratios."""
    values = [x / y for x, y in zip(numerators, denominators)]
    return {"median_ratio": median(values), "min_ratio": min(values), "max_ratio": max(values)}


def transformer_share(pipe, prompt: str, num_frames: int) -> float:
    """Share of one eager stream's time spent in the transformer's forward passes."""
    spent = [0.0]
    forward = pipe.transformer.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    pipe.transformer.forward = timed_forward
    try:
        total = stream_seconds(pipe, prompt, num_frames, seed=0)
    finally:
        del pipe.transformer.forward
    return spent[0] / total


def main() -> None:
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="commit whose eager pipeline is the baseline")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per length")
    parser.add_argument("--num_prompts", type=int, default=2, help="held-out ShapesWorld captions")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variant")
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("bundled model: baseline eager vs eager vs compiled stream")

    pipe, description = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    train_frames = int(pipe.config.get("sample_num_frames", None) or 21)
    latent_frames = (train_frames - 1) // pipe.vae_scale_factor_temporal + 1
    long_frames = (latent_frames * 4 - 1) * pipe.vae_scale_factor_temporal + 1
    prompts = [caption(sample_scene(10**9 + i, split="test")) for i in range(args.num_prompts)]
    baseline = Baseline(args.baseline, args.threads)
    print(f"model: {description}; baseline {baseline.commit[:7]} in a child process", flush=True)

    def run(variant: str, prompt: str, num_frames: int, seed: int) -> float:
        if variant == "baseline":
            return baseline.stream_seconds(prompt, num_frames, seed)
        if variant == "compiled":
            pipe.enable_compile(backend=args.backend)
        try:
            return stream_seconds(pipe, prompt, num_frames, seed)
        finally:
            pipe.disable_compile()

    variants = ["baseline", "eager", "compiled"]
    results = []
    try:
        for num_frames in (train_frames, long_frames):
            began = time.perf_counter()
            for variant in variants:  # warm-up: compilation, lazy imports, allocator growth
                run(variant, prompts[0], num_frames, seed=0)
            warmup_s = time.perf_counter() - began
            times = {v: [] for v in variants}
            for r in range(args.repeats):
                for i, prompt in enumerate(prompts):
                    shift = (r * len(prompts) + i) % len(variants)
                    for variant in variants[shift:] + variants[:shift]:
                        times[variant].append(run(variant, prompt, num_frames, seed=r))
                line = ", ".join(f"{v} {median(times[v][-len(prompts):]):.3f}s" for v in variants)
                print(f"  {num_frames} frames, repeat {r + 1}/{args.repeats}: {line}", flush=True)

            results.append(
                {
                    "num_frames": num_frames,
                    "seconds": times,
                    "median_seconds": {v: median(times[v]) for v in variants},
                    "baseline_over_eager": ratios(times["baseline"], times["eager"]),
                    "baseline_over_compiled": ratios(times["baseline"], times["compiled"]),
                    "eager_over_compiled": ratios(times["eager"], times["compiled"]),
                    "transformer_share_eager": transformer_share(pipe, prompts[0], num_frames),
                    "warmup_s_all_variants": warmup_s,
                }
            )
    finally:
        baseline.close()

    print_table(
        ["frames", "baseline s", "eager s", "compiled s", "baseline/eager", "baseline/compiled", "eager/compiled",
         "transformer share"],
        [
            [e["num_frames"], e["median_seconds"]["baseline"], e["median_seconds"]["eager"],
             e["median_seconds"]["compiled"], e["baseline_over_eager"]["median_ratio"],
             e["baseline_over_compiled"]["median_ratio"], e["eager_over_compiled"]["median_ratio"],
             e["transformer_share_eager"]]
            for e in results
        ],
    )
    best = max(results[0]["baseline_over_eager"]["median_ratio"], results[0]["baseline_over_compiled"]["median_ratio"])
    write_results(
        result_name("compiled_stream", args.threads),
        {
            "model": description,
            "baseline_commit": baseline.commit,
            "backend": args.backend,
            "prompts": prompts,
            "repeats": args.repeats,
            "results": results,
            "target": {
                "speedup_over_baseline_at_training_length": SPEEDUP_TARGET,
                "measured_best_of_eager_and_compiled": best,
                "met": best >= SPEEDUP_TARGET,
            },
        },
        started,
    )


if __name__ == "__main__":
    main()
