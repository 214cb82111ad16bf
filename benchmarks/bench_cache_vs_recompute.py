"""Cached streaming vs recomputing the visible history at every step.

Both approaches generate the same video chunk by chunk (3 latent frames per chunk, the 4-step consistency sampler)
from the same initial and step noise:

- ``cached``: what :class:`~diffusers_raven.CausalVideoPipeline` does. Every sampler step runs the model on the
  3-frame chunk only, attending to the KV cache; once the chunk is done, one more pass on the clean chunk (timestep
  0) writes its keys and values to the cache, in the model's cache-only mode as the pipeline runs it (the last block
  stops after its key/value projections, no output head). 5 passes of one chunk per chunk (4 for the last chunk,
  whose cache entries nothing reads, as in the pipeline).
- ``recompute``: a cache-less diffusion-forcing pipeline. Every sampler step of chunk ``j`` runs one block-causal
  pass over ``[the 3j clean frames generated so far | the noisy chunk]`` (per-frame timesteps 0 for the history,
  ``t_k`` for the chunk) and keeps the chunk's output. 4 passes of ``j + 1`` chunks for chunk ``j``.

For videos of 21, 42 and 63 latent frames, the two run in lockstep (one chunk of each in turn, so both see the same
machine load), several times; every run checks that both give the same chunks (max abs difference ≤ 1e-4). The
speedup ``time(recompute) / time(cached)`` is the median over runs of the ratio of their total times.

The table also gives the ratio of the two approaches' block multiply-accumulates (the speedup if time were
proportional to arithmetic; the cache-only context passes are counted with the work they skip left out), the
measured speedup as a fraction of that ceiling, and, from a probe run in the same lockstep (the same video with 2 × 2 latents, one token
per frame, whose matmuls are negligible), each approach's fixed per-pass cost (Python, op dispatch, small ops): its
share of the time, and the speedup once it is subtracted.

    python benchmarks/bench_cache_vs_recompute.py
"""

from __future__ import annotations

import time

import torch
from common import (
    argument_parser,
    header,
    median,
    print_table,
    ratio_summary,
    result_name,
    setup,
    summarize,
    write_results,
)
from configs import (
    BENCH_TRANSFORMER_CONFIG,
    CHUNK_FRAMES,
    LATENT_HEIGHT,
    SEED,
    TEXT_TOKENS,
    TOKENS_PER_FRAME,
    bench_model,
    latent_noise,
    sampler_schedule,
    text_states,
)

from diffusers_raven import CausalWanTransformer3DModel, KVCache

TOLERANCE = 1e-4
SPEEDUP_TARGET_21 = 3.0
CEILING_FRACTION_TARGET_21 = 0.95
# (latent frames, timed repeats): fewer repeats for the long videos, whose recompute run takes tens of seconds.
LENGTHS = ((21, 7), (42, 5), (63, 3))


def sampler_step(x: torch.Tensor, velocity: torch.Tensor, k: int, sigmas, step_noise, frames: slice):
    """Step ``k`` of the consistency sampler on a chunk: ``x̂0 = x − σ_k v``, then re-noise ``x̂0`` to ``σ_{k+1}`` with
    the chunk's slice of ``step_noise[k]``; the last step (``σ_{k+1} = 0``) returns ``x̂0``."""
    x0 = x - sigmas[k] * velocity
    sigma_next = sigmas[k + 1]
    if sigma_next == 0:
        return x0
    return (1 - sigma_next) * x0 + sigma_next * step_noise[k][:, :, frames]


class Video:
    """The noise of one video: initial noise and the noise of every re-noising step, ``[1, 16, frames, size, size]``."""

    def __init__(self, num_frames: int, num_steps: int, size: int = LATENT_HEIGHT) -> None:
        generator = torch.Generator().manual_seed(SEED + num_frames)
        self.num_frames = num_frames
        self.noise = latent_noise(num_frames, generator=generator, height=size, width=size)
        self.step_noise = [
            latent_noise(num_frames, generator=generator, height=size, width=size) for _ in range(num_steps - 1)
        ]


