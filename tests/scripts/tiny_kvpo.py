"""A tiny KVPOTrainer run, used by the tests (in-process and as a subprocess that is killed and resumed, or run by
torchrun on two processes)."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from tiny_cmgrpo import brightness, redness  # noqa: E402

__all__ = ["brightness", "build", "losses", "redness"]


def build(output_dir: str, max_steps: int = 2, save_steps: int = 1, reward_funcs=None, peft_config=None,
          train_dataset=None, **overrides):
    """A 6-chunk video (18 latent frames, 3-frame chunks) of 32×32 pixels, 3 branches, a 2-chunk routed stretch, a
    window of 9 frames with 1 sink and a pool of 12 (3 older frames beyond the window's 8); four prompts unless
    ``train_dataset`` is given."""
    from datasets import Dataset

    from diffusers_raven import KVPOConfig, KVPOTrainer
    from test_pipeline import make_pipeline

    pipe = make_pipeline()
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    settings = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=1, num_frames=69, height=32,
        width=32, max_sequence_length=16, logging_steps=1, save_steps=save_steps, use_cpu=True, learning_rate=1e-3,
        seed=0, num_branches=3, routed_chunks=2, selected_frames=2, recent_frames=4, window_frames=9, sink_frames=1,
        pool_frames=12, fork_start_chunk=2, beta=0.5,
    )
    args = KVPOConfig(**{**settings, **overrides})
    funcs = reward_funcs if reward_funcs is not None else [brightness, redness]
    dataset = train_dataset if train_dataset is not None else Dataset.from_dict({"prompt": prompts})
    return KVPOTrainer(model=pipe, reward_funcs=funcs, args=args, train_dataset=dataset, peft_config=peft_config)


def losses(trainer) -> list[float]:
    return [h["kvpo/loss"] for h in trainer.state.log_history if "kvpo/loss" in h]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    a = parser.parse_args()
    trainer = build(a.output_dir, a.max_steps, ppo_epochs=a.ppo_epochs)
    trainer.train(resume_from_checkpoint=a.resume)
    rank = trainer.args.process_index
    weights = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
    with open(os.path.join(a.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"weights": weights.tolist(), "world_size": trainer.args.world_size}, f)
    if rank == 0:
        with open(os.path.join(a.output_dir, "losses.json"), "w") as f:
            json.dump({"losses": losses(trainer), "log": trainer.state.log_history}, f)
