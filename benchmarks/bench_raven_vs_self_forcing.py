"""Time per generator step and peak memory of RavenTrainer with `history="raven"` vs `"self_forcing"`.

Both trainers are built on the same student, teacher, prompts and video size (benchmark transformer config, 45
output frames = 12 latent frames = 4 chunks, 16x16 latents). A "generator step" is `trainer.training_step`
(rollout, one critic update, student sample with gradient, teacher and critic scores, DMD backward) followed by
the generator's optimizer step. Times are interleaved in one process; the ratio is the median of per-repeat
ratios. Peak memory is the increase of the peak RSS over the RSS before training, measured in a fresh subprocess per
mode (alternating modes, two runs each), because a process's peak RSS never goes down.

    python benchmarks/bench_raven_vs_self_forcing.py [--repeats 6]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402,E501
    argument_parser,
    header,
    interleaved,
    median,
    print_table,
    ratio_summary,
    rss_bytes,
    summarize,
    write_results,
)
from configs import BENCH_TRANSFORMER_CONFIG as BENCH_CONFIG  # noqa: E402

MODES = ("raven", "self_forcing")
NUM_FRAMES, SIZE = 45, 128


def build_trainer(mode: str, output_dir: str):
    from datasets import Dataset
    from diffusers import WanTransformer3DModel

    from diffusers_raven import (
        CausalVideoPipeline,
        CausalWanTransformer3DModel,
        ConsistencyFlowMatchScheduler,
        RavenConfig,
        RavenTrainer,
    )
    from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_vae

    torch.manual_seed(0)
    tok = build_word_tokenizer()
    config = dict(BENCH_CONFIG)
    pipe = CausalVideoPipeline(
        tokenizer=tok,
        text_encoder=tiny_text_encoder(len(tok), d_model=config["text_dim"]),
        transformer=CausalWanTransformer3DModel(**config),
        vae=tiny_vae(z_dim=config["in_channels"]),
        scheduler=ConsistencyFlowMatchScheduler(),
    )
    teacher_config = {k: v for k, v in config.items() if k != "num_frames_per_chunk"}
    teacher = WanTransformer3DModel(**teacher_config)
    args = RavenConfig(
        output_dir=output_dir,
        history=mode,
        max_steps=1000,
        per_device_train_batch_size=1,
        num_frames=NUM_FRAMES,
        height=SIZE,
        width=SIZE,
        max_sequence_length=32,
        critic_updates_per_generator_update=1,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        ema_decay=None,
    )
    prompts = Dataset.from_dict({"prompt": ["a red circle moving right", "a blue square moving left"]})
    trainer = RavenTrainer(model=pipe, teacher=teacher, args=args, train_dataset=prompts)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this benchmark steps by hand
    trainer.model.train()
    return trainer


def generator_step(trainer) -> None:
    inputs = {"prompt": ["a red circle moving right"]}
    trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1


def measure_memory(mode: str) -> None:
    """Run in a subprocess: print the peak-RSS increase of three generator steps (bytes)."""
    import tempfile

    torch.set_num_threads(1)
    trainer = build_trainer(mode, tempfile.mkdtemp())
    generator_step(trainer)  # first step allocates the optimizer state
    baseline = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(3):
        generator_step(trainer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "mode": mode,
                "baseline_rss": baseline,
                "peak_rss": peak,
                "peak_before": peak_before,
                "increase": peak - baseline,
            }
        )
    )


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--memory-mode", choices=MODES, help=argparse_hidden())
    args = parser.parse_args()
    if args.memory_mode:
        measure_memory(args.memory_mode)
        return
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    header("RavenTrainer generator step: raven vs self_forcing")
    import tempfile

    trainers = {mode: build_trainer(mode, tempfile.mkdtemp()) for mode in MODES}
    times = interleaved({mode: (lambda t=trainers[mode]: generator_step(t)) for mode in MODES}, args.repeats)

    memory = {mode: [] for mode in MODES}
    for _ in range(2):
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-mode", mode, "--threads", "1"],
                check=True,
                capture_output=True,
                text=True,
            )
            memory[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["increase"])

    ratio = ratio_summary(times["raven"], times["self_forcing"])
    mem_ratio = median(memory["raven"]) / median(memory["self_forcing"])
    print_table(
        ["mode", "median s/step", "peak RSS increase (MB)"],
        [[m, median(times[m]), median(memory[m]) / 2**20] for m in MODES],
    )
    print(f"time ratio raven / self_forcing: {ratio['median_ratio']:.3f}; memory ratio: {mem_ratio:.3f}")
    write_results(
        "raven_vs_self_forcing",
        {
            "config": {
                "transformer": BENCH_CONFIG,
                "num_frames": NUM_FRAMES,
                "size": SIZE,
                "batch": 1,
                "critic_updates_per_generator_update": 1,
            },
            "times": {m: summarize(times[m]) for m in MODES},
            "time_ratio_raven_over_self_forcing": ratio,
            "peak_rss_increase_bytes": memory,
            "memory_ratio_raven_over_self_forcing": mem_ratio,
        },
        started,
    )


def argparse_hidden() -> str:
    return "internal: measure the peak memory of one mode in this process"


if __name__ == "__main__":
    main()