class CachedGenerator:
    """Chunk-by-chunk generation with a global KV cache (the algorithm of the pipeline)."""

    def __init__(self, model: CausalWanTransformer3DModel, text: torch.Tensor, video: Video, sigmas, timesteps):
        self.model, self.text, self.video = model, text, video
        self.sigmas, self.timesteps = sigmas, timesteps
        self.cache = KVCache.for_model(model, 1)

    def chunk(self, start: int) -> torch.Tensor:
        frames = slice(start, start + CHUNK_FRAMES)
        x = self.video.noise[:, :, frames]
        for k, t in enumerate(self.timesteps):
            velocity = self.model(x, torch.full((1,), t), self.text, kv_cache=self.cache, frame_offset=start).sample
            x = sampler_step(x, velocity, k, self.sigmas, self.video.step_noise, frames)
        # The context pass: the clean chunk at timestep 0 writes its keys and values to the cache (as in the
        # pipeline, not after the last chunk: nothing reads it).
        if start + CHUNK_FRAMES < self.video.num_frames:
            self.model(
                x, torch.zeros(1), self.text, kv_cache=self.cache, frame_offset=start, update_cache=True,
                cache_only=True,
            )
        return x


class RecomputeGenerator:
    """Chunk-by-chunk generation without a cache: every step re-runs the whole visible history."""

    def __init__(self, model: CausalWanTransformer3DModel, text: torch.Tensor, video: Video, sigmas, timesteps):
        self.model, self.text, self.video = model, text, video
        self.sigmas, self.timesteps = sigmas, timesteps
        self.clean = video.noise[:, :, :0]

    def chunk(self, start: int) -> torch.Tensor:
        frames = slice(start, start + CHUNK_FRAMES)
        x = self.video.noise[:, :, frames]
        for k, t in enumerate(self.timesteps):
            # Per-frame timesteps: 0 for the clean history, t_k for the noisy chunk.
            frame_t = torch.cat([torch.zeros(1, start), torch.full((1, CHUNK_FRAMES), t)], dim=1)
            out = self.model(torch.cat([self.clean, x], dim=2), frame_t, self.text, attention="block_causal").sample
            x = sampler_step(x, out[:, :, start:], k, self.sigmas, self.video.step_noise, frames)
        self.clean = torch.cat([self.clean, x], dim=2)
        return x


APPROACHES = {"cached": CachedGenerator, "recompute": RecomputeGenerator}


def lockstep(model, text, videos: dict[str, Video], sigmas, timesteps, repeat: int = 0) -> tuple[dict, dict]:
    """Generate every video with both approaches in lockstep: for each chunk, one chunk of every (video, approach) in
    turn, in the given order on even chunks and reversed on odd ones (swapped on odd repeats), so that all see the
    same machine load. Returns the total seconds of each ``"<video>/<approach>"`` and, per video, the max abs
    difference of every chunk between the two approaches."""
    generators = {
        f"{label}/{approach}": generator(model, text, video, sigmas, timesteps)
        for label, video in videos.items()
        for approach, generator in APPROACHES.items()
    }
    totals = dict.fromkeys(generators, 0.0)
    diffs = {label: [] for label in videos}
    num_frames = next(iter(videos.values())).num_frames
    for index, start in enumerate(range(0, num_frames, CHUNK_FRAMES)):
        order = list(generators) if (index + repeat) % 2 == 0 else list(reversed(generators))
        outputs = {}
        for key in order:
            began = time.perf_counter()
            outputs[key] = generators[key].chunk(start)
            totals[key] += time.perf_counter() - began
        for label in videos:
            diff = (outputs[f"{label}/cached"] - outputs[f"{label}/recompute"]).abs().max()
            diffs[label].append(float(diff))
    return totals, diffs


def measure(model, text, videos: dict[str, Video], sigmas, timesteps, repeats: int) -> tuple[dict, dict]:
    """Run :func:`lockstep` ``repeats`` times: the seconds of each video/approach per repeat, and per video the max
    abs difference of each chunk over the repeats. Asserts on every repeat that both approaches give the same
    chunks."""
    times: dict[str, list[float]] = {}
    diffs: dict[str, list[float]] = {}
    for repeat in range(repeats):
        totals, repeat_diffs = lockstep(model, text, videos, sigmas, timesteps, repeat)
        for label, chunk_diffs in repeat_diffs.items():
            assert max(chunk_diffs) <= TOLERANCE, (
                f"{label}: cached and recomputed chunks differ by {max(chunk_diffs):.2e} > {TOLERANCE}"
            )
            diffs[label] = [max(a, b) for a, b in zip(diffs.get(label, chunk_diffs), chunk_diffs)]
        for key, seconds in totals.items():
            times.setdefault(key, []).append(seconds)
        line = ", ".join(f"{key} {seconds:.3f}s" for key, seconds in totals.items())
        print(f"  repeat {repeat + 1}/{repeats}: {line}", flush=True)
    return times, diffs


