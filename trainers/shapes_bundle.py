"""ShapesWorld model chain, last step: ship a trained pipeline as the package's bundled default model.

    python trainers/shapes_bundle.py --pipeline out/shapes/student
    python trainers/shapes_bundle.py --pipeline out/shapes/distill_raven --dtype float32
    python trainers/shapes_bundle.py --pipeline out/shapes/student --vae out/shapes_decoder/vae

Loads the ``CausalVideoPipeline`` folder given by ``--pipeline``, records the video size it was trained at
(``sample_height``/``sample_width`` in ``model_index.json``, the defaults of ``__call__``/``stream``), stores the
transformer in ``--dtype`` (float16 halves the package size; ``from_pretrained`` without ``dtype`` loads it back
as float32, so users compute in float32 with float16-rounded weights) and writes the folder to
``diffusers_raven/assets/shapesworld`` (``BUNDLED_MODEL_DIR``), replacing what was there, with a model card. It then
loads the bundled folder back with ``CausalVideoPipeline.from_pretrained`` and checks that a short video from it
matches the source pipeline's (same seed; the float16 rounding of the weights is the only difference).

``--vae`` ships another VAE with the pipeline: one whose decoder was fine-tuned on the pipeline VAE's frozen encoder
(``trainers/shapes_vae_decoder.yaml``). Its latent space must be the pipeline's: the same ``z_dim``, compression
factors, ``latents_mean``/``latents_std`` and encoder weights, or the bundling stops with an error naming ``--vae``.

Evaluate the result with ``diffusers-raven eval`` (the default model is the bundled one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

from diffusers_raven import CausalVideoPipeline
from diffusers_raven.pipelines.presets import BUNDLED_MODEL_DIR

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

CARD = """---
library_name: diffusers
tags: [diffusers-raven, text-to-video, causal-video, shapesworld]
---
# ShapesWorld causal video model (bundled with diffusers-raven)

A small causal text-to-video model trained on ShapesWorld, the procedural world of `diffusers_raven.shapes`, by the
recipes in `trainers/` of the diffusers-raven repository (`docs/experiments/shapesworld/shapes_model_chain.md`): a
word-level tokenizer and a frozen random UMT5 encoder, a Wan VAE, a bidirectional Wan teacher trained with flow
matching, and this causal student ({source_note}). It streams {height}x{width} video in chunks of {chunk} latent
frames with the 4-step consistency sampler and a KV cache.

```python
from diffusers_raven import CausalVideoPipeline
from diffusers_raven.pipelines.presets import BUNDLED_MODEL_DIR

pipe = CausalVideoPipeline.from_pretrained(BUNDLED_MODEL_DIR)
video = pipe("a red circle moving right on a black background", num_frames=21).frames[0]
```

Its ShapesWorld metrics, with the commands that measure them, are in
`docs/experiments/shapesworld/shapes_model_chain.md` of the repository.
Transformer weights stored in {dtype}; they load as float32.
"""


def same_latent_space_vae(current, path: str):
    """The VAE saved in ``path``, checked to encode into the latent space of ``current``."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(path)
    for key in ("z_dim", "scale_factor_spatial", "scale_factor_temporal", "patch_size", "latents_mean", "latents_std"):
        if vae.config[key] != current.config[key]:
            raise SystemExit(f"--vae {path!r}: {key} is {vae.config[key]}, the pipeline's VAE has "
                             f"{current.config[key]}; only a VAE with the same encoder and latent space can be shipped")
    mine, theirs = vae.state_dict(), current.state_dict()
    encoder = [k for k in theirs if k.startswith(("encoder.", "quant_conv."))]
    if any(k not in mine or not torch.equal(mine[k], theirs[k]) for k in encoder):
        raise SystemExit(f"--vae {path!r}: its encoder differs from the pipeline VAE's (train it with "
                         "train_encoder: false from that VAE)")
    return vae


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="CausalVideoPipeline folder to ship")
    parser.add_argument("--height", type=int, default=64, help="training video height (sample_height)")
    parser.add_argument("--width", type=int, default=64, help="training video width (sample_width)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage dtype of the transformer")
    parser.add_argument("--source-note", default="initialised from the teacher by ODE regression",
                        help="how the shipped transformer was made, for the model card")
    parser.add_argument("--vae", default=None,
                        help="AutoencoderKLWan folder to ship instead of the pipeline's (same encoder, new decoder)")
    parser.add_argument("--output", default=str(BUNDLED_MODEL_DIR), help="destination (default: the package assets)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.pipeline):
        raise SystemExit(f"--pipeline {args.pipeline!r} is not a folder")
    if args.vae is not None and not os.path.isfile(os.path.join(args.vae, "config.json")):
        raise SystemExit(f"--vae {args.vae!r} is not a saved AutoencoderKLWan folder")

    pipe = CausalVideoPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.vae is not None:
        pipe.vae = same_latent_space_vae(pipe.vae, args.vae)
    pipe.register_to_config(sample_height=args.height, sample_width=args.width)
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "shapesworld")
        original = pipe.transformer
        pipe.transformer = original.to(DTYPES[args.dtype])
        pipe.save_pretrained(staged)
        pipe.transformer = original.to(torch.float32)
        chunk = pipe.transformer.config.num_frames_per_chunk
        with open(os.path.join(staged, "README.md"), "w") as f:
            f.write(CARD.format(source_note=args.source_note, height=args.height, width=args.width, chunk=chunk,
                                dtype=args.dtype))
        if os.path.isdir(args.output):
            shutil.rmtree(args.output)
        shutil.copytree(staged, args.output)

    bundled = CausalVideoPipeline.from_pretrained(args.output)
    bundled.set_progress_bar_config(disable=True)
    prompt = "a red circle moving right on a black background"
    kwargs = dict(num_frames=21, output_type="np")
    with torch.no_grad():
        ref = pipe(prompt, generator=torch.Generator().manual_seed(0), height=args.height, width=args.width,
                   **kwargs).frames
        got = bundled(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(args.output) for name in names)
    result = {
        "source": args.pipeline,
        "vae": args.vae or os.path.join(args.pipeline, "vae"),
        "output": args.output,
        "dtype": args.dtype,
        "bytes": size,
        "transformer_dtype_after_load": str(next(bundled.transformer.parameters()).dtype),
        "default_size": [bundled.default_height, bundled.default_width],
        "max_abs_frame_diff_vs_source": float(abs(ref - got).max()),
        "command": " ".join(["python", "trainers/shapes_bundle.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
