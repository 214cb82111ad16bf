"""ShapesWorld model chain, stage 4: a causal few-step student initialised from the teacher by ODE regression.

    python trainers/shapes_student.py --config trainers/shapes_student.yaml
    python trainers/shapes_student.py --config trainers/shapes_student.yaml --resume last   # continue a run
    python trainers/shapes_student.py --config trainers/shapes_student.yaml --teacher_path out/t2/teacher --max_steps 600

The configuration is read as TRL's scripts read theirs (``trl.TrlParser``): the YAML ``--config`` sets fields of
:class:`ShapesStudentConfig`, any field is also a flag, and a misspelt key fails naming the closest field.

Inputs: the stage 1 text stack (``tokenizer/``, ``text_encoder/``), the stage 2 VAE (``vae/``) and the stage 3 teacher
(``teacher/``, a ``WanTransformer3DModel``).

1. Student: a ``CausalWanTransformer3DModel`` with the teacher's config plus ``num_frames_per_chunk`` and the
   teacher's weights (same keys, loaded strictly), in a ``CausalVideoPipeline`` with the ShapesWorld tokenizer, text
   encoder and VAE and ``ConsistencyFlowMatchScheduler()`` (the four-step sampler of METHOD.md §1).
2. ODE pairs (METHOD §5, ``build_ode_dataset``): for ``num_ode_pairs`` training-split captions
   (``sample_scene(ode_seed + i, split="train")``), the guided teacher ODE (``ode_num_steps`` Euler steps, CFG
   ``ode_guidance_scale``) from noise, recording the states at the four few-step sigmas and the end point. They are
   saved to ``<output_dir>/student_ode_pairs`` and reused by a later run with the same pair settings.
3. ODE regression (``ODERegressionTrainer``): block-causal pass, an independent few-step sigma per chunk, loss
   ``‖x̂0 − x0_teacher‖²``; AdamW, warm-up + cosine, EMA of the student; a wall-clock budget
   (``time_budget_minutes``, counted per invocation) besides ``max_steps``; checkpoints in
   ``<output_dir>/student_run/checkpoint-*``.
4. Evaluation on held-out captions (``sample_scene(eval_seed + i, split="test")``) with the default 4-step
   consistency sampler (``pipe(...)``, no guidance): at the training length and at ``long_video_factor`` times
   as many latent frames, scored with ``evaluate_batch(..., chunk_frames=[first, rest])`` (the pixel frames of each
   latent chunk), so the long videos show per-chunk drift. The same evaluation runs before training (the teacher's
   weights used causally with 4 steps) and, as the target of the distillation, on the teacher's own guided ODE
   samples of the held-out captions at the training length.

Outputs in ``output_dir``: ``student/`` (a ``CausalVideoPipeline`` folder, EMA weights) and ``student_metrics.json``
(loss curve, every evaluation, timings, config, command).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import AutoTokenizer, TrainerCallback, UMT5EncoderModel

from diffusers_raven import (
    CausalVideoPipeline,
    CausalWanTransformer3DModel,
    ConsistencyFlowMatchScheduler,
    ODERegressionConfig,
    ODERegressionTrainer,
)
from diffusers_raven.pipelines.vae_streaming import denormalize_latents
from diffusers_raven.shapes import (
    SUMMARY_METRICS,  # noqa: F401  (re-exported for the recipes that read this one)
    caption,
    chunk_pixel_frames,
    evaluate_batch,
    evaluate_pipeline,
    evaluate_pipeline_lengths,
    format_metric,
    held_out_captions,
    long_video_frames,
    sample_scene,
    summarize_scores,
)
from diffusers_raven.trainer import build_ode_dataset
from diffusers_raven.utils.recipe_args import parse_recipe_args

PAIR_SETTINGS = ("num_ode_pairs", "ode_seed", "ode_num_steps", "ode_guidance_scale", "num_frames", "height", "width",
                 "max_sequence_length", "teacher_path")


@dataclass
class ShapesStudentConfig:
    """Configuration of the ShapesWorld student recipe (every field can be set in the YAML file).

    Parameters that control the inputs: ``tokenizer_path``, ``text_encoder_path``, ``vae_path``, ``teacher_path``.
    Parameters that control the student: ``num_frames_per_chunk``.
    Parameters that control the ODE pairs: ``num_ode_pairs``, ``ode_seed``, ``ode_num_steps``,
    ``ode_guidance_scale``, ``ode_batch_size``.
    Parameters that control the training: ``num_frames`` (1 + 4k, a whole number of chunks), ``height``, ``width``,
    ``max_sequence_length``, ``batch_size``, ``learning_rate``, ``warmup_steps``, ``weight_decay``,
    ``max_grad_norm``, ``ema_decay``, ``chunk_loss_alpha``, ``max_steps``, ``time_budget_minutes``,
    ``logging_steps``, ``save_steps``, ``seed``.
    Parameters that control the evaluation: ``eval_num_videos``, ``eval_seed``, ``long_video_factor``,
    ``eval_before_training``, ``eval_teacher``.
    """

    # inputs
    tokenizer_path: str = field(default="out/shapes/tokenizer", metadata={"help": "stage 1 tokenizer folder"})
    text_encoder_path: str = field(default="out/shapes/text_encoder", metadata={"help": "stage 1 UMT5 encoder"})
    vae_path: str = field(default="out/shapes/vae", metadata={"help": "stage 2 AutoencoderKLWan folder"})
    teacher_path: str = field(default="out/shapes/teacher", metadata={"help": "stage 3 WanTransformer3DModel"})
    # student
    num_frames_per_chunk: int = field(default=3, metadata={"help": "latent frames per causal chunk"})
    # ODE pairs
    num_ode_pairs: int = field(default=256, metadata={"help": "teacher trajectories (one training caption each)"})
    ode_seed: int = field(default=0, metadata={"help": "caption scene seeds ode_seed + i; also the noise seed"})
    ode_num_steps: int = field(default=48, metadata={"help": "Euler steps of the teacher ODE (multiple of 4)"})
    ode_guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance of the teacher"})
    ode_batch_size: int = field(default=8, metadata={"help": "trajectories integrated together (the pairs do not "
                                                      "depend on it)"})
    # training
    num_frames: int = field(default=21, metadata={"help": "output frames per training video (1 + 4k)"})
    height: int = field(default=64, metadata={"help": "pixel height"})
    width: int = field(default=64, metadata={"help": "pixel width"})
    max_sequence_length: int | None = field(default=None, metadata={"help": "text tokens (None: tokenizer's max)"})
    batch_size: int = field(default=8, metadata={"help": "ODE pairs per step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps, then a cosine to 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    ema_decay: float | None = field(default=0.99, metadata={"help": "student EMA decay (None disables)"})
    chunk_loss_alpha: float = field(default=0.0, metadata={"help": "chunk-wise loss scaling (METHOD §4)"})
    max_steps: int = field(default=1200, metadata={"help": "stop after this many steps"})
    time_budget_minutes: float = field(default=30.0, metadata={"help": "stop training after this much time"})
    logging_steps: int = field(default=10, metadata={"help": "loss-curve interval"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint interval (0 disables)"})
    seed: int = field(default=0, metadata={"help": "trainer seed"})
    # evaluation
    eval_num_videos: int = field(default=8, metadata={"help": "held-out-caption videos per evaluation"})
    eval_seed: int = field(default=1_000_000_000, metadata={"help": "first held-out scene seed; also the noise seed"})
    long_video_factor: int = field(default=4, metadata={"help": "long videos have this many times the latent frames"})
    eval_before_training: bool = field(default=True, metadata={"help": "also evaluate the initial student"})
    eval_teacher: bool = field(default=True, metadata={"help": "also evaluate the teacher's guided ODE samples"})
    # outputs
    output_dir: str = field(default="out/shapes", metadata={"help": "where student/ and the metrics go"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads (more oversubscribe a shared CPU)"})

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames={self.num_frames} must be 1 + 4k (Wan's 4x temporal compression)")
        latent_frames = (self.num_frames - 1) // 4 + 1
        if self.num_frames_per_chunk < 1 or latent_frames % self.num_frames_per_chunk:
            raise ValueError(
                f"num_frames={self.num_frames} gives {latent_frames} latent frames, not a whole number of "
                f"{self.num_frames_per_chunk}-frame chunks"
            )
        if self.height % 16 or self.width % 16 or self.height <= 0 or self.width <= 0:
            raise ValueError(f"height x width = {self.height}x{self.width} must be positive multiples of 16")
        if self.ode_num_steps < 4 or self.ode_num_steps % 4:
            raise ValueError(f"ode_num_steps={self.ode_num_steps} must be a positive multiple of 4 (the few-step "
                             "sigmas must lie on the teacher's grid)")
        for name in ("num_ode_pairs", "ode_batch_size", "batch_size", "max_steps", "logging_steps", "eval_num_videos",
                     "long_video_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1) or null")
        if self.time_budget_minutes <= 0:
            raise ValueError(f"time_budget_minutes={self.time_budget_minutes} must be positive")
        if self.save_steps < 0 or self.warmup_steps < 0:
            raise ValueError("save_steps and warmup_steps must be >= 0")


@dataclass
class ShapesStudentScriptArguments:
    """What the command line adds to the config."""

    resume: str | None = field(default=None, metadata={"help": "a checkpoint folder, or 'last' for the newest one"})


def load_config(path: str, *flags: str) -> ShapesStudentConfig:
    """The config of the YAML file ``path`` with ``flags`` (``"--max_steps", "600"``) on top."""
    return parse_recipe_args((ShapesStudentConfig, ShapesStudentScriptArguments), ["--config", path, *flags])[0]


# ------------------------------------------------------------------------------------------------ components
def causal_student(teacher: WanTransformer3DModel, num_frames_per_chunk: int) -> CausalWanTransformer3DModel:
    """A causal transformer with the teacher's config (+ ``num_frames_per_chunk``) and weights (strict load)."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = CausalWanTransformer3DModel.from_config({**config, "num_frames_per_chunk": num_frames_per_chunk})
    student.load_state_dict(teacher.state_dict(), strict=True)
    return student


