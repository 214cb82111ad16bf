"""A tiny CMGRPOTrainer run, used by the tests (in-process and as a subprocess that is killed and resumed)."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def brightness(prompts, videos, **columns):
    """Mean pixel value: a reward a tiny random model can move."""
    return [float(v.mean()) for v in videos]


def redness(prompts, videos, **columns):
    """Red channel minus the others, only for prompts that ask for red (None otherwise)."""
    return [float(v[:, 0].mean() - v[:, 1:].mean()) if "red" in p else None for p, v in zip(prompts, videos)]


def build(output_dir: str, max_steps: int = 2, save_steps: int = 1, reward_funcs=None, peft_config=None,
          **overrides):
    from datasets import Dataset

    from diffusers_raven import CMGRPOConfig, CMGRPOTrainer
    from test_pipeline import make_pipeline

    pipe = make_pipeline()
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    settings = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=2, num_generations=2, num_frames=21,
        height=32, width=32, max_sequence_length=16, logging_steps=1, save_steps=save_steps, use_cpu=True,
        learning_rate=1e-3, seed=0,
    )
    args = CMGRPOConfig(**{**settings, **overrides})
    funcs = reward_funcs if reward_funcs is not None else [brightness, redness]
    return CMGRPOTrainer(model=pipe, reward_funcs=funcs, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                         peft_config=peft_config)


def losses(trainer) -> list[float]:
    return [h["policy/loss"] for h in trainer.state.log_history if "policy/loss" in h]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--sampler", default="consistency")
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--per-device-batch", type=int, default=2)
    a = parser.parse_args()
    trainer = build(a.output_dir, a.max_steps, sampler=a.sampler, num_iterations=a.num_iterations,
                    per_device_train_batch_size=a.per_device_batch)
    trainer.train(resume_from_checkpoint=a.resume)
    rank = trainer.args.process_index
    weights = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
    with open(os.path.join(a.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"weights": weights.tolist(), "world_size": trainer.args.world_size}, f)
    if rank == 0:
        with open(os.path.join(a.output_dir, "losses.json"), "w") as f:
            json.dump({"losses": losses(trainer), "log": trainer.state.log_history}, f)
