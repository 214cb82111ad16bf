"""The physical limit: how close streaming runs to this machine's dense float32 throughput.

For two geometries the script counts the floating-point operations of the streaming transformer passes, divides them
by the measured time, and sets that rate against plain kernels measured in the same run, interleaved with the
streaming timing (as ``common.interleaved``: A, B, B, A, …; medians of the per-repeat ratios). Every call is timed on
two clocks: wall-clock seconds and the process's CPU seconds (``time.process_time``). With one torch thread the work
runs on the calling thread, so the CPU time leaves out the time the shared machine gave to other processes; the two
agree on a quiet machine, and when they differ the CPU-time rates are the machine's.

- ``matmul_2048``: ``2048 × 2048 @ 2048 × 2048`` matmuls (the machine's dense rate), several per repeat
  (``--default-matmul-calls``, ``--wan-matmul-calls``) so that each sample spans a time like the stream's;
- ``model_matmuls``: every matmul and convolution the streaming passes run, replayed as bare aten calls on random
  tensors of the same sizes and strides (recorded from one untimed pass): the rate the model's own projection shapes
  allow;
- ``sdpa``: every attention call the streaming passes run (self-attention of the chunk against its visible keys,
  cross-attention to the text), replayed as ``torch.nn.functional.scaled_dot_product_attention`` on contiguous
  ``[batch, heads, L, head_dim]`` tensors of the same shapes.

Geometries:

1. ``default``: the bundled ShapesWorld model (4 heads × 48, 6 layers, FFN 768; 64 × 64 pixels → 8 × 8 latents →
   16 tokens per latent frame, 48 per chunk; 18 text tokens), streaming 21 latent frames (7 chunks) with the
   pipeline's loop: ``ChunkSampler.chunks`` driving a ``CacheDenoiser`` through a global ``KVCache`` (4 sampler steps
   per chunk, then the context pass; none after the last chunk), without VAE decoding. Every transformer pass is
   timed; the rate is the FLOPs of all 34 passes over their summed seconds, also given per chunk.
2. ``wan``: Wan-1.3B token geometry: 60 × 104 latents, patch (1, 2, 2) → 1,560 tokens per latent frame, chunks of 3
   latent frames (4,680 query tokens), 12 heads × 128 (model dim 1,536), FFN 8,960, 512 text tokens of 4,096 dims —
   each layer is exactly a Wan-1.3B layer, but the model has 1 layer (``--wan-layers``) with random weights so that a
   pass takes about 20 s on one thread. Timed: one sampler-step pass of chunk 7 (index 6, frames 18–20) against a
   global cache holding frames 0–17 (random keys and values written chunk by chunk: FLOPs and memory traffic do not
   depend on the values), so ``L_k = 21 × 1,560 = 32,760``. The text keys and values are in the cache (written by an
   untimed pass), as for every pass of a stream after its first.

FLOPs are counted analytically (one multiply-add = 2 FLOPs; element-wise work — norms, RoPE, GELU, modulation,
softmax — not counted), for a pass of ``L_q`` query tokens (``q`` latent frames), ``L_k`` visible key tokens (the
cached frames plus the chunk), model dim ``d = heads · head_dim``, FFN width ``F``, ``T`` text tokens:

- per layer: self-attention projections ``Q, K, V, out`` ``4 · 2 L_q d²``; attention ``QKᵀ`` ``2 L_q L_k d_h`` and
  ``PV`` ``2 L_q L_k d_h`` per head, ``4 L_q L_k d`` over the heads; cross-attention query and output projections
  ``2 · 2 L_q d²`` and attention to the text ``4 L_q T d``; the text key/value projections ``2 · 2 T d²`` only in a
  stream's first pass (later passes read them from the cache); FFN ``2 · 2 L_q d F``;
- per pass: patch embedding ``2 L_q (C_in p_t p_h p_w) d``, output projection ``2 L_q d (C_out p_t p_h p_w)``; the
  time embedding ``q (2 f d + 2 d² + 2 · 6 d²)`` (``f`` = ``freq_dim``) and, in the stream's first pass, the text
  embedding ``2 T (text_dim · d + d²)``. These small layers are counted where they actually run: forward hooks count
  the rows through them (the text work is skipped once the cache holds the prompt, and the time embedding may be
  memoised by timestep). A context pass that only writes the cache (the model returns no output: its last block
  stops after the ``Q, K, V`` projections, no output head) is counted as such.

The rate counts the FLOPs that run. When a code change removes work (a cache-only context pass), the stream gets
faster while its rate need not rise, so the default geometry also gives an *equivalent* rate: the FLOPs of the same
stream with every pass complete, over the measured time.

The count is cross-checked against ``torch.utils.flop_counter.FlopCounterMode`` (whose table lacks the CPU flash
attention kernel ``aten._scaled_dot_product_flash_attention_for_cpu``; it is given torch's own formula for
``aten._scaled_dot_product_flash_attention``): the whole default stream and one Wan pass. A profiled pass
(``torch.profiler``) splits the time into attention kernels, matmuls and the rest.

``--compiled`` also times a copy of each transformer after ``transformer.compile_repeated_blocks()`` (diffusers'
``ModelMixin`` API), interleaved with the eager one; if compiling fails, the script says so and measures eager only.

    python benchmarks/bench_flop_rate.py --compiled --output-name flop_rate_baseline   # the baseline (on b41943c)
    python benchmarks/bench_flop_rate.py --compiled                                    # eager and compiled
    python benchmarks/bench_flop_rate.py --geometries default                          # the default model only
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    RESULTS_DIR,
    argument_parser,
    header,
    load_average,
    median,
    print_table,
    result_name,
    setup,
    summarize,
    write_results,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from diffusers_raven import CausalWanTransformer3DModel, KVCache
from diffusers_raven.pipelines.chunk_sampler import CacheDenoiser, ChunkSampler
from diffusers_raven.pipelines.presets import load_pipeline

aten = torch.ops.aten

#: The issue's aim at Wan geometry: streaming at ≥ 80 % of the plain 2048³ matmul rate.
WAN_AIM_FRACTION = 0.8
#: The issue's aim for the default model: its fraction of the matmul rate doubled from the eager baseline.
DEFAULT_AIM_FACTOR = 2.0
BASELINE_NAME = "flop_rate_baseline"

WAN_GEOMETRY = dict(
    latent_height=60, latent_width=104, chunk_frames=3, latent_frames=21, text_tokens=512, text_dim=4096
)
WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=1,
    rope_max_seq_len=1024,
    num_frames_per_chunk=3,
)

MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default}
SDPA_OPS = {aten._scaled_dot_product_flash_attention_for_cpu.default}
PROFILE_MATMUL = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution", "aten::_slow_conv3d_forward",
    "aten::slow_conv3d_forward", "aten::_nnpack_spatial_convolution",
}


# ---------------------------------------------------------------------------------------------------- FLOPs
def pass_flops(
    config, tokens_per_frame: int, q_frames: int, k_frames: int, text_tokens: int, rows: dict, cache_only: bool = False
) -> dict:
    """Analytic FLOPs of one pass (see the module docstring), by component.

    ``rows``: the rows that went through the small per-pass layers in this pass, counted by :class:`RowCounter` (what
    actually runs: the text embedding and text key/value projections run in a stream's first pass only, and the time
    embedding may be memoised by timestep). ``cache_only``: a context pass that only writes the cache (the model
    returned no output): its last block stops after the ``Q, K, V`` projections and there is no output head."""
    d = config.num_attention_heads * config.attention_head_dim
    layers, ffn = config.num_layers, config.ffn_dim
    full = layers - 1 if cache_only else layers  # layers that run to the end
    patch = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    lq, lk, t = q_frames * tokens_per_frame, k_frames * tokens_per_frame, text_tokens
    flops = {
        "self_attn_projections": (full * 4 + (layers - full) * 3) * 2 * lq * d * d,
        "self_attention": full * 4 * lq * lk * d,
        "cross_attn_projections": full * 2 * 2 * lq * d * d,
        "cross_attention": full * 4 * lq * t * d,
        "text_kv_projections": 2 * 2 * rows["text_kv"] * d * d,
        "ffn": full * 2 * 2 * lq * d * ffn,
        "patch_embedding": 2 * lq * config.in_channels * patch * d,
        "output_projection": 0 if cache_only else 2 * lq * d * config.out_channels * patch,
        "time_embedding": 2 * rows["time_embedder"] * (config.freq_dim * d + d * d) + 2 * rows["time_proj"] * 6 * d * d,
        "text_embedding": 2 * rows["text_embedder"] * (config.text_dim * d + d * d),
    }
    flops["attention"] = flops["self_attention"] + flops["cross_attention"]
    flops["matmuls"] = sum(v for k, v in flops.items() if k not in ("self_attention", "cross_attention", "attention"))
    flops["total"] = flops["attention"] + flops["matmuls"]
    return flops


class RowCounter:
    """Counts the rows (tokens, frames) that go through the model's small per-pass layers: the time embedder
    (``freq_dim → d → d``), the time projection (``d → 6d``), the text embedder (``text_dim → d → d``) and the text
    key projections of the cross-attention (summed over the layers; the value projections run with them)."""

    def __init__(self, model) -> None:
        embedder = model.condition_embedder
        modules = {
            "time_embedder": embedder.time_embedder,
            "time_proj": embedder.time_proj,
            "text_embedder": embedder.text_embedder,
            **{f"text_kv.{i}": block.attn2.to_k for i, block in enumerate(model.blocks)},
        }
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            self.counts[name] += x.numel() // x.shape[-1]
        return hook

    def take(self) -> dict:
        """The rows since the last call."""
        counts = dict(self.counts)
        self.counts = dict.fromkeys(self.counts, 0)
        return {
            "time_embedder": counts["time_embedder"],
            "time_proj": counts["time_proj"],
            "text_embedder": counts["text_embedder"],
            "text_kv": sum(v for k, v in counts.items() if k.startswith("text_kv.")),
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def add_flops(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b[k] for k in b}


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the CPU flash attention kernel, with torch's formula for flash attention."""
    registered = flop_registry[aten._scaled_dot_product_flash_attention]  # already takes tensors (shape-wrapped)

    def flash_cpu(*args, **kwargs):
        return registered(*args, **kwargs)

    flash_cpu._get_raw = True  # tell FlopCounterMode not to wrap it a second time
    return FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: flash_cpu})


