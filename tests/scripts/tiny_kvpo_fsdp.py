"""Tiny distributed KVPOTrainer runs for tests/test_kvpo_fsdp.py: the same jobs under FSDP2 and under DDP, launched with
two CPU processes (gloo). Every rank writes ``<job>_rank<r>.json`` (full weights gathered through the trainer's own
export, the old-policy copy, the forks drawn, sharding facts); the test compares the files.

Jobs (``--jobs``, in order, in one process):

- ``kvpo``: tiny_kvpo's configuration (3 branches and an anchor per prompt, full weights, a frozen reference, beta 0.5)
  with one fork per generation batch (``fork_sampling='batch'``), two prompts per process and micro-batch (two
  energy passes with gradients before one backward), 2 PPO epochs per generation batch, the old policy synced every 2
  generation batches, 4 steps (2 generation batches), a checkpoint every step, the gradient of each prompt's 3
  branches by two backward passes (``branches_per_backward=2``: 2 branches, then 1);
- ``whole``: the same for 2 steps (one generation batch) with each micro-batch's loss in one backward pass;
- ``resume``: a fresh trainer of the same configuration resumed from ``kvpo``'s checkpoint-1 (between the two PPO
  epochs of the first generation batch: the buffered rollouts and the old-policy copy come from the checkpoint);
- ``stream``: ``kvpo``'s configuration fed from a streaming ``datasets.IterableDataset`` of the prompts ``kvpo`` drew,
  in its order;
- ``refuse``: what FSDP refuses, each error message noted: per-prompt forks, a prompt schedule.

FSDP is asked for by the launcher (``accelerate launch --config_file trainers/accelerate_configs/fsdp.yaml``) or by
``--fsdp`` (``fsdp``/``fsdp_config`` in the training arguments).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tiny_fsdp import FSDP_ARGS, drawn_prompts, flat, record  # noqa: E402
from tiny_kvpo import build  # noqa: E402

KVPO = dict(max_steps=4, save_steps=1, per_device_train_batch_size=2, ppo_epochs=2, old_policy_sync_every=2,
            fork_sampling="batch", branches_per_backward=2)


def forks(trainer) -> dict[int, list[int]]:
    """Wrap ``rollout_group`` to note the fork of every prompt this process rolls out, by generation batch."""
    seen = {}
    rollout_group = trainer.rollout_group

    def noting(text, sample, schedule=None):
        group = rollout_group(text, sample, schedule)
        seen.setdefault(trainer._generation, []).append(group["fork"])
        return group

    trainer.rollout_group = noting
    return seen


def old_policy(trainer) -> list[float]:
    """The old-policy copy, full (a collective under FSDP)."""
    from diffusers_raven.trainer import fsdp

    return flat({k: fsdp.full_tensor(v) for k, v in trainer._old_policy.tensors.items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--jobs", default="kvpo,whole,resume,stream,refuse")
    parser.add_argument("--fsdp", action="store_true", help="ask for FSDP in the training arguments")
    a = parser.parse_args()
    extra = FSDP_ARGS if a.fsdp else {}
    jobs = a.jobs.split(",")
    global_prompts = None
    out = os.path.join(a.output_dir, "kvpo")
    if "kvpo" in jobs:
        trainer = build(out, **KVPO, **extra)
        seen, drawn = drawn_prompts(trainer), forks(trainer)
        trainer.train()
        gathered = [None] * trainer.args.world_size
        torch.distributed.all_gather_object(gathered, seen)
        global_prompts = [p for generation in zip(*gathered) for rows in generation for p in rows]
        record(trainer, a.output_dir, "kvpo", prompts=global_prompts, forks=drawn, old_policy=old_policy(trainer))
    if "whole" in jobs:
        trainer = build(os.path.join(a.output_dir, "whole"), **{**KVPO, "max_steps": 2, "save_steps": 10,
                                                                 "branches_per_backward": None}, **extra)
        trainer.train()
        record(trainer, a.output_dir, "whole")
    if "resume" in jobs:
        trainer = build(out, **KVPO, **extra)
        drawn = forks(trainer)
        trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-1"))
        record(trainer, a.output_dir, "resume", forks=drawn, old_policy=old_policy(trainer))
    if "stream" in jobs and global_prompts is not None:
        from datasets import IterableDataset

        def rows(prompts):
            yield from ({"prompt": p} for p in prompts)

        stream = IterableDataset.from_generator(rows, gen_kwargs={"prompts": global_prompts})
        trainer = build(os.path.join(a.output_dir, "stream"), **{**KVPO, "save_steps": 10}, train_dataset=stream,
                        **extra)
        trainer.train()
        record(trainer, a.output_dir, "stream", old_policy=old_policy(trainer))
    if "refuse" in jobs:
        from datasets import Dataset

        errors = {}
        refused = {
            "fork_sampling": dict(fork_sampling="prompt"),
            "schedule": dict(fork_sampling="batch", train_dataset=Dataset.from_dict(
                {"prompt": [["a red circle", "a blue square"]] * 2, "switch_frames": [[57]] * 2})),
        }
        for name, overrides in refused.items():
            try:
                build(os.path.join(a.output_dir, "refuse"), **overrides, **extra)
            except ValueError as error:
                errors[name] = str(error)
        with open(os.path.join(a.output_dir, f"refuse_rank{torch.distributed.get_rank()}.json"), "w") as f:
            json.dump(errors, f)


if __name__ == "__main__":
    main()
