"""Time of one RL step of CMGRPOTrainer, split into rollout, reward and policy phases: CM-GRPO (the consistency
sampler) against Flow-GRPO (sampler="sde") on the same configuration.

Both trainers start from the bundled ShapesWorld model (float32; the random tiny pipeline when it is missing) with
the ShapesWorld rewards of trainers/shapes_grpo.yaml (semantic, motion, fidelity), a rank-32 LoRA adapter, 21-frame
64x64 videos and a generation batch of 8 rollouts (2 prompts x 4). A step is `trainer.training_step` (rollouts,
decoding, rewards, advantages, then the interleaved pass, loss and backward) followed by the optimizer step; the
phases are the trainer's own `timing/rollout` (sampling and decoding), `timing/reward` and `timing/policy` (the
rest of the step). Steps of the two samplers are interleaved in one process; ratios are medians of per-repeat
ratios.

    python benchmarks/bench_grpo_step.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    argument_parser,
    header,
    interleaved,
    median,
    print_table,
    ratio_summary,
    result_name,
    summarize,
    write_results,
)

SAMPLERS = ("consistency", "sde")
PHASES = ("timing/rollout", "timing/reward", "timing/policy")
SETTINGS = dict(num_frames=21, height=64, width=64, num_generations=4, per_device_train_batch_size=8,
                learning_rate=1e-4, max_steps=1000, save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
LORA = dict(r=32, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])


def build_trainer(sampler: str, output_dir: str):
    from datasets import Dataset
    from peft import LoraConfig

    from diffusers_raven import CMGRPOConfig, CMGRPOTrainer
    from diffusers_raven.pipelines.presets import load_pipeline
    from diffusers_raven.rewards import fidelity_reward, motion_reward, semantic_reward
    from diffusers_raven.shapes import caption, sample_scene

    pipe, description = load_pipeline("bundled", dtype=torch.float32)
    prompts = [caption(sample_scene(i, split="train")) for i in range(64)]
    args = CMGRPOConfig(output_dir=output_dir, sampler=sampler, reward_weights=[1.0, 0.25, 0.25], **SETTINGS)
    trainer = CMGRPOTrainer(model=pipe, reward_funcs=[semantic_reward, motion_reward, fidelity_reward], args=args,
                            train_dataset=Dataset.from_dict({"prompt": prompts}), peft_config=LoraConfig(**LORA))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this benchmark steps by hand
    trainer.model.train()
    trainer.batches = iter(trainer.get_train_dataloader())
    trainer.phases = {phase: [] for phase in PHASES}
    return trainer, description


def rl_step(trainer) -> None:
    trainer.training_step(trainer.model, next(trainer.batches))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1
    metrics = trainer._metrics["train"]
    for phase in PHASES:
        trainer.phases[phase].append(sum(metrics[phase]))
    metrics.clear()


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    header("CMGRPOTrainer step: consistency (CM-GRPO) vs sde (Flow-GRPO)")
    trainers, description = {}, None
    for sampler in SAMPLERS:
        trainers[sampler], description = build_trainer(sampler, tempfile.mkdtemp())
    times = interleaved({s: (lambda t=trainers[s]: rl_step(t)) for s in SAMPLERS}, args.repeats)
    # the first (warm-up) step of each trainer is not part of the timed series
    phases = {s: {p: trainers[s].phases[p][1:] for p in PHASES} for s in SAMPLERS}
    rows = [[s, median(times[s]), *[median(phases[s][p]) for p in PHASES]] for s in SAMPLERS]
    print_table(["sampler", "median s/step", "rollout", "reward", "policy"], rows)
    ratio = ratio_summary(times["consistency"], times["sde"])
    print(f"step time ratio consistency / sde: {ratio['median_ratio']:.3f}")
    write_results(
        result_name("grpo_step", args.threads),
        {
            "config": {**SETTINGS, "lora": LORA, "model": description, "rewards": ["semantic_reward", "motion_reward",
                                                                                   "fidelity_reward"]},
            "times": {s: summarize(times[s]) for s in SAMPLERS},
            "phases": {s: {p: summarize(phases[s][p]) for p in PHASES} for s in SAMPLERS},
            "time_ratio_consistency_over_sde": ratio,
        },
        started,
    )


if __name__ == "__main__":
    main()
