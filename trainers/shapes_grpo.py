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
``trainers/shapes_eval_chain.py`` on the saved pipelines (commands in ``docs/experiments/shapesworld/shapes_rl.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusers_raven import CMGRPOConfig, CMGRPOTrainer
from diffusers_raven.pipelines.presets import load_pipeline
from diffusers_raven.utils.shapes_rl import (
    ShapesRLArguments,
    lora_config,
    reward_functions,
    run_recipe,
    training_captions,
)

RESULTS_FILE = "grpo_results.json"


@dataclass
class ShapesGRPOArguments(ShapesRLArguments):
    """What the recipe sets around the trainer (the trainer's own settings are :class:`CMGRPOConfig`'s): the fields
    the RL recipes share (:class:`~diffusers_raven.utils.shapes_rl.ShapesRLArguments`)."""


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import TrlParser

    parser = TrlParser((ShapesGRPOArguments, CMGRPOConfig))
    args, config = parser.parse_args_and_config(argv)
    if args.long_video_factor < 1:
        raise SystemExit(f"--long_video_factor must be at least 1, got {args.long_video_factor}")
    torch.set_num_threads(args.num_threads)
    pipe, description = load_pipeline(args.model_path, dtype=torch.float32)
    height = config.height or pipe.default_height
    width = config.width or pipe.default_width
    prompts = training_captions(args.num_prompts, args.prompt_seed, height, width)
    print(f"start: {description}; {len(prompts)} training captions; sampler {config.sampler}", flush=True)

    funcs, config.reward_weights = reward_functions(args)

    def make_trainer(callbacks):
        return CMGRPOTrainer(model=pipe, reward_funcs=funcs, args=config, peft_config=lora_config(args),
                             train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=callbacks)

    return run_recipe("trainers/shapes_grpo.py", argv, args, config, pipe, description, make_trainer, RESULTS_FILE,
                      eval_num_frames=config.num_frames)


if __name__ == "__main__":
    main()
