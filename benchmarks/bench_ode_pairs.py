"""Teacher ODE pairs (``build_ode_dataset``) integrated one prompt at a time against several prompts together.

The student recipe builds its regression targets by integrating the guided teacher ODE (48 Euler steps, CFG 3, so
96 teacher passes per trajectory). The teacher here is a ``WanTransformer3DModel`` with the bundled model's sizes
(random weights: the weights do not change the cost), the pipeline is the bundled one (its text encoder and its
few-step sigmas). ``--prompts`` held-out captions are integrated with ``batch_size`` 1 and ``--batch_size``,
interleaved ``--repeats`` times after a warm-up, and the script records the seconds per pair of each and the
largest difference between the two datasets (the pairs must not depend on the batch size).

    python benchmarks/bench_ode_pairs.py
    python benchmarks/bench_ode_pairs.py --prompts 16 --batch_size 16
"""

from __future__ import annotations

import time

import torch
from common import (
    argument_parser,
    header,
    interleaved,
    print_table,
    ratio_summary,
    result_name,
    setup,
    summarize,
    write_results,
)
from diffusers import WanTransformer3DModel

from diffusers_raven.pipelines.presets import load_pipeline
from diffusers_raven.shapes import held_out_captions
from diffusers_raven.trainer import build_ode_dataset


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="trajectories per variant")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts integrated together")
    parser.add_argument("--num_steps", type=int, default=48, help="Euler steps of the teacher ODE")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed runs per variant")
    args = parser.parse_args()
    started = time.perf_counter()
    setup(args.threads)
    header("teacher ODE pairs: one prompt at a time vs batched")

    pipe, description = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    config.pop("num_frames_per_chunk", None)
    torch.manual_seed(0)
    teacher = WanTransformer3DModel.from_config(config).eval()
    height, width = pipe.default_height, pipe.default_width
    prompts = held_out_captions(args.prompts, 1_000_000_000, height, width)
    max_sequence_length = pipe.tokenizer.model_max_length

    def build(batch_size: int):
        return build_ode_dataset(pipe, teacher, prompts, 21, height, width, num_steps=args.num_steps,
                                 guidance_scale=args.guidance_scale, seed=0,
                                 max_sequence_length=max_sequence_length, batch_size=batch_size)

    one, batched = build(1), build(args.batch_size)
    difference = max(
        (torch.stack(list(one[key])) - torch.stack(list(batched[key]))).abs().max().item()
        for key in ("ode_states", "latents")
    )
    times = interleaved({"batch_1": lambda: build(1), f"batch_{args.batch_size}": lambda: build(args.batch_size)},
                        args.repeats, warmup=0)
    per_pair = {name: [t / args.prompts for t in series] for name, series in times.items()}
    ratio = ratio_summary(times["batch_1"], times[f"batch_{args.batch_size}"])
    print_table(["variant", "s per pair (median)"], [[n, summarize(s)["median_s"]] for n, s in per_pair.items()])
    print(f"speed-up {ratio['median_ratio']:.2f}x; largest difference between the datasets {difference:.2e}")
    write_results(
        result_name("ode_pairs", args.threads),
        {
            "pipeline": description,
            "teacher_config": config,
            "num_frames": 21,
            "height": height,
            "width": width,
            "prompts": prompts,
            "num_steps": args.num_steps,
            "guidance_scale": args.guidance_scale,
            "batch_size": args.batch_size,
            "seconds_per_pair": {name: summarize(series) for name, series in per_pair.items()},
            "speedup_batched_over_one": ratio,
            "max_abs_difference_between_datasets": difference,
        },
        started,
    )


if __name__ == "__main__":
    main()