def frames_processed(num_frames: int, steps: int) -> tuple[int, int]:
    """Latent frames pushed through the model: (cached, recompute). Their ratio is the speedup if the cost were
    linear in the frames of each pass, i.e. without attention."""
    chunks = num_frames // CHUNK_FRAMES
    cached = (chunks * (steps + 1) - 1) * CHUNK_FRAMES
    recompute = steps * CHUNK_FRAMES * chunks * (chunks + 1) // 2
    return cached, recompute


def block_macs(num_frames: int, steps: int) -> tuple[int, int]:
    """Multiply-accumulates of the transformer blocks: (cached, recompute).

    Per token and block: the self-attention projections (4 d²), the cross-attention query/output projections (2 d²)
    and attention to the text (2 T d), the FFN (2 d·ffn); per (query token, visible key token) pair: 2 d for
    ``QKᵀ`` and ``AV``. Embeddings, norms and the text key/value projections are left out (small here). A cached
    context pass is cache-only: its last block computes the query/key/value projections only (3 d² per token; the
    query is not needed either but is computed with the keys), nothing else.
    """
    config = BENCH_TRANSFORMER_CONFIG
    d, layers = config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"]
    per_token = 6 * d * d + 2 * TEXT_TOKENS * d + 2 * d * config["ffn_dim"]

    def linear(frames: int) -> int:
        return layers * frames * TOKENS_PER_FRAME * per_token

    def attention(query_frames: int, key_frames: int, num_layers: int = layers) -> int:
        return num_layers * query_frames * key_frames * TOKENS_PER_FRAME**2 * 2 * d

    def context_pass(j: int) -> int:  # cache-only: layers - 1 whole blocks, then the last block's projections
        full_blocks = (layers - 1) * CHUNK_FRAMES * TOKENS_PER_FRAME * per_token
        return full_blocks + attention(CHUNK_FRAMES, CHUNK_FRAMES * (j + 1), layers - 1) + (
            CHUNK_FRAMES * TOKENS_PER_FRAME * 3 * d * d
        )

    chunks = num_frames // CHUNK_FRAMES
    # Chunk j: each cached pass attends to j cached chunks + itself; the recompute pass over chunks 0..j lets chunk
    # i attend to chunks 0..i.
    cached = sum(
        steps * (linear(CHUNK_FRAMES) + attention(CHUNK_FRAMES, CHUNK_FRAMES * (j + 1)))
        + (context_pass(j) if j + 1 < chunks else 0)
        for j in range(chunks)
    )
    recompute = sum(
        steps
        * (linear(CHUNK_FRAMES * (j + 1)) + sum(attention(CHUNK_FRAMES, CHUNK_FRAMES * (i + 1)) for i in range(j + 1)))
        for j in range(chunks)
    )
    return cached, recompute


