"""Score every stage of the ShapesWorld model chain with the current evaluator, on the same held-out captions.

    python trainers/shapes_eval_chain.py --teacher teacher=out/shapes/teacher \\
        --pipeline student=out/shapes/student --pipeline bundled=bundled --videos 32 \\
        --output docs/experiments/shapesworld/results/shapes_chain_eval.json

The recipes score their stage while they train, with the evaluator of that day and a few videos; this script puts
the stages side by side: one set of held-out captions (``sample_scene(eval_seed + i, split="test")``), one seed, one
evaluator (its source fingerprint is recorded). For each caption it scores

- ``ground_truth``: the rendered scene (the evaluator's ceiling, 1.0 when it is right);
- ``vae_round_trip``: the same video encoded to the posterior mode and decoded by the first pipeline's VAE (or
  ``--vae``): the ceiling of any model that generates in that latent space;
- ``random_tiny``: the randomly initialised tiny pipeline, i.e. the chance level of the metrics;
- every ``--teacher name=folder`` (or a bare folder, named ``teacher``): a bidirectional teacher, ``--teacher_steps`` Euler steps on the shift-5 grid with
  classifier-free guidance ``--guidance_scale`` (several scales: one entry per scale, ``<name>@cfg<scale>``), decoded
  by the first pipeline's VAE (or ``--vae``, for a teacher trained in another latent space).
  Each teacher also gets ``caption_sensitivity`` (``--sensitivity_videos``): on the ground-truth videos of the first
  held-out captions, the rise of its flow-matching loss per noise level when one caption attribute (background,
  colour, shape, direction, speed; ``edit_scene``) is changed or the caption is dropped (``empty``): near zero for
  an attribute the teacher does not read (``--teacher_steps 0`` records only this, sampling no teacher video);
- every ``--pipeline name=folder`` (``bundled`` is the package's bundled model): its default 4-step sampler at the
  training length and, per latent chunk, at ``--long_factor`` times the latent frames (the drift; 0 skips it).

Writes ``--output`` (JSON: per model the mean of every metric, the per-video semantic accuracy and its standard
error, ``motion`` (``motion_summary``: static objects, measured speed per captioned class, direction cosine), and
for the pipelines the per-chunk semantic accuracy and PSNR at the long length) and prints a table. With
``--compare REF`` (a model of this run, or ``FILE.json:NAME`` from an earlier output on the same captions and
evaluator) it adds ``paired``: every model's mean per-video difference of semantic accuracy from REF, with its
standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from diffusers_raven import CausalVideoPipeline
from diffusers_raven.pipelines.presets import BUNDLED_MODEL_DIR, random_tiny_pipeline
from diffusers_raven.pipelines.vae_streaming import (
    denormalize_latents,
    normalize_latents,
    vae_spatial_factor,
    vae_temporal_factor,
)
from diffusers_raven.shapes import (
    EDITABLE_ATTRIBUTES,
    caption,
    caption_loss_gaps,
    chunk_pixel_frames,
    edit_scene,
    evaluate_batch,
    evaluator_fingerprint,
    long_video_frames,
    motion_summary,
    render_video,
    sample_scene,
    sample_videos,
    summarize_gaps,
    vae_round_trip,
)
from diffusers_raven.training import teacher_ode_trajectory

METRICS = ("semantic_accuracy", "background_accuracy", "count_accuracy", "color_accuracy", "shape_accuracy",
           "direction_accuracy", "speed_accuracy", "physics_accuracy", "psnr", "consistency", "num_objects")


def mean_metrics(result: dict) -> dict:
    return {k: result["mean"].get(k) for k in METRICS}


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """``[B, 3, F, H, W]`` in [-1, 1] -> float ``[B, F, H, W, 3]`` in [0, 1]."""
    return ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()


@torch.no_grad()
def sample_teacher(teacher, pipe, vae, captions: list[str], num_frames: int, height: int, width: int, seed: int,
                   steps: int, guidance_scale: float, max_sequence_length: int) -> list[np.ndarray]:
    """Guided Euler sampling of the bidirectional teacher from noise (prompts encoded by ``pipe``), decoded by
    ``vae``."""
    factor = vae_spatial_factor(vae)
    shape = (len(captions), teacher.config.in_channels, (num_frames - 1) // vae_temporal_factor(vae) + 1,
             height // factor, width // factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    text, negative = pipe.encode_prompt(captions, negative_prompt=[""] * len(captions),
                                        do_classifier_free_guidance=guidance_scale != 1.0,
                                        max_sequence_length=max_sequence_length)
    _, x0 = teacher_ode_trajectory(teacher, noise, text, negative, [1.0], guidance_scale, steps, 5.0)
    return [to_frames(vae.decode(denormalize_latents(x[None], vae)).sample)[0] for x in x0]


@torch.no_grad()
def sensitivity_inputs(pipe, vae, scenes: list, videos: list[np.ndarray], seed: int, max_sequence_length: int) -> dict:
    """What :func:`teacher_sensitivity` needs of the ground-truth videos of ``scenes``, the same for every teacher:
    their clean latents ``x0``, caption states, the states of the edited captions (``edit_scene``, seeded
    ``seed + i``, one per attribute) and of the empty caption (``"empty"``), and, for scale, ``edit_latent_msd``:
    per attribute the mean squared difference between the clean latents of the scenes and of their edited scenes
    (same positions and sizes), i.e. how far the edit moves the clean video that a teacher's prediction aims at."""

    def encode(videos: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack(videos)).float().div(255).permute(0, 4, 1, 2, 3) * 2 - 1
        return torch.cat([normalize_latents(vae.encode(p[None]).latent_dist.mode(), vae) for p in pixels])

    def embed(texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(texts, max_sequence_length=max_sequence_length)[0]

    x0 = encode(videos)
    num_frames = videos[0].shape[0]
    edited_scenes = {a: [edit_scene(s, a, seed + i) for i, s in enumerate(scenes)] for a in EDITABLE_ATTRIBUTES}
    edited = {a: embed([caption(s) for s in edits]) for a, edits in edited_scenes.items()}
    edited["empty"] = embed([""] * len(scenes))
    msd = {a: ((encode([render_video(s, num_frames) for s in edits]) - x0) ** 2).mean().item()
           for a, edits in edited_scenes.items()}
    return {"x0": x0, "prompt_embeds": embed([caption(s) for s in scenes]), "edited": edited, "msd": msd}


def teacher_sensitivity(teacher, inputs: dict, sigmas: list[float], seed: int) -> dict:
    """``caption_loss_gaps`` of the teacher on ``inputs`` (:func:`sensitivity_inputs`): per noise level, how much its
    flow-matching loss rises when one attribute of the caption is edited or the caption is dropped; with the
    inputs' ``edit_latent_msd``. The noise is seeded by ``seed``, the same for every teacher."""
    loss, gaps = caption_loss_gaps(teacher, inputs["x0"], inputs["prompt_embeds"], inputs["edited"], sigmas,
                                   torch.Generator().manual_seed(seed))
    return {**summarize_gaps(sigmas, loss, gaps), "edit_latent_msd": inputs["msd"]}


def parse_pipelines(values: list[str]) -> dict[str, str]:
    pipelines = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--pipeline {value!r}: expected name=folder (e.g. student=out/shapes/student)")
        path = str(BUNDLED_MODEL_DIR) if path == "bundled" else path
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise SystemExit(f"--pipeline {value!r}: {path!r} is not a saved CausalVideoPipeline folder")
        pipelines[name] = path
    return pipelines


def parse_teachers(values: list[str]) -> dict[str, str]:
    teachers = {}
    for value in values:
        name, sep, path = value.partition("=") if "=" in value else ("teacher", "=", value)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"--teacher {value!r}: {path!r} is not a saved WanTransformer3DModel folder")
        teachers[name] = path
    return teachers


