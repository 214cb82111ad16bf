"""ShapesWorld model chain, RL stage: KVPO (exploration by KV-cache routing) on long videos from a distilled model,
with the ShapesWorld evaluator as the reward; single-prompt or multi-prompt (a prompt schedule that switches
mid-video).

    python trainers/shapes_kvpo.py --config trainers/shapes_kvpo.yaml                                  # single
    python trainers/shapes_kvpo.py --config trainers/shapes_kvpo.yaml --multi_prompt true --output_dir out/kvpo/multi
    python trainers/shapes_kvpo.py --config trainers/shapes_kvpo.yaml --resume last    # continue a killed run
    python trainers/shapes_kvpo.py --config trainers/shapes_kvpo.yaml --learning_rate 5e-4   # any field as a flag

The configuration is read as TRL's scripts read theirs: ``trl.TrlParser`` over this recipe's
:class:`ShapesKVPOArguments` and :class:`~diffusers_raven.KVPOConfig`, a YAML ``--config`` plus any field of either
as a flag; a misspelt key fails with the list of known ones.

1. Prompts: ``num_prompts`` training-split captions, ``caption(sample_scene(prompt_seed + i, split="train"))``. With
   ``multi_prompt``, row ``i`` is a schedule of two training-split captions of the same scene that differ in one
   attribute a viewer sees change (``schedule_attributes``, in turn: the direction or the colour of an object,
   ``edit_scene``), the second taking over at output frame ``switch_frame`` (:func:`caption_schedules`).
2. ``KVPOTrainer`` from ``model_path`` (default: the bundled model, in float32) on ``num_frames``-frame videos with
   the window, sinks and routing of :class:`KVPOConfig`, a LoRA adapter of rank ``lora_rank`` and the rewards
   ``semantic_reward``, ``motion_reward`` and ``fidelity_reward`` with the weights ``semantic_weight``,
   ``motion_weight``, ``fidelity_weight`` (global on the whole video, local on the routed stretch; a schedule's
   segments are scored against their own captions); ``time_budget_minutes`` of training time, ``max_steps`` as a cap.
3. The adapter fused into the weights, the pipeline is saved to ``output_dir/pipeline``; the starting model and the
   trained one are evaluated on ``eval_num_videos`` held-out captions at ``eval_num_frames`` and at
   ``long_video_factor`` times it (21 and 93 frames, as the CM-GRPO recipe;
   :func:`diffusers_raven.shapes.evaluate_pipeline_lengths`).

Outputs in ``output_dir``: ``kvpo_results.json`` (configuration, command, steps, training seconds, the reward of the
branches and of the unrouted anchor against training time and step, the evaluations) and the trainer's checkpoints.
The 128-caption paired comparison uses ``trainers/shapes_eval_chain.py`` on the saved pipelines
(``docs/experiments/shapesworld/shapes_kvpo.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffusers_raven import KVPOConfig, KVPOTrainer
from diffusers_raven.pipelines.presets import load_pipeline
from diffusers_raven.shapes import (
    EDITABLE_ATTRIBUTES,
    caption,
    edit_scene,
    is_held_out,
    long_video_frames,
    sample_scene,
)
from diffusers_raven.utils.shapes_rl import (
    ShapesRLArguments,
    lora_config,
    reward_functions,
    run_recipe,
    training_captions,
)

RESULTS_FILE = "kvpo_results.json"
#: Logged KVPO metrics the reward clock records besides TRL's reward metrics.
CLOCK_KEYS = ("kvpo/anchor_reward", "kvpo/local_reward", "kvpo/anchor_win_rate", "kvpo/skipped_updates", "kl")


@dataclass
class ShapesKVPOArguments(ShapesRLArguments):
    """What the recipe sets around the trainer (the trainer's own settings are :class:`KVPOConfig`'s): the fields the
    RL recipes share (:class:`~diffusers_raven.utils.shapes_rl.ShapesRLArguments`) and the prompt schedules."""

    eval_num_frames: int = field(
        default=21, metadata={"help": "Short evaluation length (the long one is long_video_factor times it)."}
    )
    multi_prompt: bool = field(default=False, metadata={"help": "Train on prompt schedules that switch mid-video."})
    switch_frame: int = field(default=45, metadata={"help": "Output frame at which a schedule's second caption starts."})
    schedule_attributes: list[str] = field(
        default_factory=lambda: ["direction", "color"],
        metadata={"help": "Attributes the second caption changes, row by row in turn (see edit_scene)."},
    )


def caption_schedules(num_prompts: int, prompt_seed: int, attributes: list[str], height: int,
                      width: int) -> list[list[str]]:
    """Row ``i``: ``[caption(scene), caption(edit_scene(scene, attribute))]`` with ``attribute =
    attributes[i % len(attributes)]``, both of the training split. The scene is ``sample_scene(prompt_seed + i,
    split="train")`` or, when its edit is a held-out combination, the next seed whose edit is not (seeds
    ``prompt_seed + i + num_prompts·j``, so rows never share a scene)."""
    schedules = []
    for i in range(num_prompts):
        attribute = attributes[i % len(attributes)]
        for j in range(1000):
            seed = prompt_seed + i + num_prompts * j
            scene = sample_scene(seed, split="train", height=height, width=width)
            edited = edit_scene(scene, attribute, seed=seed)
            if not is_held_out(edited):
                break
        else:  # pragma: no cover - every attribute of the world has training-split edits
            raise RuntimeError(f"no training-split edit of {attribute!r} found for row {i}")
        schedules.append([caption(scene), caption(edited)])
    return schedules


def main(argv: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import TrlParser

    parser = TrlParser((ShapesKVPOArguments, KVPOConfig))
    args, config = parser.parse_args_and_config(argv)
    if args.long_video_factor < 1:
        raise SystemExit(f"--long_video_factor must be at least 1, got {args.long_video_factor}")
    unknown = sorted(set(args.schedule_attributes) - set(EDITABLE_ATTRIBUTES))
    if args.multi_prompt and (unknown or not args.schedule_attributes):
        raise SystemExit(f"--schedule_attributes must name attributes of {EDITABLE_ATTRIBUTES}, got "
                         f"{args.schedule_attributes}")
    torch.set_num_threads(args.num_threads)
    pipe, description = load_pipeline(args.model_path, dtype=torch.float32)
    height = config.height or pipe.default_height
    width = config.width or pipe.default_width
    if args.multi_prompt:
        schedules = caption_schedules(args.num_prompts, args.prompt_seed, args.schedule_attributes, height, width)
        dataset = Dataset.from_dict({"prompt": schedules, "switch_frames": [[args.switch_frame]] * len(schedules)})
        kind = f"prompt schedules switching at frame {args.switch_frame} ({', '.join(args.schedule_attributes)})"
    else:
        dataset = Dataset.from_dict({"prompt": training_captions(args.num_prompts, args.prompt_seed, height, width)})
        kind = "training captions"
    print(f"start: {description}; {len(dataset)} {kind}; {config.num_frames} frames, window "
          f"{config.window_frames}, sinks {config.sink_frames}, {config.num_branches} branches", flush=True)

    funcs, config.reward_weights = reward_functions(args)

    def make_trainer(callbacks):
        trainer = KVPOTrainer(model=pipe, reward_funcs=funcs, args=config, peft_config=lora_config(args),
                              train_dataset=dataset, callbacks=callbacks)
        print(f"forks in chunks {trainer.fork_start_chunk}..{trainer.fork_end_chunk}, pool "
              f"{config.pool_frames} frames", flush=True)
        return trainer

    extra = {"eval_frames": {"train_length": args.eval_num_frames,
                             "long": long_video_frames(pipe, args.eval_num_frames, args.long_video_factor)}}
    if args.multi_prompt:
        extra["example_schedule"] = {"prompt": dataset[0]["prompt"], "switch_frames": dataset[0]["switch_frames"]}
    return run_recipe("trainers/shapes_kvpo.py", argv, args, config, pipe, description, make_trainer, RESULTS_FILE,
                      eval_num_frames=args.eval_num_frames, extra_results=extra, clock_keys=CLOCK_KEYS)


if __name__ == "__main__":
    main()