def main() -> None:
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("cache vs recompute")
    model = bench_model()
    text = text_states()
    sigmas, timesteps = sampler_schedule()
    print(f"   sigmas {[round(s, 4) for s in sigmas]}, timesteps {[round(t, 1) for t in timesteps]}")

    def videos(num_frames: int) -> dict[str, Video]:
        # "probe": the same video with 2 x 2 latents (1 token per frame). Its matmuls are negligible, so its time is
        # the fixed cost of each approach's passes (Python, op dispatch, small ops), measured in the same lockstep.
        return {"video": Video(num_frames, len(timesteps)), "probe": Video(num_frames, len(timesteps), size=2)}

    print("   warm-up: one 21-frame video with each approach")
    lockstep(model, text, videos(21), sigmas, timesteps)

    rows, per_length = [], []
    for num_frames, repeats in LENGTHS:
        print(f"-- {num_frames} latent frames, {repeats} repeats")
        times, diffs = measure(model, text, videos(num_frames), sigmas, timesteps, repeats)
        cached, recompute = times["video/cached"], times["video/recompute"]
        fixed_cached, fixed_recompute = times["probe/cached"], times["probe/recompute"]
        speedup = ratio_summary(recompute, cached)
        net_speedup = median(
            [(r - r0) / (c - c0) for r, r0, c, c0 in zip(recompute, fixed_recompute, cached, fixed_cached)]
        )
        fixed_share = {
            "cached": median([c0 / c for c, c0 in zip(cached, fixed_cached)]),
            "recompute": median([r0 / r for r, r0 in zip(recompute, fixed_recompute)]),
        }
        cached_frames, recompute_frames = frames_processed(num_frames, len(timesteps))
        cached_macs, recompute_macs = block_macs(num_frames, len(timesteps))
        per_length.append(
            {
                "latent_frames": num_frames,
                "chunks": num_frames // CHUNK_FRAMES,
                "repeats": repeats,
                "max_abs_diff": max(diffs["video"]),
                "max_abs_diff_per_chunk": diffs["video"],
                "cached": summarize(cached),
                "recompute": summarize(recompute),
                "speedup": speedup,
                "model_passes": {
                    "cached": (num_frames // CHUNK_FRAMES) * (len(timesteps) + 1) - 1,
                    "recompute": (num_frames // CHUNK_FRAMES) * len(timesteps),
                },
                "frames_processed": {
                    "cached": cached_frames,
                    "recompute": recompute_frames,
                    "ratio": recompute_frames / cached_frames,
                },
                "block_macs": {
                    "cached": cached_macs,
                    "recompute": recompute_macs,
                    "ratio": recompute_macs / cached_macs,
                },
                "speedup_over_block_mac_ratio": speedup["median_ratio"] / (recompute_macs / cached_macs),
                "fixed_cost_probe": {
                    "latent_size": [2, 2],
                    "cached": summarize(fixed_cached),
                    "recompute": summarize(fixed_recompute),
                    "max_abs_diff": max(diffs["probe"]),
                    "share_of_time": fixed_share,
                    "speedup_without_fixed_cost": net_speedup,
                },
            }
        )
        rows.append(
            [
                num_frames,
                median(cached),
                median(recompute),
                speedup["median_ratio"],
                f"{speedup['min_ratio']:.2f}-{speedup['max_ratio']:.2f}",
                recompute_macs / cached_macs,
                speedup["median_ratio"] / (recompute_macs / cached_macs),
                net_speedup,
                f"{fixed_share['cached']:.0%} / {fixed_share['recompute']:.0%}",
                f"{max(diffs['video']):.1e}",
            ]
        )

    print()
    print_table(
        [
            "latent frames",
            "cached s",
            "recompute s",
            "speedup",
            "range",
            "MAC ratio",
            "speedup / MAC ratio",
            "speedup w/o fixed cost",
            "fixed cost share c / r",
            "max |diff|",
        ],
        rows,
    )
    speedup_21 = per_length[0]["speedup"]["median_ratio"]
    met = speedup_21 >= SPEEDUP_TARGET_21
    print(
        f"\ntarget: speedup >= {SPEEDUP_TARGET_21} at 21 latent frames -> {speedup_21:.2f} ({'met' if met else 'MISSED'})"
    )
    fraction_21 = per_length[0]["speedup_over_block_mac_ratio"]
    fraction_met = fraction_21 >= CEILING_FRACTION_TARGET_21
    print(
        f"target: speedup >= {CEILING_FRACTION_TARGET_21} x block-MAC ratio at 21 latent frames -> {fraction_21:.3f} "
        f"({'met' if fraction_met else 'MISSED'})"
    )
    write_results(
        result_name("cache_vs_recompute", args.threads),
        {
            "model_config": BENCH_TRANSFORMER_CONFIG,
            "latent_shape_per_frame": [16, 16, 16],
            "text_tokens": text.shape[1],
            "sigmas": sigmas,
            "timesteps": timesteps,
            "tolerance": TOLERANCE,
            "results": per_length,
            "target": {"speedup_at_21_frames": SPEEDUP_TARGET_21, "measured": speedup_21, "met": met},
            "target_fraction_of_ceiling": {
                "speedup_over_block_mac_ratio_at_21_frames": CEILING_FRACTION_TARGET_21,
                "measured": fraction_21,
                "met": fraction_met,
            },
        },
        started,
    )


if __name__ == "__main__":
    main()
