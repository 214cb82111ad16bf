"""An endless stream with a windowed KV cache: per-chunk latency, cache bytes and process memory stay flat.

A model-level stream (the chunk loop of :class:`~diffusers_raven.CausalVideoPipeline` without text encoder and VAE):
every chunk runs the 4 sampler steps against the cache and one context pass that writes the chunk to it. The cache
keeps a window of 12 latent frames (3 attention sinks, the current chunk, 6 recent frames) with relative RoPE, so
the stream can run forever in constant memory. Over 105 chunks (0-based indices) the script measures:

- per-chunk latency, median over chunks 8–12 vs 98–102. The two are timed ~90 chunks apart, so changes of the
  machine's load enter their raw ratio. Hence every chunk is timed next to a *reference*: a fixed workload (chunk 3
  regenerated from a saved cache state; from chunk 3 on every chunk sees a full window, so it has the same shapes).
  The ratio of ``latency / reference`` medians is the load-corrected in-stream ratio;
- chunk 10 vs chunk 100 replayed in turn from saved cache states, 15 times (the direct interleaved comparison);
- ``KVCache.nbytes`` and the process RSS (``VmRSS``) at chunks 10 and 100.

A global cache (every frame kept) runs 32 chunks as a contrast: its bytes and latency grow with the stream (medians
over chunks 8–12 vs 26–30, raw and load-corrected, and chunk 10 vs chunk 30 replayed in turn).

    python benchmarks/bench_endless_stream.py
"""

from __future__ import annotations

import time

import torch
from common import (
    argument_parser,
    header,
    interleaved,
    median,
    print_table,
    ratio_summary,
    result_name,
    rss_bytes,
    setup,
    summarize,
    timed,
    write_results,
)
from configs import (
    BENCH_TRANSFORMER_CONFIG,
    CHUNK_FRAMES,
    SEED,
    bench_model,
    latent_noise,
    sampler_schedule,
    text_states,
)

from diffusers_raven import CausalWanTransformer3DModel, KVCache

WINDOW_FRAMES = 12
SINK_FRAMES = 3
ROPE = "relative"
WINDOWED_CHUNKS = 105
GLOBAL_CHUNKS = 32
EARLY, LATE, GLOBAL_LATE = range(8, 13), range(98, 103), range(26, 31)
PROBE_EARLY, PROBE_LATE, GLOBAL_PROBE_LATE = 10, 100, 30
REFERENCE_CHUNK = 3
REPLAY_REPEATS = 15
LATENCY_TARGET = 1.25
MB = 2**20


