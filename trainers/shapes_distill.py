"""ShapesWorld model chain, stage 5: DMD distillation of the ODE-initialised student with RAVEN, Self Forcing and
Diffusion Forcing histories, from the same start and with equal compute (the paper's central comparison).

    python trainers/shapes_distill.py --config trainers/shapes_distill.yaml
    python trainers/shapes_distill.py --config trainers/shapes_distill.yaml --resume        # continue a killed run
    python trainers/shapes_distill.py --config trainers/shapes_distill.yaml --modes raven self_forcing
    python trainers/shapes_distill.py --config trainers/shapes_distill.yaml --guidance_scale 7 --eval_student false

The configuration is read as TRL's scripts read theirs (``trl.TrlParser``): the YAML ``--config`` sets fields of
:class:`ShapesDistillConfig`, any field is also a flag (``raven_args`` takes a JSON mapping:
``--raven_args '{"adam_beta1": 0.0}'``), and a misspelt key fails naming the closest field.

Inputs: the stage 4 student (``student_path``, a ``CausalVideoPipeline`` folder: its tokenizer, text encoder and
VAE are used as they are) and the stage 3 teacher (``teacher_path``, a bidirectional ``WanTransformer3DModel``: the
real score, and the critic's initialisation).

1. Prompts: ``num_prompts`` training-split captions, ``caption(sample_scene(prompt_seed + i, split="train"))``.
2. For each mode of ``modes`` (``history`` of ``RavenConfig``), in order: ``RavenTrainer`` from a fresh load of the
   same student and teacher folders, with the same seed (so the same prompt order), the same hyperparameters and
   the same compute budget. ``budget: time`` (default) gives every mode ``time_budget_minutes`` of training time,
   measured by :class:`TrainingTimeBudget` as the summed duration of its training steps (rollouts, generator and
   critic updates) in the same process, with the same thread count; checkpoint writing and logging do not count.
   ``max_steps`` still caps the run. ``budget: steps`` gives every mode exactly ``max_steps`` generator steps
   instead. Either way the generator steps each mode got, its seconds per step and the budget are recorded. The
   learning rate is constant, so a mode that is stopped by the clock is not left at a different point of a
   schedule. Each mode writes its pipeline (EMA weights) to ``<output_dir>/distill_<mode>/`` and its checkpoints to
   ``<output_dir>/distill_<mode>_run/``; ``distill_<mode>/distill_results.json`` marks it finished.
3. Evaluation of the starting student and of every mode's saved pipeline with the protocol of the student recipe
   (:func:`diffusers_raven.shapes.evaluate_pipeline_lengths`): held-out captions (``sample_scene(eval_seed + i,
   split="test")``), the default 4-step sampler without guidance, ShapesWorld metrics at the training length and
   per latent chunk at ``long_video_factor`` times the latent frames (the drift).

Outputs in ``output_dir``: ``distill_metrics.json`` (config, command, budget, per mode: generator steps, seconds,
loss curves, metrics, per-chunk drift), ``distill_table.md`` (also printed) and ``distill_drift.png`` (per-chunk
semantic accuracy and PSNR at the long length, one line per mode and one for the starting student).

``--resume`` continues a killed run: modes with a results file are skipped (their settings must match), the
unfinished mode continues from its last checkpoint (with the training time already spent), and finished evaluations
with the same settings are reused. Without ``--resume`` existing outputs of the requested modes are an error. The
table, plot and metrics file cover the modes of the invocation: after runs of single modes (``--modes``), run all of
them with ``--resume`` to collect them (nothing is retrained).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import yaml

from diffusers_raven.shapes import (
    caption,
    evaluate_pipeline_lengths,
    evaluator_fingerprint,
    format_metric,
    held_out_captions,
    long_video_frames,
    sample_scene,
)
from diffusers_raven.trainer import HISTORY_MODES, RavenConfig
from diffusers_raven.utils.recipe_args import parse_recipe_args
from diffusers_raven.utils.recipes import TrainingTimeBudget

#: The history modes this recipe compares (``teacher_forcing`` needs encoded data videos, which it does not use).
DISTILL_MODES = tuple(m for m in HISTORY_MODES if m != "teacher_forcing")
BUDGETS = ("time", "steps")
#: RavenConfig fields the recipe sets itself (not allowed in ``raven_args``).
RECIPE_ARGS = ("output_dir", "history", "max_steps", "per_device_train_batch_size", "num_frames", "height", "width",
               "max_sequence_length", "learning_rate", "critic_learning_rate", "critic_updates_per_generator_update",
               "guidance_scale", "chunk_loss_alpha", "ema_decay", "max_grad_norm", "critic_max_grad_norm",
               "lr_scheduler_type", "warmup_steps", "logging_steps", "save_strategy", "save_steps", "seed",
               "use_cpu", "disable_tqdm")
#: Config fields that do not change what a mode trains (a resumed run may change them).
NON_TRAINING_FIELDS = ("modes", "eval_num_videos", "eval_seed", "long_video_factor", "eval_student", "output_dir",
                       "logging_steps", "save_steps")
RESULTS_FILE = "distill_results.json"
STUDENT_EVAL_FILE = "distill_student_eval.json"


@dataclass
class ShapesDistillConfig:
    """Configuration of the ShapesWorld distillation comparison (every field can be set in the YAML file).

    Parameters that control the inputs: ``student_path``, ``teacher_path``.
    Parameters that control the comparison: ``modes``, ``budget``, ``time_budget_minutes``, ``max_steps``.
    Parameters that control the prompts: ``num_prompts``, ``prompt_seed``.
    Parameters that control the training (the same for every mode): ``num_frames`` (1 + 4k, a whole number of
    chunks), ``height``, ``width``, ``max_sequence_length``, ``batch_size``, ``learning_rate``,
    ``critic_learning_rate``, ``critic_updates_per_generator_update``, ``guidance_scale``, ``chunk_loss_alpha``,
    ``ema_decay``, ``max_grad_norm``, ``critic_max_grad_norm``, ``raven_args``, ``logging_steps``, ``save_steps``,
    ``seed``.
    Parameters that control the evaluation: ``eval_num_videos``, ``eval_seed``, ``long_video_factor``,
    ``eval_student``.
    """

    # inputs
    student_path: str = field(default="out/shapes/student", metadata={"help": "stage 4 CausalVideoPipeline folder"})
    teacher_path: str = field(default="out/shapes/teacher", metadata={"help": "stage 3 WanTransformer3DModel"})
    # comparison
    modes: list[str] = field(default_factory=lambda: list(DISTILL_MODES),
                             metadata={"help": f"history modes to train, in order (of {DISTILL_MODES})"})
    budget: str = field(default="time", metadata={"help": "equal compute as equal training 'time' or equal 'steps'"})
    time_budget_minutes: float = field(default=15.0, metadata={"help": "training time per mode (budget: time)"})
    max_steps: int = field(default=2000, metadata={"help": "generator steps per mode (cap with budget: time)"})
    # prompts
    num_prompts: int = field(default=2048, metadata={"help": "training-split captions (prompt_seed + i)"})
    prompt_seed: int = field(default=0, metadata={"help": "first scene seed of the training captions"})
    # training
    num_frames: int = field(default=21, metadata={"help": "output frames of a training rollout (1 + 4k)"})
    height: int = field(default=64, metadata={"help": "pixel height"})
    width: int = field(default=64, metadata={"help": "pixel width"})
    max_sequence_length: int | None = field(default=None, metadata={"help": "text tokens (None: tokenizer's max)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generator step"})
    learning_rate: float = field(default=2e-5, metadata={"help": "generator AdamW learning rate (constant)"})
    critic_learning_rate: float = field(default=4e-6, metadata={"help": "critic AdamW learning rate (constant)"})
    critic_updates_per_generator_update: int = field(default=2, metadata={"help": "critic steps per generator step"})
    guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance of the teacher"})
    chunk_loss_alpha: float | None = field(
        default=None, metadata={"help": "chunk-wise loss scaling α (None: −1 for raven, 0 for the baselines)"}
    )
    ema_decay: float | None = field(default=0.99, metadata={"help": "generator EMA decay (None disables)"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "generator gradient clipping"})
    critic_max_grad_norm: float = field(default=10.0, metadata={"help": "critic gradient clipping"})
    raven_args: dict | str | None = field(default_factory=dict, metadata={
        "help": "further RavenConfig fields, the same for every mode (a mapping; as a flag, JSON)"})
    logging_steps: int = field(default=5, metadata={"help": "loss-curve interval (generator steps)"})
    save_steps: int = field(default=25, metadata={"help": "checkpoint interval (0 disables; resume needs it)"})
    seed: int = field(default=0, metadata={"help": "trainer seed (prompt order and every random draw)"})
    # evaluation
    eval_num_videos: int = field(default=16, metadata={"help": "held-out-caption videos per evaluation"})
    eval_seed: int = field(default=1_000_000_000, metadata={"help": "first held-out scene seed; also the noise seed"})
    long_video_factor: int = field(default=4, metadata={"help": "long videos have this many times the latent frames"})
    eval_student: bool = field(default=True, metadata={"help": "also evaluate the starting student"})
    # outputs
    output_dir: str = field(default="out/shapes", metadata={"help": "where distill_<mode>/ and the metrics go"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads (more oversubscribe a shared CPU)"})

    def __post_init__(self) -> None:
        if isinstance(self.modes, str):
            self.modes = [self.modes]
        if not isinstance(self.modes, list) or not self.modes:
            raise ValueError(f"modes={self.modes!r} must be a non-empty list of {DISTILL_MODES}")
        for mode in self.modes:
            if mode not in DISTILL_MODES:
                extra = (" (teacher_forcing needs encoded data videos; this recipe distils from prompts only)"
                         if mode == "teacher_forcing" else "")
                raise ValueError(f"modes: unknown history mode {mode!r}; choose from {DISTILL_MODES}{extra}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes={self.modes} lists a mode twice")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} must be one of {BUDGETS}")
        if not self.time_budget_minutes > 0:
            raise ValueError(f"time_budget_minutes={self.time_budget_minutes} must be positive")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames={self.num_frames} must be 1 + 4k (Wan's 4x temporal compression)")
        if self.height % 16 or self.width % 16 or self.height <= 0 or self.width <= 0:
            raise ValueError(f"height x width = {self.height}x{self.width} must be positive multiples of 16")
        for name in ("max_steps", "num_prompts", "batch_size", "critic_updates_per_generator_update", "logging_steps",
                     "eval_num_videos", "long_video_factor", "num_threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.save_steps < 0:
            raise ValueError(f"save_steps={self.save_steps} must be >= 0")
        for name in ("learning_rate", "critic_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1) or null")
        if self.raven_args is None:
            self.raven_args = {}
        if isinstance(self.raven_args, str):  # a flag: JSON (or YAML) text
            try:
                self.raven_args = yaml.safe_load(self.raven_args)
            except yaml.YAMLError as error:
                raise ValueError(f"raven_args={self.raven_args!r} is not a JSON mapping ({error})") from error
        if not isinstance(self.raven_args, dict):
            raise ValueError(f"raven_args={self.raven_args!r} must be a mapping of RavenConfig fields")
        known = {f.name for f in fields(RavenConfig)}
        unknown = sorted(set(self.raven_args) - known)
        if unknown:
            raise ValueError(f"raven_args: unknown RavenConfig fields {unknown}")
        reserved = sorted(set(self.raven_args) & set(RECIPE_ARGS))
        if reserved:
            raise ValueError(f"raven_args: {reserved} are set by the recipe; use the top-level config fields")

    def training_settings(self) -> dict:
        """The fields that determine what a mode trains (compared when a run is resumed)."""
        return {k: v for k, v in asdict(self).items() if k not in NON_TRAINING_FIELDS}

    def eval_settings(self) -> dict:
        return {k: getattr(self, k) for k in ("eval_num_videos", "eval_seed", "long_video_factor", "num_frames",
                                              "height", "width", "max_sequence_length")}


@dataclass
class ShapesDistillScriptArguments:
    """What the command line adds to the config."""

    resume: bool = field(default=False, metadata={
        "help": "continue a killed run: skip finished modes, resume the unfinished one"})


def load_config(path: str, *flags: str) -> ShapesDistillConfig:
    """The config of the YAML file ``path`` with ``flags`` (``"--modes", "raven"``) on top."""
    return parse_recipe_args((ShapesDistillConfig, ShapesDistillScriptArguments), ["--config", path, *flags])[0]


def check_inputs(config: ShapesDistillConfig) -> None:
    """The student must be a saved pipeline and the teacher a saved transformer (checked before any training)."""
    if not os.path.isfile(os.path.join(config.student_path, "model_index.json")):
        raise ValueError(f"student_path={config.student_path!r} is not a CausalVideoPipeline folder (no "
                         "model_index.json; run trainers/shapes_student.py first)")
    if not os.path.isfile(os.path.join(config.teacher_path, "config.json")):
        raise ValueError(f"teacher_path={config.teacher_path!r} is not a WanTransformer3DModel folder (no "
                         "config.json; run trainers/shapes_teacher.py first)")


def training_prompts(config: ShapesDistillConfig) -> list[str]:
    return [caption(sample_scene(config.prompt_seed + i, split="train", height=config.height, width=config.width))
            for i in range(config.num_prompts)]


# ------------------------------------------------------------------------------------------------ budget
# ------------------------------------------------------------------------------------------------ training
def mode_dirs(output_dir: str, mode: str) -> tuple[str, str]:
    """The pipeline folder and the checkpoint folder of a mode."""
    return os.path.join(output_dir, f"distill_{mode}"), os.path.join(output_dir, f"distill_{mode}_run")


def raven_args(config: ShapesDistillConfig, mode: str, run_dir: str, max_sequence_length: int) -> RavenConfig:
    return RavenConfig(
        output_dir=run_dir, history=mode, max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        num_frames=config.num_frames, height=config.height, width=config.width,
        max_sequence_length=max_sequence_length, learning_rate=config.learning_rate,
        critic_learning_rate=config.critic_learning_rate,
        critic_updates_per_generator_update=config.critic_updates_per_generator_update,
        guidance_scale=config.guidance_scale, chunk_loss_alpha=config.chunk_loss_alpha, ema_decay=config.ema_decay,
        max_grad_norm=config.max_grad_norm, critic_max_grad_norm=config.critic_max_grad_norm,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500,
        save_total_limit=2, use_cpu=True, seed=config.seed, disable_tqdm=True, **config.raven_args,
    )


def loss_curve(log_history: list[dict]) -> list[dict]:
    """The logged DMD and critic losses (and the DMD gradient norm) per logging step."""
    keys = ("dmd/loss", "critic/loss", "dmd/score_norm")
    return [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in log_history if "dmd/loss" in h]


def train_mode(config: ShapesDistillConfig, mode: str, prompts: list[str], max_sequence_length: int,
               resume: bool) -> dict:
    """Distill a fresh copy of the student with history ``mode``; save its pipeline and its results file."""
    from datasets import Dataset
    from diffusers import WanTransformer3DModel
    from transformers.trainer_utils import get_last_checkpoint

    from diffusers_raven import CausalVideoPipeline, RavenTrainer

    pipeline_dir, run_dir = mode_dirs(config.output_dir, mode)
    settings_path = os.path.join(run_dir, "distill_settings.json")
    settings = {"mode": mode, **config.training_settings()}
    checkpoint = get_last_checkpoint(run_dir) if resume and os.path.isdir(run_dir) else None
    if checkpoint is not None and os.path.isfile(settings_path):
        with open(settings_path) as f:
            _check_same_settings(json.load(f), settings, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=2)

    torch.manual_seed(config.seed)
    pipe = CausalVideoPipeline.from_pretrained(config.student_path)  # a fresh copy of the same student every time
    teacher = WanTransformer3DModel.from_pretrained(config.teacher_path).eval().requires_grad_(False)
    args = raven_args(config, mode, run_dir, max_sequence_length)
    budget = TrainingTimeBudget(60.0 * config.time_budget_minutes if config.budget == "time" else None, checkpoint)
    trainer = RavenTrainer(model=pipe, teacher=teacher, args=args,
                           train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[budget])
    load_before = os.getloadavg()
    wall_start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    wall_seconds = time.perf_counter() - wall_start
    trainer.save_model(pipeline_dir)  # a CausalVideoPipeline folder with the EMA weights
    steps = trainer.state.global_step
    stop_reason = "time_budget" if budget.stopped else "max_steps"
    results = {
        "mode": mode,
        "settings": settings,
        "pipeline_dir": pipeline_dir,
        "resumed_from": checkpoint,
        "generator_steps": steps,
        "stop_reason": stop_reason,
        "budget": {"kind": config.budget, "train_seconds": 60.0 * config.time_budget_minutes
                   if config.budget == "time" else None, "max_steps": config.max_steps,
                   "num_threads": config.num_threads},
        "train_seconds": round(budget.elapsed, 3),
        "train_seconds_before_resume": round(budget.elapsed_at_start, 3),
        "seconds_per_step": round(budget.elapsed / max(steps, 1), 3),
        "wall_seconds_this_run": round(wall_seconds, 1),
        "steps_this_run": steps - budget.start_step,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "chunk_loss_alpha": args.chunk_loss_alpha,
        "train_metrics": train_result.metrics,
        "loss_curve": loss_curve(trainer.state.log_history),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if mode == "self_forcing":
        results["self_forcing_exit_steps"] = list(trainer.exit_steps)
    _write_json(os.path.join(pipeline_dir, RESULTS_FILE), results)
    print(f"{mode}: {steps} generator steps, {budget.elapsed:.0f} s of training time "
          f"({results['seconds_per_step']:.2f} s/step, stopped by {stop_reason}); saved {pipeline_dir}", flush=True)
    del trainer, pipe, teacher
    gc.collect()
    return results


def _check_same_settings(saved: dict, settings: dict, where: str) -> None:
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        raise ValueError(f"--resume: the config differs from the run in {where} in {differ}; use the same config "
                         "or a fresh --output_dir")


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)  # never a half-written results file


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_folder(folder: str, captions: list[str], config: ShapesDistillConfig, max_sequence_length: int,
                    long_frames: int) -> dict:
    """The student recipe's protocol on a saved pipeline: training length, and per chunk at ``long_frames``."""
    from diffusers_raven import CausalVideoPipeline

    pipe = CausalVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = evaluate_pipeline_lengths(pipe, captions, config.num_frames, long_frames, config.height, config.width,
                                    config.eval_seed, max_sequence_length)
    del pipe
    gc.collect()
    return out


