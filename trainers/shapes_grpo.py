"""ShapesWorld model chain, RL stage: CM-GRPO (or its Flow-GRPO baseline) from a distilled model, with the
ShapesWorld evaluator as the reward.

    python trainers/shapes_grpo.py --config trainers/shapes_grpo.yaml
    python trainers/shapes_grpo.py --config trainers/shapes_grpo.yaml --sampler sde --output_dir out/grpo/sde
    python trainers/shapes_grpo.py --config trainers/shapes_grpo.yaml --resume last        # continue a killed run
    python trainers/shapes_grpo.py --config trainers/shapes_grpo.yaml --learning_rate 5e-5 # any field as a flag

The configuration is read as TRL's scripts read theirs: ``trl.TrlParser`` over this recipe's
:class:`ShapesGRPOArguments` and :class:`~diffusers_raven.CMGRPOConfig`, a YAML ``--config`` plus any field of either
as a flag; a misspelt key fails with the list of known ones.

1. Prompts: ``num_prompts`` training-split captions, ``caption(sample_scene(prompt_seed + i, split="train"))``.
2. ``CMGRPOTrainer`` from ``model_path`` (default: the bundled model, in float32), with a LoRA adapter of rank
   ``lora_rank`` (0: all weights) and the rewards ``semantic_reward`` (the evaluator's semantic accuracy, the aim),
   ``motion_reward`` and ``fidelity_reward`` (guards that keep videos moving and sharp, METHOD §8) with the weights
   ``semantic_weight``, ``motion_weight``, ``fidelity_weight``; ``time_budget_minutes`` of training time (summed step
   durations: rollouts, rewards, updates; checkpoint writing does not count), ``max_steps`` as a cap.
3. The adapter fused into the weights, the pipeline is saved to ``output_dir/pipeline``; the starting model and the
   trained one are evaluated on ``eval_num_videos`` held-out captions at the training length and at
   ``long_video_factor`` times it (:func:`diffusers_raven.shapes.evaluate_pipeline_lengths`).

Outputs in ``output_dir``: ``grpo_results.json`` (configuration, command, steps, training seconds, the reward against
training time and step, the evaluations) and the trainer's checkpoints. The 128-caption paired comparison uses
``trainers/shapes_eval_chain.py`` on the saved pipelines (commands in ``docs/shapes_rl.md``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from diffusers_raven import CMGRPOConfig, CMGRPOTrainer
from diffusers_raven.pipelines.presets import load_pipeline
from diffusers_raven.rewards import fidelity_reward, motion_reward, semantic_reward
from diffusers_raven.shapes import (
    caption,
    evaluate_pipeline_lengths,
    evaluator_fingerprint,
    held_out_captions,
    long_video_frames,
    sample_scene,
)
from diffusers_raven.utils.recipes import TrainingTimeBudget

RESULTS_FILE = "grpo_results.json"


@dataclass
class ShapesGRPOArguments:
    """What the recipe sets around the trainer (the trainer's own settings are :class:`CMGRPOConfig`'s)."""

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


class RewardClock(TrainerCallback):
    """The logged reward against training time (from the budget) and step: the curve the comparison plots. Saved
    in every checkpoint and read back on resume, so a resumed run's curve is whole."""

    FILE = "reward_clock.json"

    def __init__(self, budget: TrainingTimeBudget, resume_from: str | None = None) -> None:
        self.budget, self.points = budget, []
        if resume_from is not None and os.path.isfile(os.path.join(resume_from, self.FILE)):
            with open(os.path.join(resume_from, self.FILE)) as f:
                self.points = json.load(f)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            point = {"step": state.global_step, "train_seconds": round(self.budget.elapsed, 2)}
            point.update({k: logs[k] for k in logs if k.startswith("reward") or k == "frac_reward_zero_std"})
            self.points.append(point)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, self.FILE), "w") as f:
                json.dump(self.points, f)


def training_captions(args: ShapesGRPOArguments, height: int, width: int) -> list[str]:
    return [caption(sample_scene(args.prompt_seed + i, split="train", height=height, width=width))
            for i in range(args.num_prompts)]


def evaluate(pipe, args: ShapesGRPOArguments, config: CMGRPOConfig, height: int, width: int) -> dict:
    captions = held_out_captions(args.eval_num_videos, args.eval_seed, height, width)
    long_frames = long_video_frames(pipe, config.num_frames, args.long_video_factor)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_pipeline_lengths(pipe, captions, config.num_frames, long_frames, height, width, args.eval_seed,
                                     pipe.default_max_sequence_length(config.max_sequence_length))


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import TrlParser

    parser = TrlParser((ShapesGRPOArguments, CMGRPOConfig))
    args, config = parser.parse_args_and_config(argv)
    if args.long_video_factor < 1:
        raise SystemExit(f"--long_video_factor must be at least 1, got {args.long_video_factor}")
    torch.set_num_threads(args.num_threads)
    pipe, description = load_pipeline(args.model_path, torch_dtype=torch.float32)
    height = config.height or pipe.default_height
    width = config.width or pipe.default_width
    prompts = training_captions(args, height, width)
    print(f"start: {description}; {len(prompts)} training captions; sampler {config.sampler}", flush=True)

    results_path = os.path.join(config.output_dir, RESULTS_FILE)
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
        start_eval = evaluate(pipe, args, config, height, width)

    weights = [args.semantic_weight, args.motion_weight, args.fidelity_weight]
    funcs = [f for f, w in zip((semantic_reward, motion_reward, fidelity_reward), weights) if w]
    config.reward_weights = [w for w in weights if w]
    lora = None
    if args.lora_rank:
        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules,
                          init_lora_weights=True)
    budget = TrainingTimeBudget(60.0 * args.time_budget_minutes, resume)
    clock = RewardClock(budget, resume)
    trainer = CMGRPOTrainer(model=pipe, reward_funcs=funcs, args=config, peft_config=lora,
                            train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[budget, clock])
    wall = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - wall
    steps = trainer.state.global_step
    folder = trainer.save_pipeline(os.path.join(config.output_dir, "pipeline"))
    del trainer
    gc.collect()

    from diffusers_raven import CausalVideoPipeline

    trained = CausalVideoPipeline.from_pretrained(folder)
    end_eval = evaluate(trained, args, config, height, width) if args.eval_num_videos else None
    results = {
        "command": "python " + " ".join(sys.argv if argv is None else ["trainers/shapes_grpo.py", *argv]),
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


if __name__ == "__main__":
    main()
