"""Signal-to-noise ratio of the CMGRPOTrainer policy gradient on the bundled ShapesWorld model: how many rollouts a
step needs before its gradient points where the expected gradient points.

The trainer is built as `trainers/shapes_grpo.yaml` builds it (the ShapesWorld rewards semantic 1.0, motion 0.25,
fidelity 0.25, `normalize_then_sum`, rank-32 LoRA on every linear of the blocks, 21 frames, 8 rollouts per prompt,
16 rollouts per step, `policy_steps`) from the bundled model. It takes `--batches` independent steps' gradients at the
starting weights (`trainer.training_step`: rollouts, rewards, advantages, loss, backward; no optimizer step, no
clipping), flattened over the trainable parameters. With g_1..g_K the per-batch gradients and m their mean:

- signal |E g|^2, estimated without bias by the mean pairwise dot product g_i . g_j (i != j);
- noise tr Cov(g) = sum |g_i - m|^2 / (K - 1), per batch of `per_device_train_batch_size` rollouts;
- `noise_to_signal` = tr Cov / |E g|^2: the number of such batches whose average gradient has as much signal as
  noise (cosine to the expected gradient about 0.71); rollouts needed = that x the batch size;
- the mean pairwise cosine between batch gradients (0 for pure noise; 1 for a noiseless gradient).

    python benchmarks/grpo_gradient_snr.py [--batches 16] [--threads 2] [--sampler consistency sde]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, header, print_table, write_results  # noqa: E402

SETTINGS = dict(num_frames=21, height=64, width=64, num_generations=8, per_device_train_batch_size=16,
                learning_rate=1e-3, max_steps=1000, save_strategy="no", use_cpu=True, disable_tqdm=True,
                reward_aggregation="normalize_then_sum", scale_rewards="group", policy_loss_scaling=100.0,
                chunk_loss_alpha=-1.0)
LORA = dict(r=32, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])


def build_trainer(sampler: str, policy_steps: int, seed: int):
    from datasets import Dataset
    from peft import LoraConfig

    from diffusers_raven import CMGRPOConfig, CMGRPOTrainer
    from diffusers_raven.pipelines.presets import load_pipeline
    from diffusers_raven.rewards import fidelity_reward, motion_reward, semantic_reward
    from diffusers_raven.shapes import caption, sample_scene

    pipe, description = load_pipeline("bundled", dtype=torch.float32)
    prompts = [caption(sample_scene(i, split="train")) for i in range(2048)]
    args = CMGRPOConfig(output_dir=tempfile.mkdtemp(), sampler=sampler, policy_steps=policy_steps, seed=seed,
                        reward_weights=[1.0, 0.25, 0.25], **SETTINGS)
    trainer = CMGRPOTrainer(model=pipe, reward_funcs=[semantic_reward, motion_reward, fidelity_reward], args=args,
                            train_dataset=Dataset.from_dict({"prompt": prompts}), peft_config=LoraConfig(**LORA))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this script steps by hand
    trainer.model.train()
    return trainer, description


def batch_gradients(trainer, batches: int) -> torch.Tensor:
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loader = iter(trainer.get_train_dataloader())
    rows = []
    for index in range(batches):
        trainer.training_step(trainer.model, next(loader))
        rows.append(torch.cat([p.grad.detach().flatten().double() for p in params]))
        trainer.model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        print(f"  batch {index + 1}/{batches}: |g| {rows[-1].norm():.4g}", flush=True)
    return torch.stack(rows)


def snr_stats(grads: torch.Tensor, batch_size: int) -> dict:
    k = grads.shape[0]
    mean = grads.mean(0)
    gram = grads @ grads.T
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    signal = gram[off_diagonal].mean().item()
    noise = ((grads - mean) ** 2).sum().item() / (k - 1)
    norms = gram.diagonal().sqrt()
    cosines = (gram / norms[:, None] / norms[None, :])[off_diagonal]
    ratio = noise / signal if signal > 0 else float("inf")
    return {
        "batches": k,
        "rollouts_per_batch": batch_size,
        "signal_sq_norm": signal,
        "noise_trace_per_batch": noise,
        "noise_to_signal": ratio,
        "rollouts_for_snr_1": ratio * batch_size if signal > 0 else None,
        "mean_pairwise_cosine": cosines.mean().item(),
        "pairwise_cosine_stderr": (cosines.std() / cosines.numel() ** 0.5).item(),
        "mean_batch_grad_norm": norms.mean().item(),
        "mean_grad_norm": mean.norm().item(),
    }


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--sampler", nargs="+", default=["consistency", "sde"])
    parser.add_argument("--policy_steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.batches < 3:
        raise SystemExit("--batches must be at least 3")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    header("CMGRPOTrainer policy-gradient signal-to-noise at the bundled model")
    results, description = {}, None
    for sampler in args.sampler:
        print(f"{sampler}:", flush=True)
        trainer, description = build_trainer(sampler, args.policy_steps, args.seed)
        results[sampler] = snr_stats(batch_gradients(trainer, args.batches), SETTINGS["per_device_train_batch_size"])
        del trainer
    print_table(["sampler", "noise/signal", "rollouts for SNR 1", "mean cosine"],
                [[s, r["noise_to_signal"], r["rollouts_for_snr_1"], r["mean_pairwise_cosine"]]
                 for s, r in results.items()])
    write_results("grpo_gradient_snr",
                  {"config": {**SETTINGS, "policy_steps": args.policy_steps, "seed": args.seed, "lora": LORA,
                              "model": description, "reward_weights": [1.0, 0.25, 0.25]},
                   "samplers": results}, started)


if __name__ == "__main__":
    main()
