"""Distill a causal few-step video generator with RavenTrainer.

    python trainers/raven.py --config trainers/raven_tiny.yaml                      # CPU, minutes
    python trainers/raven.py --config trainers/raven_tiny.yaml --resume last        # continue a run
    python trainers/raven.py --config trainers/raven_tiny.yaml --learning_rate 1e-5 --max_steps 8
    accelerate launch --config_file trainers/accelerate_configs/multi_gpu.yaml \\
        trainers/raven.py --config trainers/raven_wan.yaml                          # GPUs

The configuration is read as TRL's scripts read theirs: ``trl.TrlParser`` over :class:`RavenScriptArguments`
(``student``, ``teacher``, ``prompts``, ``resume``) and :class:`~diffusers_raven.RavenConfig`. The YAML ``--config``
sets fields of either, any field is also a flag (``--learning_rate 1e-5``), and a misspelt key fails naming the
closest field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from diffusers_raven import RavenConfig
from diffusers_raven.utils.recipe_args import parse_recipe_args


@dataclass
class RavenScriptArguments:
    """What the script sets around the trainer (the trainer's own settings are :class:`RavenConfig`'s)."""

    teacher: str = field(metadata={"help": "a WanTransformer3DModel folder or Hub id; 'random-tiny' builds one for a "
                                           "smoke run"})
    student: str | None = field(default=None, metadata={
        "help": "a CausalVideoPipeline folder or Hub id, 'random-tiny', or 'bundled' (the default)"})
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "the training prompts, or one text file of them (one prompt per line)"})
    resume: str | None = field(default=None, metadata={"help": "a checkpoint folder, or 'last' for the newest one"})


def load_prompts(spec: str | list[str]) -> list[str]:
    """The prompts of ``spec``: a list of prompts, or a text file (one prompt per line; blank lines are not prompts)."""
    spec = [spec] if isinstance(spec, str) else list(spec)
    if len(spec) == 1 and os.path.isfile(spec[0]):
        with open(spec[0]) as f:
            spec = [line.strip() for line in f]
    prompts = [p for p in spec if p.strip()]
    if not prompts:
        raise ValueError("`prompts` is empty: give the training prompts (a list, or a text file of them).")
    return prompts


def main(argv: list[str] | None = None) -> None:
    script, args = parse_recipe_args((RavenScriptArguments, RavenConfig), argv, description=__doc__)
    prompts = load_prompts(script.prompts)

    import torch
    from datasets import Dataset
    from diffusers import WanTransformer3DModel

    from diffusers_raven import RavenTrainer
    from diffusers_raven.pipelines.presets import load_pipeline
    from diffusers_raven.utils.tiny import tiny_transformer_config

    student, description = load_pipeline(script.student)
    teacher = script.teacher
    if teacher == "random-tiny":
        torch.manual_seed(0)
        teacher = WanTransformer3DModel(**tiny_transformer_config())
    trainer = RavenTrainer(model=student, teacher=teacher, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}))
    resume = script.resume
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
