"""Tiny distributed runs for tests/test_fsdp.py: the same jobs under FSDP2 and under DDP, launched with two CPU
processes (gloo). Every rank writes ``<job>_rank<r>.json`` with what it ended with (full weights gathered through the
trainer's own export, EMA, critic, sharding facts); the test compares the files.

Jobs (``--jobs``, in order, in one process):

- ``raven``: RavenTrainer (interleaved history, EMA, critic), 3 steps, two micro-steps per generation batch (so
  checkpoint-1 falls in the middle of one), a checkpoint every step, ``save_model`` at the end;
- ``resume``: a fresh RavenTrainer of the same configuration resumed from ``raven``'s checkpoint-1;
- ``lora``: CMGRPOTrainer with a LoRA adapter, one group of 2 rollouts split across the processes, 2 steps,
  ``save_model`` at the end;
- ``stream``: ``raven``'s configuration fed from a streaming ``datasets.IterableDataset`` that yields the prompts
  ``raven`` drew, in its order, with a 2-prompt embedding cache.

FSDP is asked for either by ``--fsdp`` (``fsdp``/``fsdp_config`` in the training arguments) or by the launcher
(``accelerate launch --config_file trainers/accelerate_configs/fsdp.yaml``).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FSDP_ARGS = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["WanTransformerBlock"]})
RAVEN = dict(max_steps=3, save_steps=1, ema_decay=0.9, steps_per_generation=2)


def flat(state: dict) -> list[float]:
    return torch.cat([v.detach().float().flatten() for v in state.values()]).tolist()


def sharding(module) -> dict:
    """Whether every WanTransformerBlock of ``module`` is an FSDP2 unit and how much of each parameter this process
    holds."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    blocks = [m for m in module.modules() if isinstance(m, WanTransformerBlock)]
    params = [p for b in blocks for p in b.parameters()]
    return {
        "blocks": len(blocks),
        "fsdp_blocks": sum(isinstance(b, FSDPModule) for b in blocks),
        "root_fsdp": isinstance(module, FSDPModule),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "block_params": len(params),
        "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
    }


def record(trainer, out: str, job: str, **extra) -> None:
    from diffusers_raven.trainer import fsdp

    exported = trainer.export_transformer(use_ema=False)  # collective under FSDP
    result = {
        "world_size": trainer.args.world_size,
        "fsdp": trainer.is_fsdp_enabled,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "student": sharding(trainer.student),
        "weights": flat(exported.state_dict()),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        **extra,
    }
    if trainer.ema is not None:
        result["ema"] = flat(trainer.export_transformer(use_ema=True).state_dict())
    if hasattr(trainer, "critic"):
        result["critic"] = flat(fsdp.gather_state_dict(trainer.critic))
        result["critic_sharding"] = sharding(trainer._unwrap(trainer.critic))
    if trainer.peft_config is not None:
        result["adapter"] = flat({k: v for k, v in fsdp.gather_state_dict(trainer.student).items() if "lora" in k})
        result["trainable"] = [n for n, p in trainer.student.named_parameters() if p.requires_grad]
        result["lora_dtensor"] = all(type(p).__name__ == "DTensor" for n, p in trainer.student.named_parameters()
                                     if "lora" in n)
    with open(os.path.join(out, f"{job}_rank{trainer.args.process_index}.json"), "w") as f:
        json.dump(result, f)


def drawn_prompts(trainer) -> list[list[str]]:
    """Wrap the trainer's ``_generate`` to note the prompts of every generation batch this process makes."""
    seen = []
    generate = trainer._generate

    def noting(inputs):
        seen.append(list(inputs["prompt"]))
        return generate(inputs)

    trainer._generate = noting
    return seen


def main() -> None:
    from tiny_raven import build as build_raven

    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--jobs", default="raven,resume,lora,stream")
    parser.add_argument("--fsdp", action="store_true", help="ask for FSDP in the training arguments")
    a = parser.parse_args()
    extra = FSDP_ARGS if a.fsdp else {}
    jobs = a.jobs.split(",")
    global_prompts = None
    if "raven" in jobs:
        out = os.path.join(a.output_dir, "raven")
        trainer = build_raven(out, "raven", **RAVEN, **extra)
        seen = drawn_prompts(trainer)
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        gathered = [None] * trainer.args.world_size
        torch.distributed.all_gather_object(gathered, seen)
        # the global generation batches: each process's rows in process order
        global_prompts = [p for generation in zip(*gathered) for rows in generation for p in rows]
        record(trainer, a.output_dir, "raven", prompts=global_prompts)
    if "resume" in jobs:
        out = os.path.join(a.output_dir, "raven")
        trainer = build_raven(out, "raven", **RAVEN, **extra)
        trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-1"))
        record(trainer, a.output_dir, "resume")
    if "lora" in jobs:
        from peft import LoraConfig
        from tiny_cmgrpo import build as build_cmgrpo

        out = os.path.join(a.output_dir, "lora")
        lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        trainer = build_cmgrpo(out, max_steps=2, save_steps=1, per_device_train_batch_size=1, peft_config=lora,
                               **extra)
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        record(trainer, a.output_dir, "lora")
    if "stream" in jobs and global_prompts is not None:
        from datasets import IterableDataset

        def rows(prompts):
            # the generation batches `raven` drew, each prompt once (the stream repeats a block for its micro-steps)
            yield from ({"prompt": p} for p in prompts)

        out = os.path.join(a.output_dir, "stream")
        stream = IterableDataset.from_generator(rows, gen_kwargs={"prompts": global_prompts})
        trainer = build_raven(out, "raven", **{**RAVEN, "save_steps": 10}, prompt_cache_size=2, train_dataset=stream,
                              **extra)
        trainer.train()
        record(trainer, a.output_dir, "stream", cache=[len(trainer.prompt_cache), trainer.prompt_cache.nbytes,
                                                      trainer.prompt_cache.evictions])


if __name__ == "__main__":
    main()
