"""Distill a causal few-step video generator with RavenTrainer.

    python trainers/raven.py --config trainers/raven_tiny.yaml                      # CPU, minutes
    accelerate launch --config_file trainers/accelerate_configs/multi_gpu.yaml \\
        trainers/raven.py --config trainers/raven_wan.yaml                          # GPUs

The YAML holds the RavenConfig fields plus `student` (a CausalVideoPipeline folder or Hub id), `teacher` (a
WanTransformer3DModel folder or Hub id; `"random-tiny"` builds one for a smoke run) and `prompts` (a text file, one
prompt per line, or a list).
"""

import argparse
import json
import os

import yaml


def load_prompts(spec) -> list[str]:
    if isinstance(spec, list):
        return spec
    with open(spec) as f:
        return [line.strip() for line in f if line.strip()]  # blank lines are not prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with RavenConfig fields, student, teacher, prompts")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from ('last' for the newest)")
    cli = parser.parse_args()
    with open(cli.config) as f:
        spec = yaml.safe_load(f)

    import torch
    from datasets import Dataset
    from diffusers import WanTransformer3DModel

    from diffusers_raven import RavenConfig, RavenTrainer
    from diffusers_raven.pipelines.presets import load_pipeline
    from diffusers_raven.utils.tiny import tiny_transformer_config

    student, description = load_pipeline(spec.pop("student", None))
    teacher = spec.pop("teacher")
    if teacher == "random-tiny":
        torch.manual_seed(0)
        teacher = WanTransformer3DModel(**tiny_transformer_config())
    prompts = load_prompts(spec.pop("prompts"))
    args = RavenConfig(**spec)
    trainer = RavenTrainer(model=student, teacher=teacher, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}))
    resume = cli.resume
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "train_results.json"), "w") as f:
            json.dump({"student": description, **result.metrics, "log_history": trainer.state.log_history}, f, indent=2)


if __name__ == "__main__":
    main()