def drift(long_eval: dict) -> dict:
    """Per-chunk semantic accuracy, PSNR and physics at the long length, and the change from first to last chunk."""
    chunks = long_eval["per_chunk"]
    out = {k: [c[k] for c in chunks] for k in ("semantic_accuracy", "psnr", "physics_accuracy")}
    for k in ("semantic_accuracy", "psnr"):
        values = out[k]
        out[f"{k}_last_minus_first"] = (None if not values or values[0] is None or values[-1] is None
                                        else values[-1] - values[0])
    return out


def cached_eval(path: str, key: str, settings: dict, compute) -> dict:
    """``compute()``, stored under ``key`` of the JSON file ``path`` with ``settings``; reused when they match."""
    data = {}
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        if data.get(f"{key}_settings") == settings and key in data:
            print(f"  (evaluation reused from {path})", flush=True)
            return data[key]
    data.update({key: compute(), f"{key}_settings": settings})
    _write_json(path, data)
    return data[key]


# ------------------------------------------------------------------------------------------------ report
def markdown_table(report: dict) -> str:
    """One row per model: budget use, training-length metrics and the first-to-last-chunk change at 4x length."""
    factor = report["config"]["long_video_factor"]
    header = ("| model | generator steps | training s | s/step | semantic acc. | PSNR (dB) | physics acc. | "
              f"consistency | {factor}x semantic acc. | {factor}x PSNR (dB) | {factor}x semantic, last − first chunk "
              f"| {factor}x PSNR, last − first chunk (dB) |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    rows = []
    if report.get("student") is not None:
        rows.append(("starting student (ODE init.)", None, report["student"]))
    rows += [(mode, m, m) for mode, m in report["modes"].items()]
    for name, train, entry in rows:
        ev, dr = entry["eval"], entry["drift"]
        short, long = ev["train_length"], ev["long"]
        steps = "0" if train is None else str(train["generator_steps"])
        seconds = "–" if train is None else f"{train['train_seconds']:.1f}"
        per_step = "–" if train is None else f"{train['seconds_per_step']:.2f}"
        lines.append(
            f"| {name} | {steps} | {seconds} | {per_step} | {format_metric(short['semantic_accuracy'])} | "
            f"{format_metric(short['psnr'], 2)} | {format_metric(short['physics_accuracy'])} | "
            f"{format_metric(short['consistency'])} | {format_metric(long['semantic_accuracy'])} | "
            f"{format_metric(long['psnr'], 2)} | {format_metric(dr['semantic_accuracy_last_minus_first'])} | "
            f"{format_metric(dr['psnr_last_minus_first'], 2)} |"
        )
    budget = report["budget"]
    note = (f"Equal compute: {budget['minutes']:g} min of training time per mode (cap {budget['max_steps']} steps)"
            if budget["kind"] == "time" else f"Equal compute: {budget['max_steps']} generator steps per mode")
    return "\n".join([*lines, "", f"{note}; {report['num_eval_videos']} held-out captions; training length "
                      f"{report['train_num_frames']} frames, long length {report['long_num_frames']} frames."]) + "\n"


def plot_drift(report: dict, path: str) -> str:
    """Per-chunk semantic accuracy and PSNR at the long length, one line per mode plus the starting student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    series = [(mode, entry["drift"], "-") for mode, entry in report["modes"].items()]
    if report.get("student") is not None:
        series.insert(0, ("starting student", report["student"]["drift"], "--"))
    markers = "osD^vP"
    for ax, key, label in ((axes[0], "semantic_accuracy", "semantic accuracy"), (axes[1], "psnr", "PSNR (dB)")):
        for i, (name, dr, style) in enumerate(series):
            values = [float("nan") if v is None else v for v in dr[key]]
            ax.plot(range(len(values)), values, style, marker=markers[i % len(markers)], label=name, alpha=0.85,
                    color="gray" if style == "--" else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(report["train_num_chunks"] - 0.5, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"chunk index ({report['long_num_frames']}-frame videos; dotted: training length)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ShapesWorld drift at {report['config']['long_video_factor']}x the training length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def _existing_outputs(config: ShapesDistillConfig) -> list[str]:
    paths = []
    for mode in config.modes:
        paths += list(mode_dirs(config.output_dir, mode))
    return [p for p in paths if os.path.exists(p)]


def _fingerprint(folder: str) -> dict:
    """Path, size and modification time of a pipeline's transformer weights (a cached evaluation is reused only for
    the same weights)."""
    weights = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    stat = os.stat(weights) if os.path.isfile(weights) else None
    return {"path": os.path.abspath(folder), "size": stat and stat.st_size, "mtime": stat and stat.st_mtime}


def main(argv: list[str] | None = None) -> dict:
    config, cli = parse_recipe_args((ShapesDistillConfig, ShapesDistillScriptArguments), argv, description=__doc__)
    command = " ".join(["python", "trainers/shapes_distill.py", *(sys.argv[1:] if argv is None else argv)])
    try:  # fail now rather than after the training
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError("the drift plot needs matplotlib: pip install 'diffusers-raven[training]'") from error
    check_inputs(config)
    if not cli.resume and _existing_outputs(config):
        raise ValueError(f"outputs of an earlier run exist ({_existing_outputs(config)}); pass --resume to continue "
                         "it or choose a fresh --output_dir")
    torch.set_num_threads(config.num_threads)
    os.makedirs(config.output_dir, exist_ok=True)
    start = time.perf_counter()

    from diffusers_raven import CausalVideoPipeline

    student = CausalVideoPipeline.from_pretrained(config.student_path)
    max_sequence_length = config.max_sequence_length or student.tokenizer.model_max_length
    latent_frames = student.latent_frames_for(config.num_frames)
    if latent_frames % student.chunk_frames:
        raise ValueError(f"num_frames={config.num_frames} gives {latent_frames} latent frames, not a whole number of "
                         f"the student's {student.chunk_frames}-frame chunks")
    train_chunks = latent_frames // student.chunk_frames
    long_frames = long_video_frames(student, config.num_frames, config.long_video_factor)
    num_parameters = sum(p.numel() for p in student.transformer.parameters())
    del student
    prompts = training_prompts(config)
    eval_captions = held_out_captions(config.eval_num_videos, config.eval_seed, config.height, config.width)
    print(f"student: {num_parameters:,} parameters; modes {config.modes}; budget "
          + (f"{config.time_budget_minutes:g} min of training time per mode (cap {config.max_steps} steps)"
             if config.budget == "time" else f"{config.max_steps} generator steps per mode"), flush=True)

    # 1. train every mode (skipping the finished ones of a resumed run)
    trained: dict[str, dict] = {}
    for mode in config.modes:
        pipeline_dir, _ = mode_dirs(config.output_dir, mode)
        results_path = os.path.join(pipeline_dir, RESULTS_FILE)
        if cli.resume and os.path.isfile(results_path):
            with open(results_path) as f:
                trained[mode] = json.load(f)
            _check_same_settings(trained[mode]["settings"], {"mode": mode, **config.training_settings()},
                                 pipeline_dir)
            print(f"{mode}: finished earlier ({trained[mode]['generator_steps']} steps), skipped", flush=True)
            continue
        print(f"{mode}: training", flush=True)
        trained[mode] = train_mode(config, mode, prompts, max_sequence_length, cli.resume)

    # 2. evaluate the starting student and every mode with the student recipe's protocol
    eval_settings = {**config.eval_settings(), "max_sequence_length": max_sequence_length,
                     "evaluator": evaluator_fingerprint()}
    report: dict = {
        "config": asdict(config),
        "command": command,
        "student_path": config.student_path,
        "teacher_path": config.teacher_path,
        "num_parameters": num_parameters,
        "budget": {"kind": config.budget, "minutes": config.time_budget_minutes if config.budget == "time" else None,
                   "max_steps": config.max_steps,
                   "definition": ("the same training time per mode (summed duration of its training steps, one "
                                  "process after another, same threads), capped by max_steps"
                                  if config.budget == "time" else "the same number of generator steps per mode")},
        "num_prompts": len(prompts),
        "num_eval_videos": len(eval_captions),
        "eval_captions": eval_captions,
        "train_num_frames": config.num_frames,
        "train_num_chunks": train_chunks,
        "long_num_frames": long_frames,
        "max_sequence_length": max_sequence_length,
        "student": None,
        "modes": {},
    }
    if config.eval_student:
        print("starting student:", flush=True)
        ev = cached_eval(os.path.join(config.output_dir, STUDENT_EVAL_FILE), "eval",
                         {**eval_settings, "student": _fingerprint(config.student_path)},
                         lambda: evaluate_folder(config.student_path, eval_captions, config, max_sequence_length,
                                                 long_frames))
        report["student"] = {"eval": ev, "drift": drift(ev["long"])}
    for mode, train in trained.items():
        print(f"{mode}:", flush=True)
        folder = train["pipeline_dir"]
        ev = cached_eval(os.path.join(folder, RESULTS_FILE), "eval", eval_settings,
                         lambda folder=folder: evaluate_folder(folder, eval_captions, config, max_sequence_length,
                                                               long_frames))
        report["modes"][mode] = {**{k: v for k, v in train.items() if k not in ("eval", "eval_settings")},
                                 "eval": ev, "drift": drift(ev["long"])}

    # 3. the table, the plot and the metrics file
    table = markdown_table(report)
    with open(os.path.join(config.output_dir, "distill_table.md"), "w") as f:
        f.write(table)
    print(table, flush=True)
    report["plot"] = plot_drift(report, os.path.join(config.output_dir, "distill_drift.png"))
    report["total_wall_seconds_this_run"] = round(time.perf_counter() - start, 1)
    metrics_path = os.path.join(config.output_dir, "distill_metrics.json")
    _write_json(metrics_path, report)
    print(f"done in {report['total_wall_seconds_this_run']:.0f} s; metrics in {metrics_path}", flush=True)
    return report


if __name__ == "__main__":
    main()
