"""A tiny RavenTrainer run, used by the tests (in-process and as a subprocess that is killed and resumed)."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def build(output_dir: str, history: str = "raven", max_steps: int = 2, save_steps: int = 1, train_dataset=None,
          **overrides):
    from datasets import Dataset
    from diffusers import WanTransformer3DModel

    from diffusers_raven import RavenConfig, RavenTrainer
    from diffusers_raven.utils.tiny import tiny_transformer_config
    from test_pipeline import make_pipeline

    pipe = make_pipeline()
    torch.manual_seed(1)
    teacher = WanTransformer3DModel(**tiny_transformer_config())
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    columns = {"prompt": prompts}
    if history == "teacher_forcing":
        g = torch.Generator().manual_seed(2)
        columns["latents"] = [torch.randn(4, 6, 4, 4, generator=g).tolist() for _ in prompts]
    settings = dict(
        output_dir=output_dir, history=history, max_steps=max_steps, per_device_train_batch_size=1, num_frames=21,
        height=32, width=32, max_sequence_length=16, logging_steps=1, save_steps=save_steps, use_cpu=True,
        learning_rate=1e-3, critic_learning_rate=1e-3, critic_updates_per_generator_update=1, seed=0,
    )
    args = RavenConfig(**{**settings, **overrides})
    dataset = train_dataset if train_dataset is not None else Dataset.from_dict(columns)
    return RavenTrainer(model=pipe, teacher=teacher, args=args, train_dataset=dataset)


def losses(trainer) -> list[float]:
    return [h["dmd/loss"] for h in trainer.state.log_history if "dmd/loss" in h]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--history", default="raven")
    a = parser.parse_args()
    trainer = build(a.output_dir, a.history, a.max_steps)
    trainer.train(resume_from_checkpoint=a.resume)
    rank = trainer.args.process_index
    if trainer.args.world_size > 1:  # what each process ends with, for the distributed test
        weights = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
        with open(os.path.join(a.output_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"weights": weights.tolist(), "exit_steps": trainer.exit_steps,
                       "world_size": trainer.args.world_size}, f)
    if rank == 0:
        with open(os.path.join(a.output_dir, "losses.json"), "w") as f:
            json.dump({"losses": losses(trainer), "log": trainer.state.log_history}, f)
