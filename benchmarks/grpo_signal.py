"""How much learning signal a GRPO group carries on ShapesWorld: the semantic accuracy of the bundled model's own
rollouts, per prompt group, for each sampler and with independent or shared initial noise.

For ``--prompts`` training captions and ``G`` rollouts each (generated exactly as CMGRPOTrainer generates them, through
its ``_prepare_inputs``; no update is made), the evaluator's semantic accuracy of every rollout is recorded and
summarised per configuration:

- ``mean``: the mean over all rollouts (what training starts from);
- ``within_group_std`` / ``between_group_std``: the mean std of a prompt's G scores, and the std of the group means
  (how much of the spread the policy's noise moves, against what the prompt decides);
- ``best_of_g``: the mean over prompts of the best of the G scores, and ``above_mean_fraction`` the share of rollouts
  above their group's mean: the headroom that reinforcing a group's better rollouts points at;
- ``frac_zero_std``: groups whose G scores are all equal (no signal).

    python benchmarks/grpo_signal.py [--prompts 64] [--num_generations 8] [--threads 2]

Writes ``benchmarks/results/grpo_signal.json``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, header, write_results  # noqa: E402

CONFIGS = {
    "consistency": dict(sampler="consistency", shared_initial_noise=False),
    "consistency_shared_noise": dict(sampler="consistency", shared_initial_noise=True),
    "sde": dict(sampler="sde", shared_initial_noise=False),
}


def group_scores(config: dict, prompts: list[str], num_generations: int, batch_prompts: int) -> np.ndarray:
    from datasets import Dataset

    from diffusers_raven import CMGRPOConfig, CMGRPOTrainer
    from diffusers_raven.pipelines.presets import load_pipeline
    from diffusers_raven.rewards import semantic_reward

    recorded: list[float] = []

    def semantic(prompts, videos, **columns):
        scores = semantic_reward(prompts, videos, **columns)
        recorded.extend(scores)
        return scores

    semantic.__name__ = "semantic_reward"
    pipe, _ = load_pipeline("bundled", dtype=torch.float32)
    args = CMGRPOConfig(output_dir=tempfile.mkdtemp(), num_frames=21, height=64, width=64,
                        num_generations=num_generations, per_device_train_batch_size=batch_prompts * num_generations,
                        max_steps=1, use_cpu=True, seed=0, report_to=[], disable_tqdm=True, **config)
    trainer = CMGRPOTrainer(model=pipe, reward_funcs=[semantic], args=args,
                            train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.model.train()
    batches = iter(trainer.get_train_dataloader())
    seen: list[str] = []
    while len(seen) < len(prompts) * num_generations:
        batch = next(batches)
        seen.extend(batch["prompt"])
        trainer._prepare_inputs(batch)
    scores = np.array(recorded, dtype=float).reshape(-1, num_generations)
    groups = np.array(seen).reshape(-1, num_generations)
    assert (groups == groups[:, :1]).all(), "a generation batch's groups must hold one prompt each"
    return scores


def summarize(scores: np.ndarray) -> dict:
    means = scores.mean(axis=1)
    return {
        "mean": float(scores.mean()),
        "within_group_std": float(scores.std(axis=1).mean()),
        "between_group_std": float(means.std()),
        "best_of_g": float(scores.max(axis=1).mean()),
        "above_mean_fraction": float((scores > means[:, None]).mean()),
        "frac_zero_std": float((scores.std(axis=1) == 0).mean()),
        "mean_stderr": float(means.std(ddof=1) / np.sqrt(len(means))),
        "groups": int(len(scores)),
    }


def main() -> None:
    from diffusers_raven.shapes import caption, sample_scene

    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--batch_prompts", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    header("GRPO group signal on ShapesWorld (bundled model, semantic accuracy)")
    prompts = [caption(sample_scene(i, split="train")) for i in range(args.prompts)]
    results = {}
    for name, config in CONFIGS.items():
        scores = group_scores(config, prompts, args.num_generations, args.batch_prompts)
        results[name] = {**summarize(scores), "scores": scores.round(4).tolist()}
        print(name, {k: round(v, 4) for k, v in results[name].items() if k != "scores"}, flush=True)
    write_results("grpo_signal", {"prompts": args.prompts, "num_generations": args.num_generations,
                                  "configs": CONFIGS, "results": results}, started)


if __name__ == "__main__":
    main()