def build_pipeline(config: ShapesStudentConfig) -> tuple[CausalVideoPipeline, WanTransformer3DModel]:
    for name in ("tokenizer_path", "text_encoder_path", "vae_path", "teacher_path"):
        if not os.path.isdir(getattr(config, name)):
            raise ValueError(f"{name}={getattr(config, name)!r} is not a folder (run the earlier chain stages)")
    teacher = WanTransformer3DModel.from_pretrained(config.teacher_path).eval().requires_grad_(False)
    pipe = CausalVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(config.tokenizer_path),
        text_encoder=UMT5EncoderModel.from_pretrained(config.text_encoder_path).eval().requires_grad_(False),
        transformer=causal_student(teacher, config.num_frames_per_chunk),
        vae=AutoencoderKLWan.from_pretrained(config.vae_path).eval().requires_grad_(False),
        scheduler=ConsistencyFlowMatchScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, teacher


def ode_pairs(pipe, teacher, config: ShapesStudentConfig, max_sequence_length: int, folder: str):
    """The teacher's ODE pairs for ``num_ode_pairs`` training captions; reused from ``folder`` when its settings
    match. Returns ``(dataset, seconds spent building it, reused)``."""
    from datasets import load_from_disk

    settings = {name: getattr(config, name) for name in PAIR_SETTINGS}
    settings["max_sequence_length"] = max_sequence_length
    settings_path = os.path.join(folder, "pair_settings.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            if json.load(f) == settings:
                return load_from_disk(folder).with_format("torch"), 0.0, True
    prompts = [caption(sample_scene(config.ode_seed + i, split="train", height=config.height, width=config.width))
               for i in range(config.num_ode_pairs)]
    start = time.perf_counter()
    data = build_ode_dataset(pipe, teacher, prompts, config.num_frames, config.height, config.width,
                             num_steps=config.ode_num_steps, guidance_scale=config.ode_guidance_scale,
                             seed=config.ode_seed, max_sequence_length=max_sequence_length,
                             batch_size=config.ode_batch_size)
    seconds = time.perf_counter() - start
    data.save_to_disk(folder)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=2)
    return data, seconds, False


