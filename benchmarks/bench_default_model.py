"""The default (bundled) model streaming on this CPU: frames per second and latency of the first chunk.

What a user of ``diffusers-raven generate`` or the Space experiences: ``CausalVideoPipeline.stream()`` from a text
prompt to decoded 64x64 frames (text encoding, the 4-step consistency sampler against the KV cache, the context pass
and chunk-by-chunk VAE decoding all included), ``output_type="np"``. For each length (the training length and 4x
that) and each of several held-out prompts, the stream is run ``--repeats`` times and the script records

- **first-chunk latency**: seconds from the ``stream()`` call to the first decoded chunk in hand (the pipeline is
  already loaded; a first untimed warm-up stream pays the one-off costs: lazy imports, allocator growth);
- **throughput**: decoded frames / seconds of the whole stream, and the steady-state rate after the first chunk
  (frames of chunks 2.. / their seconds), against real time at ``--real_time_fps`` (16 fps, Wan's frame rate);
- the per-chunk seconds of every run.

Medians over runs are reported; every sample is in the JSON. Absolute seconds depend on the machine's load (the
load average is saved at the start and the end).

    python benchmarks/bench_default_model.py                       # the bundled model, 1 thread
    python benchmarks/bench_default_model.py --threads 2
    python benchmarks/bench_default_model.py --model path/or/hub-id   # any CausalVideoPipeline
"""

from __future__ import annotations

import time

import torch
from common import argument_parser, header, load_average, median, print_table, result_name, setup, write_results

from diffusers_raven.pipelines.presets import load_pipeline, resolve_model
from diffusers_raven.shapes import caption, sample_scene

FIRST_CHUNK_TARGET_S = 1.0


def run_stream(pipe, prompt: str, num_frames: int, seed: int) -> dict:
    start = time.perf_counter()
    marks, frames = [], []
    for chunk in pipe.stream(
        prompt, num_frames=num_frames, generator=torch.Generator().manual_seed(seed), output_type="np"
    ):
        marks.append(time.perf_counter() - start)
        frames.append(int(chunk.frames.shape[1]))
    per_chunk = [marks[0]] + [b - a for a, b in zip(marks, marks[1:])]
    total = marks[-1]
    steady_frames, steady_s = sum(frames[1:]), total - marks[0]
    return {
        "first_chunk_s": marks[0],
        "total_s": total,
        "frames": sum(frames),
        "fps": sum(frames) / total,
        "steady_fps": steady_frames / steady_s if steady_s > 0 else None,
        "chunk_frames": frames,
        "chunk_s": per_chunk,
    }


def main() -> None:
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model to load (default: the bundled model)")
    parser.add_argument("--repeats", type=int, default=3, help="timed streams per prompt and length")
    parser.add_argument("--num_prompts", type=int, default=3, help="held-out ShapesWorld captions")
    parser.add_argument("--long_factor", type=int, default=4, help="the long video has this many x latent frames")
    parser.add_argument("--real_time_fps", type=float, default=16.0)
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("default model streaming: fps and first-chunk latency")
    load_start = load_average()

    resolved = resolve_model(args.model)
    t0 = time.perf_counter()
    pipe, description = load_pipeline(args.model)
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    height, width = pipe.default_height, pipe.default_width
    train_frames = int(pipe.config.get("sample_num_frames", None) or 21)
    latent_frames = (train_frames - 1) // pipe.vae_scale_factor_temporal + 1
    long_frames = (latent_frames * args.long_factor - 1) * pipe.vae_scale_factor_temporal + 1
    prompts = [caption(sample_scene(10**9 + i, split="test")) for i in range(args.num_prompts)]
    print(f"model: {description} ({resolved.kind}); {height}x{width}; loaded in {load_s:.2f} s", flush=True)

    run_stream(pipe, prompts[0], train_frames, seed=0)  # warm-up, untimed
    results = []
    for num_frames in (train_frames, long_frames):
        runs = []
        for prompt in prompts:
            for r in range(args.repeats):
                runs.append({"prompt": prompt, "seed": r, **run_stream(pipe, prompt, num_frames, seed=r)})
        entry = {
            "num_frames": num_frames,
            "runs": runs,
            "first_chunk_s_median": median([x["first_chunk_s"] for x in runs]),
            "first_chunk_s_max": max(x["first_chunk_s"] for x in runs),
            "fps_median": median([x["fps"] for x in runs]),
            "steady_fps_median": median([x["steady_fps"] for x in runs if x["steady_fps"] is not None] or [0.0]),
        }
        entry["real_time_factor"] = entry["fps_median"] / args.real_time_fps
        results.append(entry)

    print_table(
        ["frames", "first chunk s (median)", "first chunk s (max)", "fps (median)", "steady fps", "x real time"],
        [
            [e["num_frames"], e["first_chunk_s_median"], e["first_chunk_s_max"], e["fps_median"],
             e["steady_fps_median"], e["real_time_factor"]]
            for e in results
        ],
    )
    first = results[0]
    write_results(
        result_name("default_model_streaming", args.threads),
        {
            "model": description,
            "model_kind": resolved.kind,
            "height": height,
            "width": width,
            "load_s": load_s,
            "load_average_start": load_start,
            "prompts": prompts,
            "repeats": args.repeats,
            "real_time_fps": args.real_time_fps,
            "results": results,
            "targets": {
                "faster_than_real_time": {"measured_fps": first["fps_median"], "met": first["real_time_factor"] > 1},
                "first_chunk_latency_s": {
                    "target": FIRST_CHUNK_TARGET_S,
                    "measured_median": first["first_chunk_s_median"],
                    "met": first["first_chunk_s_median"] <= FIRST_CHUNK_TARGET_S,
                },
            },
        },
        started,
    )


if __name__ == "__main__":
    main()