class Stream:
    """A chunk-by-chunk stream of one model and one cache; chunk ``i``'s noise is seeded by ``i``."""

    def __init__(self, model: CausalWanTransformer3DModel, cache: KVCache, text: torch.Tensor) -> None:
        self.model = model
        self.cache = cache
        self.text = text
        self.sigmas, self.timesteps = sampler_schedule()

    def noise(self, index: int) -> list[torch.Tensor]:
        """Initial noise and the noise of each re-noising step of chunk ``index``."""
        generator = torch.Generator().manual_seed(SEED + index)
        return [latent_noise(CHUNK_FRAMES, generator=generator) for _ in self.timesteps]

    def chunk(self, index: int, noise: list[torch.Tensor]) -> torch.Tensor:
        """Generate chunk ``index``: 4 sampler steps attending to the cache, then the context pass writing it."""
        start = index * CHUNK_FRAMES
        x = noise[0]
        for k, t in enumerate(self.timesteps):
            velocity = self.model(x, torch.full((1,), t), self.text, kv_cache=self.cache, frame_offset=start).sample
            x0 = x - self.sigmas[k] * velocity
            sigma_next = self.sigmas[k + 1]
            x = x0 if sigma_next == 0 else (1 - sigma_next) * x0 + sigma_next * noise[k + 1]
        self.model(x, torch.zeros(1), self.text, kv_cache=self.cache, frame_offset=start, update_cache=True)
        return x

    def advance(self, num_chunks: int) -> None:
        """Generate the next chunks up to chunk ``num_chunks - 1`` (untimed)."""
        for index in range(self.cache.num_frames // CHUNK_FRAMES, num_chunks):
            self.chunk(index, self.noise(index))

    def run(self, num_chunks: int, reference: Replay, probes: tuple[int, ...] = ()) -> dict:
        """Stream ``num_chunks`` chunks, each timed next to one ``reference`` run (the order alternating); the
        per-chunk latency, reference time, cache bytes and RSS (after each chunk)."""
        trace = {"latency_s": [], "reference_s": [], "cache_nbytes": [], "rss_bytes": []}
        for index in range(num_chunks):
            noise = self.noise(index)
            if index % 2:
                trace["reference_s"].append(timed(reference))
            trace["latency_s"].append(timed(lambda i=index, n=noise: self.chunk(i, n)))
            if not index % 2:
                trace["reference_s"].append(timed(reference))
            trace["cache_nbytes"].append(self.cache.nbytes)
            trace["rss_bytes"].append(rss_bytes())
            if index in probes or index == num_chunks - 1:
                print(
                    f"  chunk {index:3d}: {trace['latency_s'][-1] * 1000:6.1f} ms (reference "
                    f"{trace['reference_s'][-1] * 1000:6.1f} ms), cache {self.cache.nbytes / MB:6.2f} MB, "
                    f"RSS {trace['rss_bytes'][-1] / MB:7.1f} MB, frames held {len(self.cache.cached_frames)}",
                    flush=True,
                )
        return trace


class Replay:
    """Regenerates chunk ``index`` of a stream from the cache state it had before that chunk.

    Built when the stream has just generated chunk ``index - 1``: it snapshots the cache there. Each call restores the
    snapshot (so every call pays the same copy-on-write clone on its context pass) and generates the chunk.
    """

    def __init__(self, stream: Stream, index: int) -> None:
        self.stream = stream
        self.index = index
        self.state = stream.cache.snapshot()
        self.noise = stream.noise(index)

    def __call__(self) -> torch.Tensor:
        self.stream.cache.restore(self.state)
        return self.stream.chunk(self.index, self.noise)


def new_windowed_cache(model: CausalWanTransformer3DModel) -> KVCache:
    return KVCache.for_model(model, 1, window_frames=WINDOW_FRAMES, sink_frames=SINK_FRAMES, rope=ROPE)


def replay_pair(model, text, cache: KVCache, early: int, late: int) -> dict[str, list[float]]:
    """Seconds of chunks ``early`` and ``late`` regenerated in turn from the cache states they were made from.

    A separate stream of the same seeded chunks reaches the same states as the measured stream; its snapshots
    (which keep buffers alive) stay out of that stream's RSS readings.
    """
    stream = Stream(model, cache, text)
    stream.advance(early)
    replays = {"early": Replay(stream, early)}
    stream.advance(late)
    replays["late"] = Replay(stream, late)
    return interleaved(replays, repeats=REPLAY_REPEATS, warmup=1, log=False)


def latency_summary(trace: dict, early: range, late: range) -> dict:
    """Median latency over the ``early`` and ``late`` chunks, raw and divided by the reference timed next to it."""
    latency, reference = trace["latency_s"], trace["reference_s"]
    normalised = [t / r for t, r in zip(latency, reference)]

    def over(values: list[float], chunks: range) -> float:
        return median([values[i] for i in chunks])

    return {
        "early_chunks": [early.start, early.stop - 1],
        "late_chunks": [late.start, late.stop - 1],
        "early_ms": over(latency, early) * 1000,
        "late_ms": over(latency, late) * 1000,
        "raw_ratio": over(latency, late) / over(latency, early),
        "early_reference_ms": over(reference, early) * 1000,
        "late_reference_ms": over(reference, late) * 1000,
        "load_corrected_ratio": over(normalised, late) / over(normalised, early),
    }


def main() -> None:
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("endless stream")
    model = bench_model()
    text = text_states()
    reference_stream = Stream(model, new_windowed_cache(model), text)
    reference_stream.advance(REFERENCE_CHUNK)
    reference = Replay(reference_stream, REFERENCE_CHUNK)

    # 1. The windowed stream; its RSS readings include only the stream and the (constant) reference.
    print(f"-- windowed cache: window {WINDOW_FRAMES}, sinks {SINK_FRAMES}, rope {ROPE!r}, {WINDOWED_CHUNKS} chunks")
    windowed = Stream(model, new_windowed_cache(model), text)
    trace = windowed.run(WINDOWED_CHUNKS, reference, probes=(PROBE_EARLY, PROBE_LATE))
    latency = latency_summary(trace, EARLY, LATE)

    print(f"-- replay of chunk {PROBE_EARLY} vs chunk {PROBE_LATE}, interleaved, {REPLAY_REPEATS} repeats")
    replay = replay_pair(model, text, new_windowed_cache(model), PROBE_EARLY, PROBE_LATE)
    replay_ratio = ratio_summary(replay["late"], replay["early"])

    # 2. The contrast: a global cache keeps every frame.
    print(f"-- global cache: {GLOBAL_CHUNKS} chunks")
    global_stream = Stream(model, KVCache.for_model(model, 1), text)
    global_trace = global_stream.run(GLOBAL_CHUNKS, reference, probes=(PROBE_EARLY, GLOBAL_PROBE_LATE))
    global_latency = latency_summary(global_trace, EARLY, GLOBAL_LATE)
    print(
        f"-- global replay of chunk {PROBE_EARLY} vs chunk {GLOBAL_PROBE_LATE}, interleaved, {REPLAY_REPEATS} repeats"
    )
    global_replay = replay_pair(model, text, KVCache.for_model(model, 1), PROBE_EARLY, GLOBAL_PROBE_LATE)
    global_replay_ratio = ratio_summary(global_replay["late"], global_replay["early"])

    bytes_early, bytes_late = trace["cache_nbytes"][PROBE_EARLY], trace["cache_nbytes"][PROBE_LATE]
    rss_early, rss_late = trace["rss_bytes"][PROBE_EARLY], trace["rss_bytes"][PROBE_LATE]
    rss_delta_mb = (rss_late - rss_early) / MB
    global_bytes = global_trace["cache_nbytes"]

    print()
    print_table(
        ["cache", "compared", "early ms", "late ms", "raw ratio", "load-corrected ratio", "bytes early/late MB"],
        [
            [
                "windowed",
                "chunks 8-12 vs 98-102",
                latency["early_ms"],
                latency["late_ms"],
                latency["raw_ratio"],
                latency["load_corrected_ratio"],
                f"{bytes_early / MB:.3f} / {bytes_late / MB:.3f}",
            ],
            [
                "windowed",
                f"replay {PROBE_EARLY} vs {PROBE_LATE}",
                median(replay["early"]) * 1000,
                median(replay["late"]) * 1000,
                replay_ratio["median_ratio"],
                "(interleaved)",
                "",
            ],
            [
                "global",
                "chunks 8-12 vs 26-30",
                global_latency["early_ms"],
                global_latency["late_ms"],
                global_latency["raw_ratio"],
                global_latency["load_corrected_ratio"],
                f"{global_bytes[PROBE_EARLY] / MB:.3f} / {global_bytes[GLOBAL_PROBE_LATE] / MB:.3f}",
            ],
            [
                "global",
                f"replay {PROBE_EARLY} vs {GLOBAL_PROBE_LATE}",
                median(global_replay["early"]) * 1000,
                median(global_replay["late"]) * 1000,
                global_replay_ratio["median_ratio"],
                "(interleaved)",
                "",
            ],
        ],
    )
    print(f"\nRSS at chunk {PROBE_EARLY}: {rss_early / MB:.1f} MB, at chunk {PROBE_LATE}: {rss_late / MB:.1f} MB")
    checks = {
        "latency_load_corrected_met": latency["load_corrected_ratio"] <= LATENCY_TARGET,
        "latency_replay_met": replay_ratio["median_ratio"] <= LATENCY_TARGET,
        "latency_raw_met": latency["raw_ratio"] <= LATENCY_TARGET,
        "cache_bytes_identical": bytes_early == bytes_late,
    }
    print(
        f"targets: latency(100) <= {LATENCY_TARGET} x latency(10): load-corrected "
        f"{latency['load_corrected_ratio']:.3f}, replay {replay_ratio['median_ratio']:.3f} (raw "
        f"{latency['raw_ratio']:.3f}); cache bytes {bytes_early} vs {bytes_late}; RSS {rss_delta_mb:+.1f} MB"
    )
    print(f"         {checks}")

    write_results(
        result_name("endless_stream", args.threads),
        {
            "model_config": BENCH_TRANSFORMER_CONFIG,
            "latent_shape_per_frame": [16, 16, 16],
            "text_tokens": text.shape[1],
            "sampler_steps": len(windowed.timesteps),
            "reference": f"chunk {REFERENCE_CHUNK} regenerated from the windowed cache state after chunk "
            f"{REFERENCE_CHUNK - 1}, timed next to every chunk",
            "windowed": {
                "window_frames": WINDOW_FRAMES,
                "sink_frames": SINK_FRAMES,
                "rope": ROPE,
                "chunks": WINDOWED_CHUNKS,
                "latency": latency,
                "replay": {
                    "early_chunk": PROBE_EARLY,
                    "late_chunk": PROBE_LATE,
                    "repeats": REPLAY_REPEATS,
                    "early": summarize(replay["early"]),
                    "late": summarize(replay["late"]),
                    "ratio": replay_ratio,
                },
                "cache_nbytes_chunk_10": bytes_early,
                "cache_nbytes_chunk_100": bytes_late,
                "rss_mb_chunk_10": rss_early / MB,
                "rss_mb_chunk_100": rss_late / MB,
                "rss_delta_mb": rss_delta_mb,
                "trace": trace,
            },
            "global": {
                "rope": "absolute",
                "chunks": GLOBAL_CHUNKS,
                "latency": global_latency,
                "replay": {
                    "early_chunk": PROBE_EARLY,
                    "late_chunk": GLOBAL_PROBE_LATE,
                    "repeats": REPLAY_REPEATS,
                    "early": summarize(global_replay["early"]),
                    "late": summarize(global_replay["late"]),
                    "ratio": global_replay_ratio,
                },
                "cache_nbytes_chunk_10": global_bytes[PROBE_EARLY],
                "cache_nbytes_chunk_30": global_bytes[GLOBAL_PROBE_LATE],
                "trace": global_trace,
            },
            "targets": {"latency_ratio_max": LATENCY_TARGET, **checks},
        },
        started,
    )


if __name__ == "__main__":
    main()