class TimeBudget(TrainerCallback):
    """Stop training once ``seconds`` of wall time have passed since the trainer started."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.start_step, self.stopped = seconds, None, 0, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = self.stopped = True
        return control


# ------------------------------------------------------------------------------------------------ evaluation
# The protocol (sampling, per-chunk scoring, summaries) is shared with the distillation recipe: see
# ``diffusers_raven.shapes.pipeline_eval``.
summary = summarize_scores
fmt = format_metric


def evaluate_student(pipe, captions: list[str], num_frames: int, config, max_sequence_length: int) -> dict:
    """4-step consistency samples (the pipeline default, no guidance) scored per chunk."""
    return evaluate_pipeline(pipe, captions, num_frames, config.height, config.width, config.eval_seed,
                             max_sequence_length)


@torch.no_grad()
def evaluate_teacher(pipe, teacher, captions: list[str], config, max_sequence_length: int) -> dict:
    """The teacher's guided ODE samples (the regression targets' distribution) at the training length."""
    start = time.perf_counter()
    data = build_ode_dataset(pipe, teacher, captions, config.num_frames, config.height, config.width,
                             num_steps=config.ode_num_steps, guidance_scale=config.ode_guidance_scale,
                             seed=config.eval_seed, max_sequence_length=max_sequence_length,
                             batch_size=config.ode_batch_size)
    videos = []
    for x0 in data["latents"]:
        pixels = pipe.vae.decode(denormalize_latents(x0[None].to(pipe.vae.dtype), pipe.vae)).sample
        videos.append(((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy())
    scores = evaluate_batch(videos, captions, chunk_frames=chunk_pixel_frames(pipe))
    return {"num_frames": config.num_frames, **summary(scores), "seconds": round(time.perf_counter() - start, 1)}


def evaluate_both_lengths(pipe, captions, config, max_sequence_length, long_frames) -> dict:
    return evaluate_pipeline_lengths(pipe, captions, config.num_frames, long_frames, config.height, config.width,
                                     config.eval_seed, max_sequence_length)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    config, cli = parse_recipe_args((ShapesStudentConfig, ShapesStudentScriptArguments), argv, description=__doc__)
    command = " ".join(["python", "trainers/shapes_student.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(config.num_threads)
    os.makedirs(config.output_dir, exist_ok=True)
    metrics_path = os.path.join(config.output_dir, "student_metrics.json")
    run_dir = os.path.join(config.output_dir, "student_run")
    student_dir = os.path.join(config.output_dir, "student")
    start = time.perf_counter()

    pipe, teacher = build_pipeline(config)
    max_sequence_length = config.max_sequence_length or pipe.tokenizer.model_max_length
    latent_frames = pipe.latent_frames_for(config.num_frames)
    long_frames = long_video_frames(pipe, config.num_frames, config.long_video_factor)
    eval_captions = held_out_captions(config.eval_num_videos, config.eval_seed, config.height, config.width)
    num_parameters = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"student: {num_parameters:,} parameters, chunks of {pipe.chunk_frames} latent frames; "
          f"{config.num_frames} frames ({latent_frames} latent) for training, {long_frames} for the long evaluation")
    results: dict = {
        "config": asdict(config),
        "command": command,
        "num_parameters": num_parameters,
        "max_sequence_length": max_sequence_length,
        "train_latent_frames": latent_frames,
        "long_num_frames": long_frames,
        "eval_chunk_frames": chunk_pixel_frames(pipe),
        "eval_captions": eval_captions,
        "few_step_sigmas": ConsistencyFlowMatchScheduler().default_sigmas(),
    }

    def save_metrics(finished: bool) -> None:
        with open(metrics_path, "w") as f:  # a partial file survives a killed run
            json.dump({**results, "finished": finished}, f, indent=2)

    data, pair_seconds, reused = ode_pairs(pipe, teacher, config, max_sequence_length,
                                           os.path.join(config.output_dir, "student_ode_pairs"))
    results.update({"ode_pairs": len(data), "ode_pairs_reused": reused, "ode_pairs_seconds": round(pair_seconds, 1),
                    "ode_seconds_per_pair": round(pair_seconds / len(data), 3) if not reused else None})
    print(f"ode pairs: {len(data)} ({'reused' if reused else f'{pair_seconds:.0f} s'})", flush=True)
    save_metrics(False)

    if cli.resume is not None and os.path.isfile(metrics_path):  # a resumed run keeps its pre-training evaluations
        with open(metrics_path) as f:
            previous = json.load(f)
        results.update({k: previous[k] for k in ("eval_teacher", "eval_before") if k in previous})
    if config.eval_teacher and "eval_teacher" not in results:
        results["eval_teacher"] = evaluate_teacher(pipe, teacher, eval_captions, config, max_sequence_length)
        print(f"teacher ODE ({config.ode_num_steps} steps, cfg {config.ode_guidance_scale}): semantic "
              f"{fmt(results['eval_teacher']['semantic_accuracy'])} psnr {fmt(results['eval_teacher']['psnr'], 2)}")
    if config.eval_before_training and "eval_before" not in results:
        print("student before training (teacher weights, causal, 4 steps):")
        results["eval_before"] = evaluate_both_lengths(pipe, eval_captions, config, max_sequence_length, long_frames)
    save_metrics(False)

    args = ODERegressionConfig(
        output_dir=run_dir, max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        num_frames=config.num_frames, height=config.height, width=config.width,
        max_sequence_length=max_sequence_length, learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps, lr_scheduler_type="cosine", weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, ema_decay=config.ema_decay, chunk_loss_alpha=config.chunk_loss_alpha,
        logging_steps=config.logging_steps, save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500, save_total_limit=2, use_cpu=True, seed=config.seed, disable_tqdm=True,
    )
    budget = TimeBudget(60.0 * config.time_budget_minutes)
    trainer = ODERegressionTrainer(model=pipe, args=args, train_dataset=data, callbacks=[budget])
    resume = cli.resume
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        if resume is None:
            raise ValueError(f"--resume last: no checkpoint in {run_dir}")
    train_start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - train_start
    trainer.save_model(student_dir)  # a CausalVideoPipeline folder with the EMA weights
    steps_this_run = trainer.state.global_step - budget.start_step
    results.update({
        "resumed_from": resume,
        "steps": trainer.state.global_step,
        "stop_reason": "time_budget" if budget.stopped else "max_steps",
        "train_wall_seconds": round(train_seconds, 1),
        "steps_this_run": steps_this_run,
        "seconds_per_step": round(train_seconds / max(steps_this_run, 1), 3),
        "train_metrics": train_result.metrics,
        "loss_curve": [{"step": h["step"], "loss": h["ode/loss"]} for h in trainer.state.log_history
                       if "ode/loss" in h],
    })
    print(f"trained {trainer.state.global_step} steps in {train_seconds:.0f} s ({results['stop_reason']}); "
          f"saved {student_dir}", flush=True)
    save_metrics(False)

    print("student after training (saved pipeline, 4 steps):")
    saved = CausalVideoPipeline.from_pretrained(student_dir)
    saved.set_progress_bar_config(disable=True)
    results["eval_after"] = evaluate_both_lengths(saved, eval_captions, config, max_sequence_length, long_frames)
    results.update({"student_dir": student_dir, "total_wall_seconds": round(time.perf_counter() - start, 1)})
    save_metrics(True)
    print(f"done in {results['total_wall_seconds']:.0f} s; metrics in {metrics_path}")
    return results


if __name__ == "__main__":
    main()