def standard_error(values) -> float | None:
    """Standard error of the mean of ``values`` (``None`` for fewer than two)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def paired_difference(values: list[float], reference: list[float]) -> dict:
    """Mean and standard error of the per-video differences ``values - reference`` (same captions, same order)."""
    d = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return {"mean": float(d.mean()), "stderr": standard_error(d), "num_videos": len(d)}


def load_references(values: list[str], captions: list[str], num_frames: int) -> dict[str, dict | str]:
    """``--compare`` values: a name of this run (resolved once every model is scored) or ``FILE.json:NAME``, whose
    per-video scores are read now and must come from the same captions, length and evaluator."""
    references: dict[str, dict | str] = {}
    for value in values:
        path, sep, name = value.rpartition(":")
        if not sep or not path.endswith(".json"):
            references[value] = value
            continue
        if not os.path.isfile(path):
            raise SystemExit(f"--compare {value}: no file {path}")
        with open(path) as f:
            earlier = json.load(f)
        entry = earlier.get("models", {}).get(name)
        if entry is None or "semantic_accuracy_per_video" not in entry:
            raise SystemExit(f"--compare {value}: {path} has no scored model {name!r} "
                             f"(it has {sorted(earlier.get('models', {}))})")
        if earlier.get("captions") != captions or earlier.get("num_frames") != num_frames:
            raise SystemExit(f"--compare {value}: {path} was scored on other captions or another length "
                             "(use its --videos, --eval_seed and --num_frames)")
        if earlier.get("evaluator") != evaluator_fingerprint():
            raise SystemExit(f"--compare {value}: {path} was scored by another evaluator "
                             f"({earlier.get('evaluator')} against {evaluator_fingerprint()})")
        references[f"{os.path.basename(path)}:{name}"] = entry
    return references


def fmt_stderr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def paired_report(models: dict, references: dict[str, dict | str]) -> dict:
    """Per reference, every scored model's paired difference of the per-video semantic accuracy against it (at the
    training length, and at the long length where both have one)."""
    report = {}
    for label, reference in references.items():
        if isinstance(reference, str):
            if reference not in models or "semantic_accuracy_per_video" not in models[reference]:
                raise SystemExit(f"--compare {reference}: no model of that name was scored (scored: {sorted(models)})")
            reference = models[reference]
        rows = {}
        for name, entry in models.items():
            if "semantic_accuracy_per_video" not in entry or entry is reference or name == "ground_truth":
                continue
            rows[name] = paired_difference(entry["semantic_accuracy_per_video"],
                                           reference["semantic_accuracy_per_video"])
            if "long" in entry and "long" in reference and \
                    entry["long"].get("num_frames") == reference["long"].get("num_frames"):
                rows[name]["long"] = paired_difference(entry["long"]["semantic_accuracy_per_video"],
                                                       reference["long"]["semantic_accuracy_per_video"])
        report[label] = rows
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", action="append", default=[], required=True,
                        help="name=folder of a CausalVideoPipeline to score ('bundled' for the bundled model); "
                             "repeatable; the first one's text encoder (and VAE, unless --vae) also serve the teachers")
    parser.add_argument("--teacher", action="append", default=[],
                        help="name=folder (or a folder) of a bidirectional WanTransformer3DModel; repeatable")
    parser.add_argument("--vae", default=None, help="AutoencoderKLWan folder of the round trip and of the teachers' "
                                                    "latent space (default: the first pipeline's)")
    parser.add_argument("--videos", type=int, default=32, help="held-out captions")
    parser.add_argument("--eval_seed", type=int, default=10**9, help="first held-out scene seed; also the noise seed")
    parser.add_argument("--num_frames", type=int, default=21, help="training length")
    parser.add_argument("--long_factor", type=int, default=4,
                        help="long videos: this many times the latent frames (0: no long videos)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--teacher_steps", type=int, default=48,
                        help="Euler steps of the teachers' sampler; 0 samples no teacher video and records only the "
                             "teachers' caption sensitivity")
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=[3.0],
                        help="the teachers' classifier-free guidance scale; several values score every teacher at "
                             "each, named <teacher>@cfg<scale>")
    parser.add_argument("--sensitivity_videos", type=int, default=None,
                        help="per teacher, the caption sensitivity (flow-matching loss gaps of edited captions) on the "
                             "ground truth of the first this many held-out captions (default: 32, at most --videos); "
                             "0 skips it")
    parser.add_argument("--sensitivity_sigmas", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3],
                        help="noise levels of the caption sensitivity")
    parser.add_argument("--max_sequence_length", type=int, default=18)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", action="append", default=[],
                        help="a reference for paired differences of the per-video semantic accuracy: the name of a "
                             "model scored in this run, or FILE.json:NAME, a model of an earlier output of this script "
                             "on the same captions and evaluator; repeatable")
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.videos < 1:
        raise SystemExit(f"--videos must be at least 1, got {args.videos}")
    if args.long_factor < 0:
        raise SystemExit(f"--long_factor must be 0 (no long videos) or more, got {args.long_factor}")
    if args.sensitivity_videos is None:
        args.sensitivity_videos = min(32, args.videos)
    if not 0 <= args.sensitivity_videos <= args.videos:
        raise SystemExit(f"--sensitivity_videos must be between 0 and --videos ({args.videos}), "
                         f"got {args.sensitivity_videos}")
    if args.teacher_steps < 0 or (args.teacher_steps == 0 and args.teacher and not args.sensitivity_videos):
        raise SystemExit("--teacher_steps must be at least 1, or 0 with --sensitivity_videos above 0 "
                         f"(the caption sensitivity only), got {args.teacher_steps}")
    if not all(0 < s <= 1 for s in args.sensitivity_sigmas):
        raise SystemExit(f"--sensitivity_sigmas values must lie in (0, 1], got {args.sensitivity_sigmas}")
    if any(g < 1 for g in args.guidance_scale):
        raise SystemExit(f"--guidance_scale values must be at least 1 (1 means no guidance), got {args.guidance_scale}")
    pipelines = parse_pipelines(args.pipeline)
    teachers = parse_teachers(args.teacher)
    scenes = [sample_scene(args.eval_seed + i, split="test", height=args.height, width=args.width)
              for i in range(args.videos)]
    captions = [caption(s) for s in scenes]
    references = load_references(args.compare, captions, args.num_frames)  # checked before any model is sampled
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    loaded = {name: CausalVideoPipeline.from_pretrained(path) for name, path in pipelines.items()}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    first = next(iter(loaded.values()))
    report: dict = {
        "command": " ".join(["python", "trainers/shapes_eval_chain.py", *(sys.argv[1:] if argv is None else argv)]),
        "evaluator": evaluator_fingerprint(),
        "num_videos": args.videos,
        "eval_seed": args.eval_seed,
        "num_frames": args.num_frames,
        "captions": captions,
        "teachers": {name: os.path.relpath(p) for name, p in teachers.items()},
        "pipelines": {name: os.path.relpath(p) if not p.startswith(str(BUNDLED_MODEL_DIR)) else "bundled"
                      for name, p in pipelines.items()},
        "models": {},
    }

    def record(name: str, videos: list[np.ndarray], chunk_frames=None, **extra) -> dict:
        result = evaluate_batch(videos, captions, chunk_frames=chunk_frames, return_per_video=True)
        per_video = [float(v["semantic_accuracy"]) for v in result["per_video"]]
        entry = {**mean_metrics(result), **extra, "semantic_accuracy_per_video": per_video,
                 "semantic_accuracy_stderr": standard_error(per_video),
                 "motion": motion_summary(result["per_video"], args.height, args.width)}
        if chunk_frames is not None:
            entry["per_chunk"] = [{"chunk": c["chunk"], "semantic_accuracy": c.get("semantic_accuracy"),
                                   "psnr": c.get("psnr")} for c in result["per_chunk"]]
        report["models"][name] = entry
        print(f"{name}: semantic {entry['semantic_accuracy']:.3f} psnr {entry['psnr']:.2f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return entry

    truth = [render_video(s, args.num_frames) for s in scenes]
    record("ground_truth", truth)
    vae = AutoencoderKLWan.from_pretrained(args.vae).eval() if args.vae else first.vae
    record("vae_round_trip", vae_round_trip(vae, truth))
    random_pipe = random_tiny_pipeline()
    random_pipe.set_progress_bar_config(disable=True)
    record("random_tiny", sample_videos(random_pipe, captions, args.num_frames, args.height, args.width,
                                          args.eval_seed, args.max_sequence_length))
    n = args.sensitivity_videos
    inputs = sensitivity_inputs(first, vae, scenes[:n], truth[:n], args.eval_seed, args.max_sequence_length) \
        if teachers and n else None
    for name, path in teachers.items():
        teacher = WanTransformer3DModel.from_pretrained(path).eval()
        if not args.teacher_steps:  # --teacher_steps 0: the caption sensitivity only
            labels = [name]
            report["models"][name] = {}
        else:
            labels = [name] if len(args.guidance_scale) == 1 else [f"{name}@cfg{g:g}" for g in args.guidance_scale]
            for label, scale in zip(labels, args.guidance_scale):
                record(label, sample_teacher(teacher, first, vae, captions, args.num_frames, args.height, args.width,
                                             args.eval_seed, args.teacher_steps, scale, args.max_sequence_length),
                       sampler=f"{args.teacher_steps} Euler steps, CFG {scale:g}", guidance_scale=scale)
        if inputs is not None:
            sensitivity = teacher_sensitivity(teacher, inputs, args.sensitivity_sigmas, args.eval_seed)
            for label in labels:
                report["models"][label]["caption_sensitivity"] = sensitivity
            print(f"{name}: caption sensitivity at sigma {args.sensitivity_sigmas[0]:g}: "
                  + ", ".join(f"{a} {g[0]:+.4f}" for a, g in sensitivity["gap"].items()), flush=True)
    for name, pipe in loaded.items():
        record(name, sample_videos(pipe, captions, args.num_frames, args.height, args.width, args.eval_seed,
                                     args.max_sequence_length), sampler="4-step consistency sampler")
        if not args.long_factor:
            continue
        long_frames = long_video_frames(pipe, args.num_frames, args.long_factor)
        record(f"{name}@{long_frames}", sample_videos(pipe, captions, long_frames, args.height, args.width,
                                                               args.eval_seed, args.max_sequence_length),
                      chunk_frames=chunk_pixel_frames(pipe), num_frames=long_frames)
        report["models"][name]["long"] = report["models"].pop(f"{name}@{long_frames}")

    if args.compare:
        report["paired"] = paired_report(report["models"], references)
        for label, rows in report["paired"].items():
            print(f"paired against {label}: " + ", ".join(
                f"{name} {row['mean']:+.3f} ± {fmt_stderr(row['stderr'])}" for name, row in rows.items()), flush=True)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    keys = ("semantic_accuracy", "background_accuracy", "count_accuracy", "color_accuracy", "shape_accuracy",
            "direction_accuracy", "speed_accuracy", "psnr")
    print("| model | " + " | ".join(k.replace("_accuracy", "") for k in keys) + " |")
    for name, entry in report["models"].items():
        cells = ["n/a" if entry.get(k) is None else f"{entry[k]:.3f}" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"wrote {args.output} in {report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
