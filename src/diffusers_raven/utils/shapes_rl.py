"""What the ShapesWorld RL recipes share (``trainers/shapes_grpo.py``, ``trainers/shapes_kvpo.py``).

Both train a reward trainer of this package from a distilled model with the ShapesWorld evaluator as the reward, for a
budget of training time, and evaluate the starting and the trained model on held-out captions before and after:

- :class:`ShapesRLArguments`: the recipe's own settings (start, prompts, reward weights, LoRA, budget, evaluation);
- :func:`training_captions`, :func:`reward_functions`, :func:`lora_config`: the prompts, rewards and adapter;
- :func:`run_recipe`: resume or refuse to overwrite, evaluate the start, train under the time budget while logging the
  reward against training time (:class:`~diffusers_raven.utils.recipes.RewardClock`), fuse and save the pipeline,
  evaluate it, write the results JSON.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..shapes import (
    caption,
    evaluate_pipeline_lengths,
    evaluator_fingerprint,
    held_out_captions,
    long_video_frames,
    sample_scene,
)
from .recipes import RewardClock, TrainingTimeBudget


@dataclass
class ShapesRLArguments:
    """What an RL recipe sets around its trainer (the trainer's own settings are its config's)."""

    model_path: str = field(default="bundled", metadata={"help": "Starting pipeline: a folder, or 'bundled'."})
    num_prompts: int = field(default=2048, metadata={"help": "Training-split captions."})
    prompt_seed: int = field(default=0, metadata={"help": "First scene seed of the training captions."})
    semantic_weight: float = field(default=1.0, metadata={"help": "Weight of semantic_reward (the aim)."})
    motion_weight: float = field(default=0.25, metadata={"help": "Weight of motion_reward (keeps videos moving)."})
    fidelity_weight: float = field(default=0.25, metadata={"help": "Weight of fidelity_reward (keeps them sharp)."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank (0: train every weight)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
        metadata={"help": "Modules the adapter wraps (every linear of the blocks by default)."},
    )
    time_budget_minutes: float = field(default=60.0, metadata={"help": "Training time (summed step durations)."})
    eval_num_videos: int = field(default=32, metadata={"help": "Held-out captions of the recipe's evaluation."})
    eval_seed: int = field(default=1000000000, metadata={"help": "First scene seed of the held-out captions."})
    long_video_factor: int = field(default=4, metadata={"help": "Long-video length, in training lengths (≥ 1)."})
    num_threads: int = field(default=1, metadata={"help": "torch threads."})
    resume: str | None = field(default=None, metadata={"help": "'last' or a checkpoint folder to continue from."})


def training_captions(num_prompts: int, prompt_seed: int, height: int, width: int) -> list[str]:
    """``caption(sample_scene(prompt_seed + i, split="train"))`` for ``i < num_prompts``."""
    return [caption(sample_scene(prompt_seed + i, split="train", height=height, width=width))
            for i in range(num_prompts)]


def reward_functions(args: ShapesRLArguments) -> tuple[list[Callable], list[float]]:
    """The reward functions with a nonzero weight (semantic, motion, fidelity) and their weights."""
    from ..rewards import fidelity_reward, motion_reward, semantic_reward

    weights = [args.semantic_weight, args.motion_weight, args.fidelity_weight]
    funcs = [f for f, w in zip((semantic_reward, motion_reward, fidelity_reward), weights) if w]
    return funcs, [w for w in weights if w]


def lora_config(args: ShapesRLArguments):
    """The LoRA adapter of ``args`` (``None`` for ``lora_rank=0``: every weight trains)."""
    if not args.lora_rank:
        return None
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules,
                      init_lora_weights=True)


def evaluate_held_out(pipe, args: ShapesRLArguments, num_frames: int, height: int, width: int,
                      max_sequence_length: int | None) -> dict[str, Any]:
    """``evaluate_pipeline_lengths`` on ``eval_num_videos`` held-out captions at ``num_frames`` (``"train_length"``)
    and ``long_video_factor`` times its latent frames (``"long"``)."""
    captions = held_out_captions(args.eval_num_videos, args.eval_seed, height, width)
    long_frames = long_video_frames(pipe, num_frames, args.long_video_factor)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_pipeline_lengths(pipe, captions, num_frames, long_frames, height, width, args.eval_seed,
                                     pipe.default_max_sequence_length(max_sequence_length))


def run_recipe(script: str, argv: list[str] | None, args: ShapesRLArguments, config, pipe, description: str,
               make_trainer: Callable[[list], Any], results_file: str, eval_num_frames: int,
               extra_results: dict[str, Any] | None = None, clock_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train and evaluate as the RL recipes do (see the module docstring); returns the results written to
    ``output_dir/results_file``.

    ``make_trainer(callbacks)`` builds the trainer on ``pipe`` with those callbacks (the time budget and the reward
    clock); it is called after the start is evaluated, since a LoRA adapter is added to ``pipe``'s transformer in
    place. ``eval_num_frames`` is the short evaluation length (the long one is ``long_video_factor`` times it);
    ``clock_keys`` are logged metrics the reward clock records besides the ``reward*`` ones."""
    from transformers.trainer_utils import get_last_checkpoint

    from ..pipelines import CausalVideoPipeline

    height = config.height or pipe.default_height
    width = config.width or pipe.default_width
    results_path = os.path.join(config.output_dir, results_file)
    resume = args.resume
    if resume == "last":
        resume = get_last_checkpoint(config.output_dir)
        if resume is None:
            raise SystemExit(f"--resume last: no checkpoint in {config.output_dir}")
    start_eval = None
    if os.path.exists(results_path):
        if resume is None:
            raise SystemExit(f"{results_path} exists: pass --resume last to continue, or another --output_dir")
        start_eval = json.load(open(results_path)).get("start_eval")
    if start_eval is None and args.eval_num_videos:
        start_eval = evaluate_held_out(pipe, args, eval_num_frames, height, width, config.max_sequence_length)

    budget = TrainingTimeBudget(60.0 * args.time_budget_minutes, resume)
    clock = RewardClock(budget, resume, clock_keys)
    trainer = make_trainer([budget, clock])
    wall = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - wall
    steps = trainer.state.global_step
    folder = trainer.save_pipeline(os.path.join(config.output_dir, "pipeline"))
    del trainer
    gc.collect()

    trained = CausalVideoPipeline.from_pretrained(folder)
    end_eval = (evaluate_held_out(trained, args, eval_num_frames, height, width, config.max_sequence_length)
                if args.eval_num_videos else None)
    results = {
        "command": "python " + " ".join(sys.argv if argv is None else [script, *argv]),
        "script_args": asdict(args),
        "config": {k: v for k, v in config.to_dict().items() if "token" not in k},
        "start": description,
        "pipeline": folder,
        "evaluator": evaluator_fingerprint(),
        "steps": steps,
        "train_seconds": round(budget.elapsed, 3),
        "stopped_by_budget": budget.stopped,
        "wall_seconds_this_run": round(wall, 1),
        "reward_curve": clock.points,
        **(extra_results or {}),
        "start_eval": start_eval,
        "end_eval": end_eval,
    }
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
    if start_eval and end_eval:
        for name in ("train_length", "long"):
            print(f"{name}: semantic {start_eval[name]['semantic_accuracy']:.3f} -> "
                  f"{end_eval[name]['semantic_accuracy']:.3f}, psnr {start_eval[name]['psnr']:.2f} -> "
                  f"{end_eval[name]['psnr']:.2f}", flush=True)
    print(f"wrote {results_path}", flush=True)
    return results