# ---------------------------------------------------------------------------------------------------- kernel replay
def _spec(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_spec(v) for v in value)
    return value


class KernelRecorder(TorchDispatchMode):
    """Records the matmuls/convolutions (op, argument sizes and strides) and attention calls (q, k, v sizes) that
    run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls: list = []
        self.attention: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMUL_OPS:
            self.matmuls.append((func, _spec(args), _spec(kwargs)))
        elif func in SDPA_OPS:
            self.attention.append(tuple((tuple(t.shape), tuple(t.stride())) for t in args[:3]))
        return func(*args, **kwargs)


class Replay:
    """Replays recorded kernels on random tensors (allocated once, shared by equal specs)."""

    def __init__(self, recorder: KernelRecorder) -> None:
        generator = torch.Generator().manual_seed(0)
        tensors: dict = {}

        def build(spec):
            if isinstance(spec, tuple) and spec and spec[0] == "tensor":
                if spec not in tensors:
                    _, size, stride, dtype = spec
                    tensor = torch.empty_strided(size, stride, dtype=dtype)
                    tensor.normal_(generator=generator)
                    tensors[spec] = tensor
                return tensors[spec]
            if isinstance(spec, (list, tuple)):
                return type(spec)(build(s) for s in spec)
            return spec

        self.matmul_calls = [(func, build(args), {k: build(v) for k, v in kwargs.items()})
                             for func, args, kwargs in recorder.matmuls]
        qkv: dict = {}
        self.attention_calls, self.attention_calls_model_layout = [], []
        for specs in recorder.attention:
            shapes = tuple(shape for shape, _ in specs)
            if shapes not in qkv:
                qkv[shapes] = tuple(torch.randn(shape, generator=generator) for shape in shapes)
            self.attention_calls.append(qkv[shapes])
            self.attention_calls_model_layout.append(
                tuple(build(("tensor", shape, stride, torch.float32)) for shape, stride in specs)
            )

    def matmuls(self) -> None:
        for func, args, kwargs in self.matmul_calls:
            func(*args, **kwargs)

    def sdpa(self) -> None:
        for q, k, v in self.attention_calls:
            F.scaled_dot_product_attention(q, k, v)

    def sdpa_model_layout(self) -> None:
        """The same attention calls on tensors with the strides the model passes (``[B, L, heads, d]`` memory seen
        as ``[B, heads, L, d]``)."""
        for q, k, v in self.attention_calls_model_layout:
            F.scaled_dot_product_attention(q, k, v)

    def counted_flops(self) -> dict:
        with flop_counter() as counter:
            self.matmuls()
        matmul = counter.get_total_flops()
        with flop_counter() as counter:
            self.sdpa()
        return {"matmuls": matmul, "attention": counter.get_total_flops()}


def profile_split(fn: Callable[[], Any]) -> dict:
    """Seconds of one call of ``fn`` under ``torch.profiler``, split into attention kernels (self time of the
    ``scaled_dot_product`` ops), matmul/convolution kernels and the rest (other ops, Python, dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    attention = matmul = 0.0
    for event in prof.key_averages():
        if "scaled_dot_product" in event.key or "flash_attention" in event.key:
            attention += event.self_cpu_time_total / 1e6
        elif event.key in PROFILE_MATMUL:
            matmul += event.self_cpu_time_total / 1e6
    rest = wall - attention - matmul
    return {
        "wall_s": wall,
        "attention_s": attention,
        "matmul_s": matmul,
        "rest_s": rest,
        "attention_share": attention / wall,
        "matmul_share": matmul / wall,
        "rest_share": rest / wall,
        "note": "profiled pass (profiler overhead inflates the rest, most for many small ops)",
    }


# ---------------------------------------------------------------------------------------------------- compile
def compiled_copy(transformer) -> tuple[Any, str | None]:
    """A copy of ``transformer`` after ``compile_repeated_blocks()``, or ``(None, reason)`` if that fails."""
    try:
        twin = copy.deepcopy(transformer)
        twin.route_blocks()
        twin.install_causal_processors()
        twin.compile_repeated_blocks()
    except Exception as error:  # noqa: BLE001 - any failure is reported, the eager run continues
        return None, f"transformer.compile_repeated_blocks() failed: {type(error).__name__}: {error}"
    return twin, None


def dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {
        "stats": {k: int(v) for k, v in counters["stats"].items()},
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompile_limit_hits": int(sum(v for k, v in counters["frames"].items() if "limit" in k)),
    }


def try_compiled(label: str, warm: Callable[[Any], Any], transformer) -> tuple[Any, dict]:
    """Compile a copy and run ``warm(copy)`` (the compile happens there); on failure a clear message and None."""
    import torch._dynamo

    torch._dynamo.reset()
    twin, error = compiled_copy(transformer)
    info: dict = {"requested": True}
    if twin is not None:
        start = time.perf_counter()
        try:
            warm(twin)
        except Exception as failure:  # noqa: BLE001
            twin, error = None, f"the compiled transformer failed in its first passes: {type(failure).__name__}: " \
                                f"{str(failure)[:2000]}"
        info["compile_and_warmup_s"] = time.perf_counter() - start
    if twin is None:
        print(f"   [{label}] --compiled: {error}\n   [{label}] measuring the eager path only.", flush=True)
        info.update(ok=False, error=error)
    else:
        info.update(ok=True, dynamo=dynamo_stats())
    return twin, info


# ---------------------------------------------------------------------------------------------------- timing
CLOCKS = ("wall_clock", "cpu_time")


def interleaved_clocks(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """``common.interleaved`` (order reversed on odd repeats) with two clocks per call: wall-clock seconds
    (``time.perf_counter``) and this process's CPU seconds (``time.process_time``). With one torch thread all the work
    runs on the calling thread, so the CPU time leaves out the time the shared machine's scheduler gave to other
    processes. Returns ``{clock: {name: [seconds per repeat]}}``."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            times["cpu_time"][name].append(time.process_time() - cpu)
            times["wall_clock"][name].append(time.perf_counter() - wall)
        line = ", ".join(
            f"{name} {times['wall_clock'][name][-1]:.3f}s ({times['cpu_time'][name][-1]:.3f}s cpu)" for name in names
        )
        print(f"  repeat {r + 1}/{repeats}: {line}", flush=True)
    return times


# ---------------------------------------------------------------------------------------------------- summary
def rates(flops: dict[str, float], times: dict[str, list[float]]) -> dict:
    """GFLOP/s of every variant (median time) and the fractions of streaming against the plain kernels (median of
    the per-repeat ratios of rates)."""
    gflops = {name: flops[name] / median(times[name]) / 1e9 for name in times}
    fractions = {}
    streams = [name for name in times if name.startswith("stream")]
    for stream in streams:
        for ref in ("matmul_2048", "model_matmuls", "sdpa", "sdpa_model_layout"):
            per_repeat = [(flops[stream] / a) / (flops[ref] / b) for a, b in zip(times[stream], times[ref])]
            fractions[f"{stream}/{ref}"] = median(per_repeat)
        # The time the plain kernels need for this work, against the streaming time (the rest is overhead).
        kernel = [(m + s) / t for t, m, s in zip(times[stream], times["model_matmuls"], times["sdpa"])]
        fractions[f"{stream}/kernels"] = median(kernel)
    return {"gflops": gflops, "fractions": fractions}


def report(label: str, by_clock: dict) -> None:
    rows = []
    for clock, result in by_clock.items():
        g, f = result["gflops"], result["fractions"]
        for stream in [name for name in g if name.startswith("stream")]:
            rows.append([
                f"{label} {stream} ({clock})", g[stream], g["matmul_2048"], g["model_matmuls"], g["sdpa"], g["sdpa_model_layout"],
                f"{f[f'{stream}/matmul_2048']:.1%}", f"{f[f'{stream}/sdpa']:.1%}", f"{f[f'{stream}/kernels']:.1%}",
            ])
    print_table(
        ["geometry", "stream GFLOP/s", "matmul 2048³", "model matmuls", "SDPA", "SDPA model layout", "stream/matmul",
         "stream/SDPA",
         "kernel time/stream"],
        rows,
    )


# ---------------------------------------------------------------------------------------------------- default model
class TimedDenoiser:
    """Wraps the pipeline's denoiser and records every transformer pass: frame offset, frames, cache write, seconds."""

    def __init__(self, inner: CacheDenoiser, rows: RowCounter | None = None) -> None:
        self.inner = inner
        self.kv_cache = inner.kv_cache
        self.rows = rows
        self.passes: list[dict] = []

    def __call__(self, latents, timestep, frame_offset, update_cache=False):
        start, cpu = time.perf_counter(), time.process_time()
        velocity = self.inner(latents, timestep, frame_offset, update_cache)
        cpu_seconds = time.process_time() - cpu
        seconds = time.perf_counter() - start
        record = {
            "frame_offset": frame_offset, "frames": latents.shape[2], "update_cache": update_cache, "s": seconds,
            "cpu_s": cpu_seconds, "cache_only": velocity is None,
        }
        if self.rows is not None:
            record["rows"] = self.rows.take()
        self.passes.append(record)
        return velocity


def default_geometry(args, compiled: bool) -> dict:
    pipe, description = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.eval()
    config = transformer.config
    pipe.scheduler.set_timesteps(None)
    embeds, _ = pipe.encode_prompt("a red circle moving slowly right and a blue square moving quickly up on a black "
                                   "background")
    latent_h = pipe.default_height // pipe.vae_scale_factor_spatial
    latent_w = pipe.default_width // pipe.vae_scale_factor_spatial
    tpf = (latent_h // config.patch_size[1]) * (latent_w // config.patch_size[2])
    chunk = transformer.chunk_frames
    num_frames = args.default_frames
    text_tokens = embeds.shape[1]

    def stream(model, rows: RowCounter | None = None) -> list[dict]:
        cache = KVCache.for_model(model, 1)
        denoiser = TimedDenoiser(CacheDenoiser(model, cache, embeds), rows)
        sampler = ChunkSampler(pipe.scheduler, 0.0)
        shape = (1, config.in_channels, latent_h, latent_w)
        for _ in sampler.chunks(denoiser, shape, chunk, num_frames, torch.Generator().manual_seed(0)):
            pass
        return denoiser.passes

    # Untimed: a warm-up stream, then one under FlopCounterMode + the kernel recorder (whose per-pass rows of the
    # small layers the analytic count uses: later streams behave as this second one), then a profiled one.
    stream(transformer)
    recorder = KernelRecorder()
    rows = RowCounter(transformer)
    with flop_counter() as counter, recorder:
        passes = stream(transformer, rows)
    rows.remove()
    counted = counter.get_total_flops()
    per_pass = [
        pass_flops(config, tpf, p["frames"], p["frame_offset"] + p["frames"], text_tokens, p["rows"], p["cache_only"])
        for p in passes
    ]
    total = {}
    for f in per_pass:
        total = add_flops(total, f)
    complete = sum(  # the same stream with every pass complete (no cache-only context pass)
        pass_flops(config, tpf, p["frames"], p["frame_offset"] + p["frames"], text_tokens, p["rows"])["total"]
        for p in passes
    )
    split = profile_split(lambda: stream(transformer))
    replay = Replay(recorder)
    replay_flops = replay.counted_flops()

    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    flops = {
        "stream": total["total"],
        "matmul_2048": args.default_matmul_calls * 2 * 2048**3,
        "model_matmuls": replay_flops["matmuls"],
        "sdpa": replay_flops["attention"],
        "sdpa_model_layout": replay_flops["attention"],
    }
    per_pass_times: dict[str, list[list[dict]]] = {"stream": []}

    def timed_stream(model, key):
        def run():
            per_pass_times[key].append(stream(model))
        return run

    def matmuls_2048():
        for _ in range(args.default_matmul_calls):
            torch.mm(a, b)

    variants = {"stream": timed_stream(transformer, "stream")}
    compile_info = None
    if compiled:
        twin, compile_info = try_compiled("default", lambda m: (stream(m), stream(m)), transformer)
        if twin is not None:
            per_pass_times["stream_compiled"] = []
            flops["stream_compiled"] = total["total"]
            variants["stream_compiled"] = timed_stream(twin, "stream_compiled")
    variants.update(
        matmul_2048=matmuls_2048, model_matmuls=replay.matmuls, sdpa=replay.sdpa,
        sdpa_model_layout=replay.sdpa_model_layout,
    )
    print(f"-- default model: {len(passes)} passes of a {num_frames}-latent-frame stream, {args.default_repeats} repeats",
          flush=True)
    raw = interleaved_clocks(variants, args.default_repeats, warmup=1)
    # The stream variants' time is the sum of their transformer passes (the sampler's arithmetic left out).
    times = {clock: {name: list(ts) for name, ts in raw[clock].items()} for clock in CLOCKS}
    for key, runs in per_pass_times.items():
        runs = runs[1:]  # the warm-up call
        per_pass_times[key] = runs
        times["wall_clock"][key] = [sum(p["s"] for p in r) for r in runs]
        times["cpu_time"][key] = [sum(p["cpu_s"] for p in r) for r in runs]
    result = {clock: rates(flops, times[clock]) for clock in CLOCKS}
    for clock in CLOCKS:
        mm = result[clock]["gflops"]["matmul_2048"]
        result[clock]["equivalent_gflops"] = {
            name: complete / median(times[clock][name]) / 1e9 for name in times[clock] if name.startswith("stream")
        }
        result[clock]["equivalent_fraction_of_matmul_2048"] = {
            name: rate / mm for name, rate in result[clock]["equivalent_gflops"].items()
        }

    # Per chunk: FLOPs of its passes over the median of their summed seconds, against the median matmul rate.
    chunk_rows = []
    for key, runs in per_pass_times.items():
        for index in range(-(-num_frames // chunk)):
            members = [i for i, p in enumerate(passes) if p["frame_offset"] == index * chunk]
            chunk_flops = sum(per_pass[i]["total"] for i in members)
            row = {
                "variant": key,
                "chunk_index": index,
                "passes": len(members),
                "query_tokens": chunk * tpf,
                "visible_key_tokens": (index + 1) * chunk * tpf,
                "flops": chunk_flops,
                "attention_flop_share": sum(per_pass[i]["attention"] for i in members) / chunk_flops,
            }
            for clock, field in (("wall_clock", "s"), ("cpu_time", "cpu_s")):
                seconds = median([sum(r[i][field] for i in members) for r in runs])
                rate = chunk_flops / seconds / 1e9
                row[clock] = {
                    "median_s": seconds,
                    "gflops": rate,
                    "fraction_of_matmul_2048": rate / result[clock]["gflops"]["matmul_2048"],
                    "fraction_of_sdpa": rate / result[clock]["gflops"]["sdpa"],
                }
            chunk_rows.append(row)
    print()
    report("default", result)
    print()
    print_table(
        ["variant", "chunk", "passes", "L_k", "MFLOP", "s", "GFLOP/s", "of matmul", "cpu s", "cpu GFLOP/s",
         "of matmul (cpu)"],
        [[r["variant"], r["chunk_index"], r["passes"], r["visible_key_tokens"], r["flops"] / 1e6,
          r["wall_clock"]["median_s"], r["wall_clock"]["gflops"], f"{r['wall_clock']['fraction_of_matmul_2048']:.1%}",
          r["cpu_time"]["median_s"], r["cpu_time"]["gflops"], f"{r['cpu_time']['fraction_of_matmul_2048']:.1%}"]
         for r in chunk_rows],
    )
    late = [r for r in chunk_rows if r["chunk_index"] == args.late_chunk]
    return {
        "model": description,
        "model_config": dict(config),
        "geometry": {
            "latent_height": latent_h, "latent_width": latent_w, "tokens_per_frame": tpf, "chunk_frames": chunk,
            "query_tokens_per_pass": chunk * tpf, "latent_frames": num_frames, "text_tokens": text_tokens,
            "sampler_steps": len(pipe.scheduler.timesteps), "guidance": "none (guidance_scale 1, one branch)",
        },
        "timed": f"every transformer pass of a {num_frames}-latent-frame stream ({len(passes)} passes) through "
                 "ChunkSampler + CacheDenoiser + a global KVCache, summed; no VAE decoding",
        "repeats": args.default_repeats,
        "flops": {
            "stream_total": total, "per_pass": [f["total"] for f in per_pass],
            "cache_only_context_passes": sum(p["cache_only"] for p in passes),
            "stream_total_every_pass_complete": complete,
        },
        "flop_counter_check": {
            "analytic": total["total"], "flop_counter": counted, "relative_difference": counted / total["total"] - 1,
            "scope": "the whole (second) stream: all passes, the first one with the text projections",
        },
        "replay_flops": replay_flops,
        "kernel_calls": {"matmuls": len(replay.matmul_calls), "attention": len(replay.attention_calls)},
        "variant_flops": flops,
        "matmul_2048_calls_per_repeat": args.default_matmul_calls,
        "times": {clock: {name: summarize(ts) for name, ts in times[clock].items()} for clock in CLOCKS},
        "rates": result,
        "per_chunk": chunk_rows,
        "late_chunk": late,
        "profile_split": split,
        "compiled": compile_info,
    }


# ---------------------------------------------------------------------------------------------------- Wan geometry
def wan_geometry(args, compiled: bool) -> dict:
    config_kwargs = dict(WAN_CONFIG, num_attention_heads=args.wan_heads, num_layers=args.wan_layers,
                         ffn_dim=args.wan_ffn)
    torch.manual_seed(0)
    transformer = CausalWanTransformer3DModel(**config_kwargs).eval()
    config = transformer.config
    g = WAN_GEOMETRY
    h, w, chunk = g["latent_height"], g["latent_width"], g["chunk_frames"]
    tpf = (h // 2) * (w // 2)
    start = args.late_chunk * chunk
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(1, g["text_tokens"], g["text_dim"], generator=generator)
    x = torch.randn(1, config.in_channels, chunk, h, w, generator=generator)
    timestep = torch.full((1,), 1000.0 * 0.9375)

    cache = KVCache.for_model(transformer, 1)
    for frame in range(0, start, chunk):  # the history: random keys/values, written chunk by chunk
        cache.write(frame, {
            layer: (torch.randn(1, chunk, tpf, heads, head_dim, generator=generator),
                    torch.randn(1, chunk, tpf, heads, head_dim, generator=generator))
            for layer in range(config.num_layers)
        })
    # The stream's first pass projects the text into the cache; a pass on 2 × 2 latents at frame 0 (no history, no
    # cache write) does that for the price of the text projections.
    transformer(torch.randn(1, config.in_channels, chunk, 2, 2), timestep, text, kv_cache=cache, frame_offset=0)
    assert cache.has_text((text.data_ptr(), tuple(text.shape), text.dtype, str(text.device), text._version))

    def one_pass(model):
        return lambda: model(x, timestep, text, kv_cache=cache, frame_offset=start)

    print(f"-- Wan geometry: {heads} heads x {head_dim}, {config.num_layers} layer(s), FFN {config.ffn_dim}; chunk "
          f"index {args.late_chunk}: L_q {chunk * tpf}, L_k {(start + chunk) * tpf}", flush=True)
    # The first pass of the timed kind runs under FlopCounterMode, the kernel recorder and the row counter (the
    # analytic count takes the rows of the small layers from it; the timed passes repeat it).
    recorder = KernelRecorder()
    rows = RowCounter(transformer)
    t0 = time.perf_counter()
    with flop_counter() as counter, recorder:
        one_pass(transformer)()
    counted = counter.get_total_flops()
    analytic = pass_flops(config, tpf, chunk, start + chunk, g["text_tokens"], rows.take())
    rows.remove()
    print(f"   counted pass: {time.perf_counter() - t0:.1f} s; {analytic['total'] / 1e9:.0f} GFLOP per pass "
          f"({analytic['attention'] / analytic['total']:.0%} attention)", flush=True)
    split = profile_split(one_pass(transformer))
    print(f"   profiled pass: {split['wall_s']:.1f} s (attention {split['attention_share']:.0%}, matmuls "
          f"{split['matmul_share']:.0%})", flush=True)
    replay = Replay(recorder)
    replay_flops = replay.counted_flops()

    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    flops = {
        "stream": analytic["total"],
        "matmul_2048": args.wan_matmul_calls * 2 * 2048**3,
        "model_matmuls": replay_flops["matmuls"],
        "sdpa": replay_flops["attention"],
        "sdpa_model_layout": replay_flops["attention"],
    }
    variants = {"stream": one_pass(transformer)}
    compile_info = None
    if compiled:
        twin, compile_info = try_compiled("wan", lambda m: one_pass(m)(), transformer)
        if twin is not None:
            flops["stream_compiled"] = analytic["total"]
            variants["stream_compiled"] = one_pass(twin)
    def matmuls_2048():
        for _ in range(args.wan_matmul_calls):
            torch.mm(a, b)

    variants.update(
        matmul_2048=matmuls_2048, model_matmuls=replay.matmuls, sdpa=replay.sdpa,
        sdpa_model_layout=replay.sdpa_model_layout,
    )
    # The counted and profiled passes were the stream's warm-up; the kernels get one untimed call (the SDPA replay
    # allocates its tensors once, in Replay).
    torch.mm(a, b)
    replay.matmuls()
    times = interleaved_clocks(variants, args.wan_repeats, warmup=0)
    result = {clock: rates(flops, times[clock]) for clock in CLOCKS}
    print()
    report("wan", result)
    aim = {"fraction_of_matmul_2048": WAN_AIM_FRACTION}
    for clock in CLOCKS:
        fraction = result[clock]["fractions"]["stream/matmul_2048"]
        aim[clock] = {"measured": fraction, "met": fraction >= WAN_AIM_FRACTION}
        if "stream_compiled/matmul_2048" in result[clock]["fractions"]:
            compiled_fraction = result[clock]["fractions"]["stream_compiled/matmul_2048"]
            aim[clock].update(measured_compiled=compiled_fraction, met_compiled=compiled_fraction >= WAN_AIM_FRACTION)
    sdpa_vs_matmul = {clock: result[clock]["gflops"]["sdpa"] / result[clock]["gflops"]["matmul_2048"] for clock in CLOCKS}
    return {
        "model_config": dict(config),
        "geometry": {
            **g, "tokens_per_frame": tpf, "timed_chunk_index": args.late_chunk, "frame_offset": start,
            "query_tokens": chunk * tpf, "visible_key_tokens": (start + chunk) * tpf, "cached_frames": start,
            "heads": heads, "head_dim": head_dim, "model_dim": heads * head_dim, "layers": config.num_layers,
        },
        "timed": "one sampler-step pass of the chunk against the cache (text keys/values cached), per repeat",
        "repeats": args.wan_repeats,
        "flops": {"pass": analytic},
        "flop_counter_check": {
            "analytic": analytic["total"], "flop_counter": counted, "relative_difference": counted / analytic["total"] - 1,
            "scope": "the first pass of the timed kind (the timed passes repeat it)",
        },
        "replay_flops": replay_flops,
        "variant_flops": flops,
        "matmul_2048_calls_per_repeat": args.wan_matmul_calls,
        "times": {clock: {name: summarize(ts) for name, ts in times[clock].items()} for clock in CLOCKS},
        "rates": result,
        "sdpa_vs_matmul_2048": sdpa_vs_matmul,
        "profile_split": split,
        "aim": aim,
        "compiled": compile_info,
    }


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--compiled", action="store_true",
                        help="also time a copy of each transformer after transformer.compile_repeated_blocks()")
    parser.add_argument("--output-name", default="flop_rate", help="results/<name>.json (default flop_rate)")
    parser.add_argument("--geometries", default="default,wan", help="comma-separated: default, wan")
    parser.add_argument("--default-frames", type=int, default=21, help="latent frames of the default-model stream")
    parser.add_argument("--default-repeats", type=int, default=7)
    parser.add_argument("--late-chunk", type=int, default=6, help="chunk index reported as the late chunk (0-based)")
    parser.add_argument("--wan-heads", type=int, default=12)
    parser.add_argument("--wan-layers", type=int, default=1)
    parser.add_argument("--wan-ffn", type=int, default=8960)
    parser.add_argument("--wan-repeats", type=int, default=3)
    parser.add_argument("--default-matmul-calls", type=int, default=3,
                        help="2048³ matmuls per timed repeat at the default geometry (a span comparable to the stream's)")
    parser.add_argument("--wan-matmul-calls", type=int, default=10,
                        help="2048³ matmuls per timed repeat at Wan geometry")
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("the physical limit: FLOP rate of streaming vs plain matmul and SDPA")
    load_start = load_average()
    geometries = [g.strip() for g in args.geometries.split(",") if g.strip()]
    results: dict[str, Any] = {}
    if "default" in geometries:
        results["default"] = default_geometry(args, args.compiled)
    if "wan" in geometries:
        results["wan"] = wan_geometry(args, args.compiled)

    aims: dict[str, Any] = {}
    if "wan" in results:
        aims["wan_fraction_of_matmul"] = results["wan"]["aim"]
    baseline_path = RESULTS_DIR / f"{result_name(BASELINE_NAME, args.threads)}.json"
    name = result_name(args.output_name, args.threads)
    if "default" in results and baseline_path.exists() and name != result_name(BASELINE_NAME, args.threads):
        baseline = json.loads(baseline_path.read_text())
        base_rates = baseline.get("geometries", {}).get("default", {}).get("rates", {})
        doubled = {"target_factor": DEFAULT_AIM_FACTOR, "baseline_commit": baseline.get("code", {}).get("git_commit")}
        for clock in CLOCKS:
            base = base_rates.get(clock, {}).get("fractions", {}).get("stream/matmul_2048")
            if base:
                fractions = results["default"]["rates"][clock]["fractions"]
                best_name, best = max(
                    ((k, v) for k, v in fractions.items() if k.endswith("/matmul_2048")), key=lambda kv: kv[1]
                )
                doubled[clock] = {
                    "baseline_fraction": base, "best": best_name.split("/")[0], "measured": best,
                    "factor": best / base, "met": best / base >= DEFAULT_AIM_FACTOR,
                }
        aims["default_fraction_doubled"] = doubled
    for key, aim in aims.items():
        print(f"aim {key}: {aim}")
    script = Path(__file__).resolve()
    status = subprocess.run(["git", "status", "--porcelain", "--", script.name], cwd=script.parent,
                            capture_output=True, text=True).stdout.strip()
    write_results(
        name,
        {
            "script": {"sha256": hashlib.sha256(script.read_bytes()).hexdigest(), "modified_since_commit": bool(status)},
            "compiled_requested": args.compiled,
            "load_average_start": load_start,
            "geometries": results,
            "aims": aims,
        },
        started,
    )


if __name__ == "__main__":
    main()
