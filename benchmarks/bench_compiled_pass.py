"""One chunk pass, eager vs compiled blocks, by model and latent size: where regional compilation pays on this CPU.

For each model (the bundled ShapesWorld transformer; the tiny benchmark config of ``configs.py``) and latent size,
a global cache holds 6 frames and the same 3-frame chunk pass (a sampler step at timestep 500, 6 visible frames) is
timed eagerly and with the blocks compiled (``transformer.compile_repeated_blocks()``, inductor), in turn, ``--repeats``
times after a warm-up that compiles. The figure is the median of the per-repeat ratios ``eager / compiled`` (above 1:
compiled is faster); the max abs difference of the two outputs is recorded.

    python benchmarks/bench_compiled_pass.py
"""

from __future__ import annotations

import time

import torch
from common import argument_parser, header, median, print_table, result_name, setup, write_results
from configs import bench_model, text_states

from diffusers_raven import KVCache
from diffusers_raven.pipelines.presets import load_pipeline

PASSES_PER_SAMPLE = 5


def bundled_transformer():
    pipe, _ = load_pipeline(None)
    return pipe.transformer.eval(), pipe.default_height // pipe.vae_scale_factor_spatial


def set_compiled(model, compiled: bool, backend: str) -> None:
    if compiled:
        model.compile_repeated_blocks(backend=backend)
    else:
        for block in model.blocks:
            block._compiled_call_impl = None


def measure(model, text: torch.Tensor, size: int, repeats: int, backend: str) -> dict:
    channels = model.config.in_channels
    generator = torch.Generator().manual_seed(0)
    history = torch.randn(1, channels, 6, size, size, generator=generator)
    chunk = torch.randn(1, channels, 3, size, size, generator=generator)
    cache = KVCache.for_model(model, 1)
    for start in (0, 3):
        model(history[:, :, start : start + 3], torch.zeros(1), text, kv_cache=cache, frame_offset=start,
              update_cache=True)

    def passes() -> tuple[float, torch.Tensor]:
        began = time.perf_counter()
        for _ in range(PASSES_PER_SAMPLE):
            out = model(chunk, torch.full((1,), 500.0), text, kv_cache=cache, frame_offset=6).sample
        return (time.perf_counter() - began) / PASSES_PER_SAMPLE, out

    outputs, times = {}, {"eager": [], "compiled": []}
    for variant in ("eager", "compiled"):  # warm-up (compiles)
        set_compiled(model, variant == "compiled", backend)
        _, outputs[variant] = passes()
    for r in range(repeats):
        for variant in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
            set_compiled(model, variant == "compiled", backend)
            seconds, _ = passes()
            times[variant].append(seconds)
    set_compiled(model, False, backend)
    ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]
    return {
        "latent_size": [size, size],
        "tokens_per_chunk": 3 * (size // model.config.patch_size[1]) * (size // model.config.patch_size[2]),
        "eager_ms": 1e3 * median(times["eager"]),
        "compiled_ms": 1e3 * median(times["compiled"]),
        "eager_over_compiled": {"median_ratio": median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)},
        "max_abs_diff": float((outputs["eager"] - outputs["compiled"]).abs().max()),
        "samples_s": times,
    }


def main() -> None:
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("chunk pass: eager vs compiled blocks")
    bundled, bundled_size = bundled_transformer()
    bundled_text = torch.randn(1, 32, bundled.config.text_dim, generator=torch.Generator().manual_seed(1))
    bench = bench_model()
    cases = [
        ("bundled", bundled, bundled_text, bundled_size),
        ("bundled", bundled, bundled_text, 2 * bundled_size),
        ("bench", bench, text_states(), 16),
        ("bench", bench, text_states(), 32),
    ]
    rows, results = [], []
    for name, model, text, size in cases:
        entry = {"model": name, **measure(model, text, size, args.repeats, args.backend)}
        results.append(entry)
        rows.append([name, f"{size}x{size}", entry["tokens_per_chunk"], entry["eager_ms"], entry["compiled_ms"],
                     entry["eager_over_compiled"]["median_ratio"], f"{entry['max_abs_diff']:.1e}"])
        print(f"  {name} {size}x{size}: eager/compiled {entry['eager_over_compiled']['median_ratio']:.2f}", flush=True)
    print_table(["model", "latents", "tokens/chunk", "eager ms", "compiled ms", "eager/compiled", "max |diff|"], rows)
    write_results(result_name("compiled_pass", args.threads), {"backend": args.backend, "results": results}, started)


if __name__ == "__main__":
    main()
