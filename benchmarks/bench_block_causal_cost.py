"""The cost of a block-causal full-sequence pass against the parent's bidirectional pass.

Same weights, same 21 latent frames (1344 tokens), same text:

- ``parent``: :class:`diffusers.WanTransformer3DModel` (bidirectional attention, the reference cost);
- ``causal_full``: :class:`~diffusers_raven.CausalWanTransformer3DModel` with ``attention="full"`` (same attention as
  the parent; isolates the overhead of per-frame timesteps and the causal processor);
- ``block_causal``: ``attention="block_causal"``, the training pass of a causal model (grouped attention: each chunk
  attends to its visible frames only);
- ``history``: the interleaved training-time-test pass, 21 noisy + 18 clean frames (2496 tokens) in one sequence;
- ``flex``: ``block_causal`` with ``set_attention_backend("flex")``, if it runs on CPU in reasonable time (without
  ``torch.compile``, flex attention on CPU may be very slow; then the script records that and skips it).

All variants are timed interleaved; the table shows the median time and the median per-repeat ratio to ``parent``.

    python benchmarks/bench_block_causal_cost.py
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
    setup,
    summarize,
    timed,
    write_results,
)
from configs import (
    BENCH_TRANSFORMER_CONFIG,
    CHUNK_FRAMES,
    SEED,
    TOKENS_PER_FRAME,
    bench_model,
    latent_noise,
    text_states,
)
from diffusers import WanTransformer3DModel

NUM_FRAMES = 21
REPEATS = 25
RATIO_TARGET = 1.5
TOLERANCE = 1e-4
# Flex attention is timed only if one eager call costs at most this many parent passes.
FLEX_BUDGET = 10.0


def main() -> None:
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("block-causal pass vs parent pass")
    model = bench_model()
    parent_config = {k: v for k, v in BENCH_TRANSFORMER_CONFIG.items() if k != "num_frames_per_chunk"}
    parent = WanTransformer3DModel(**parent_config).eval()
    parent.load_state_dict(model.state_dict())

    generator = torch.Generator().manual_seed(SEED)
    x = latent_noise(NUM_FRAMES, generator=generator)
    history_frames = NUM_FRAMES - CHUNK_FRAMES
    clean = latent_noise(history_frames, generator=generator)
    t = torch.tensor([500.0])
    text = text_states()

    # Same weights, same tokens: the causal model in full mode reproduces the parent.
    diff = float((parent(x, t, text).sample - model(x, t, text, attention="full").sample).abs().max())
    print(f"   max |parent - causal full| = {diff:.1e}")
    assert diff <= TOLERANCE, f"the causal model does not reproduce the parent ({diff:.2e})"

    variants = {
        "parent": lambda: parent(x, t, text),
        "causal_full": lambda: model(x, t, text, attention="full"),
        "block_causal": lambda: model(x, t, text, attention="block_causal"),
        "history": lambda: model(x, t, text, history=clean),
    }

    # Flex attention, on a twin model (same seed, same weights) that keeps the flex backend: one probe call (it
    # includes building the BlockMask) decides whether it is timed. `set_attention_backend` also makes its backend
    # the process-wide default, so the other two models are pinned to the native backend explicitly afterwards.
    flex: dict = {"ran": False}
    flex_model = bench_model()
    parent_once = min(timed(variants["parent"]) for _ in range(2))
    try:
        flex_model.set_attention_backend("flex")
        flex_out = flex_model(x, t, text, attention="block_causal").sample
        flex_once = timed(lambda: flex_model(x, t, text, attention="block_causal"))
    except Exception as err:  # record why the backend cannot run here
        flex["error"] = f"{type(err).__name__}: {err}"
        print(f"   flex backend failed: {flex['error']}")
    finally:
        for native in (model, parent):
            native.set_attention_backend("native")
    if "error" not in flex:
        native_out = model(x, t, text, attention="block_causal").sample
        flex.update(
            ran=True,
            probe_s=flex_once,
            probe_ratio_to_parent=flex_once / parent_once,
            max_abs_diff_to_native=float((flex_out - native_out).abs().max()),
        )
        print(f"   flex probe: {flex_once:.3f}s = {flex_once / parent_once:.1f}x parent ({parent_once:.3f}s)")
    flex["timed"] = flex["ran"] and flex["probe_ratio_to_parent"] <= FLEX_BUDGET
    if flex["timed"]:
        variants["flex"] = lambda: flex_model(x, t, text, attention="block_causal")
    elif flex["ran"]:
        flex["skipped"] = f"one eager call costs more than {FLEX_BUDGET:g} parent passes on CPU"
        print(f"   flex skipped: {flex['skipped']}")

    times = interleaved(variants, repeats=REPEATS, warmup=2, log=False)
    ratios = {name: ratio_summary(times[name], times["parent"]) for name in variants}
    tokens = {name: NUM_FRAMES * TOKENS_PER_FRAME for name in variants}
    tokens["history"] = (NUM_FRAMES + history_frames) * TOKENS_PER_FRAME

    print()
    print_table(
        ["variant", "tokens", "median s", "ratio to parent", "range"],
        [
            [
                name,
                tokens[name],
                median(times[name]),
                ratios[name]["median_ratio"],
                f"{ratios[name]['min_ratio']:.2f}-{ratios[name]['max_ratio']:.2f}",
            ]
            for name in variants
        ],
    )
    block_ratio = ratios["block_causal"]["median_ratio"]
    met = block_ratio <= RATIO_TARGET
    print(f"\ntarget: block_causal / parent <= {RATIO_TARGET} -> {block_ratio:.3f} ({'met' if met else 'MISSED'})")

    write_results(
        result_name("block_causal_cost", args.threads),
        {
            "model_config": BENCH_TRANSFORMER_CONFIG,
            "latent_frames": NUM_FRAMES,
            "history_frames": history_frames,
            "tokens_per_frame": TOKENS_PER_FRAME,
            "text_tokens": text.shape[1],
            "repeats": REPEATS,
            "max_abs_diff_parent_vs_causal_full": diff,
            "variants": {
                name: {"tokens": tokens[name], **summarize(times[name]), "ratio_to_parent": ratios[name]}
                for name in variants
            },
            "flex": flex,
            "target": {"block_causal_ratio_max": RATIO_TARGET, "measured": block_ratio, "met": met},
        },
        started,
    )


if __name__ == "__main__":
    main()
