"""What every diffusers-raven trainer shares: components, prompt encoding, reproducible randomness, EMA, extra
checkpoint state, metrics, and saving a loadable pipeline folder with a model card.

The trainers extend :class:`transformers.Trainer` (as TRL's trainers do). ``Trainer.model`` is the causal student
transformer; the text encoder and the VAE stay frozen outside it. All randomness of a step comes from generators
seeded by ``(seed, global step, process, purpose)``, so a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from ..models import CausalWanTransformer3DModel
from ..pipelines import CausalVideoPipeline

EXTRA_STATE_DIR = "raven_state"


class _PromptCollator:
    """Batches of ``{"prompt": [str], <other columns>: list or stacked tensor}``."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key == "latents":
                values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values])
            batch[key] = values
        return batch


class _StepEndCallback(TrainerCallback):
    def __init__(self, trainer: CausalVideoTrainerBase) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_step_end()


def resolve_pipeline(model, pipeline: CausalVideoPipeline | None) -> tuple[CausalWanTransformer3DModel, CausalVideoPipeline]:
    """The student transformer and the pipeline whose other components (text encoder, VAE, scheduler) it uses."""
    if isinstance(model, (str, os.PathLike)):
        model = CausalVideoPipeline.from_pretrained(model)
    if isinstance(model, CausalVideoPipeline):
        return model.transformer, model
    if isinstance(model, CausalWanTransformer3DModel):
        if pipeline is None:
            raise ValueError(
                "`model` is a bare transformer: pass `pipeline=` (a CausalVideoPipeline whose text encoder, VAE and "
                "scheduler to use), or pass the pipeline itself as `model`."
            )
        pipeline.transformer = model
        return model, pipeline
    raise TypeError(
        f"`model` must be a CausalVideoPipeline, a path to one, or a CausalWanTransformer3DModel; got {type(model)}."
    )


class CausalVideoTrainerBase(Trainer):
    """Shared machinery of the diffusers-raven trainers (see the module docstring)."""

    _tag_names: list[str] = ["diffusers-raven", "video-generation", "autoregressive"]
    _method_name = "diffusers-raven"
    _citation = ""

    def __init__(self, model, args, train_dataset=None, eval_dataset=None, pipeline=None, peft_config=None,
                 callbacks=None, optimizers=(None, None)):
        student, pipe = resolve_pipeline(model, pipeline)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a `datasets.Dataset` with a `prompt` column.")
        if "prompt" not in getattr(train_dataset, "column_names", []):
            raise ValueError(
                f"`train_dataset` must have a `prompt` column; it has {getattr(train_dataset, 'column_names', None)}."
            )
        self.peft_config = peft_config
        if peft_config is not None:
            student.requires_grad_(False)
            student.add_adapter(peft_config)
        pipe.set_progress_bar_config(disable=True)
        for frozen in (pipe.text_encoder, pipe.vae):
            frozen.requires_grad_(False).eval()
        self.pipeline = pipe
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.ema: dict[str, torch.Tensor] | None = None
        super().__init__(
            model=student,
            args=args,
            data_collator=_PromptCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.add_callback(_StepEndCallback(self))
        device = self.accelerator.device
        pipe.text_encoder.to(device)
        pipe.vae.to(device)
        if getattr(args, "ema_decay", None) is not None:
            self.ema = {n: p.detach().float().clone() for n, p in student.named_parameters() if p.requires_grad}
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def student(self) -> CausalWanTransformer3DModel:
        return self.accelerator.unwrap_model(self.model)

    def step_generator(self, purpose: str, per_process: bool = True) -> torch.Generator:
        """A generator seeded by (seed, global step, process, purpose): reproducible across resumes; identical on
        every process when ``per_process=False`` (e.g. Self Forcing's exit step)."""
        rank = self.args.process_index if per_process else -1
        key = f"{self.args.seed}/{self.state.global_step}/{rank}/{purpose}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Frozen text-encoder states of ``prompts`` (memoised per prompt)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            embeds = self.pipeline.encode_prompt(
                missing, max_sequence_length=self.args.max_sequence_length, device=self.accelerator.device,
                dtype=self.student.dtype,
            )[0]
            for prompt, embed in zip(missing, embeds):
                self._text_cache[prompt] = embed
        return torch.stack([self._text_cache[p] for p in prompts])

    def log_metric(self, name: str, value: float | torch.Tensor) -> None:
        self._metrics[name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step metrics, averaged over the logging interval and over every process (as TRL does)."""
        names = sorted(self._metrics)
        if names:
            local = torch.tensor([sum(self._metrics[n]) / len(self._metrics[n]) for n in names],
                                 device=self.accelerator.device)
            averaged = self.accelerator.gather(local[None]).mean(dim=0)
            logs.update({n: float(v) for n, v in zip(names, averaged)})
        self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = 0.0 if self.state.global_step <= self.args.ema_start_step else self.args.ema_decay
        for name, param in self.student.named_parameters():
            if name in self.ema:
                self.ema[name].mul_(decay).add_(param.detach().float(), alpha=1 - decay)

    def _on_step_end(self) -> None:
        self._update_ema()
        every = getattr(self.args, "sample_every_steps", None)
        if every and self.state.global_step % every == 0 and self.is_world_process_zero():
            self.write_samples(os.path.join(self.args.output_dir, "samples", f"step-{self.state.global_step}.gif"))

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def write_samples(self, path: str) -> str:
        from ..utils.video import save_video

        prompts = self.args.sample_prompts or [self.train_dataset[0]["prompt"]]
        video = self.pipeline(
            prompts[:1], num_frames=self.args.num_frames, height=self.args.height, width=self.args.width,
            generator=torch.Generator().manual_seed(self.args.seed), max_sequence_length=self.args.max_sequence_length,
        ).frames[0]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_video(video, path)
        return path

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        """Modules and optimizers beyond Trainer's own, saved in every checkpoint (override and extend)."""
        return {}

    def _unwrap(self, obj):
        return self.accelerator.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        folder = os.path.join(output_dir, EXTRA_STATE_DIR)
        os.makedirs(folder, exist_ok=True)
        if self.ema is not None:
            save_file({k: v.contiguous() for k, v in self.ema.items()}, os.path.join(folder, "ema.safetensors"))
        for name, obj in self.extra_state().items():
            torch.save(self._unwrap(obj).state_dict(), os.path.join(folder, f"{name}.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        folder = os.path.join(checkpoint, EXTRA_STATE_DIR)
        if self.ema is not None and os.path.exists(os.path.join(folder, "ema.safetensors")):
            self.ema = {k: v.to(self.accelerator.device) for k, v in load_file(os.path.join(folder, "ema.safetensors")).items()}
        for name, obj in self.extra_state().items():
            path = os.path.join(folder, f"{name}.pt")
            if not os.path.exists(path):
                raise FileNotFoundError(f"Checkpoint {checkpoint} has no {name} state ({path}).")
            self._unwrap(obj).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and ``save_model`` write the student as a diffusers folder (or a LoRA adapter)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student = self.student
        if self.peft_config is not None:
            student.save_lora_adapter(os.path.join(output_dir, "transformer_lora"))
        else:
            student.save_pretrained(os.path.join(output_dir, "transformer"))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        student = self.student
        if self.peft_config is not None:
            from peft.utils import set_peft_model_state_dict

            adapter = load_file(os.path.join(resume_from_checkpoint, "transformer_lora", "pytorch_lora_weights.safetensors"))
            set_peft_model_state_dict(student, {k.removeprefix("transformer."): v for k, v in adapter.items()})
            return
        folder = os.path.join(resume_from_checkpoint, "transformer")
        weights = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        student.load_state_dict(weights)

    # ------------------------------------------------------------------ export
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``checkpoint-*`` folders) hold the raw student for resuming; any other folder (the default
        ``output_dir``, also before ``push_to_hub``) gets a loadable pipeline and a model card."""
        if output_dir is not None and os.path.basename(os.path.normpath(output_dir)).startswith("checkpoint-"):
            return super().save_model(output_dir, _internal_call)
        self.save_pipeline(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    @torch.no_grad()
    def export_transformer(self, use_ema: bool = True) -> CausalWanTransformer3DModel:
        """A standalone copy of the student: EMA weights when available, a LoRA adapter fused into the weights."""
        exported = copy.deepcopy(self.student)
        if use_ema and self.ema is not None:
            for name, param in exported.named_parameters():
                if name in self.ema:
                    param.copy_(self.ema[name].to(param.dtype))
        if self.peft_config is not None:
            exported.fuse_lora()
            exported.unload_lora()
        return exported.requires_grad_(False)

    def save_pipeline(self, output_dir: str | None = None, use_ema: bool = True) -> str:
        """Write a loadable :class:`CausalVideoPipeline` folder (EMA weights when available; LoRA fused, and the
        adapter itself in ``transformer_lora/``) and a model card."""
        output_dir = output_dir or self.args.output_dir
        if not self.is_world_process_zero():
            return output_dir
        components = dict(self.pipeline.components)
        components["transformer"] = self.export_transformer(use_ema)
        sizes = {k: getattr(self.pipeline.config, k, None) for k in ("sample_height", "sample_width")}
        CausalVideoPipeline(**components, **sizes).save_pretrained(output_dir)
        if self.peft_config is not None:
            self.student.save_lora_adapter(os.path.join(output_dir, "transformer_lora"))
        self.create_model_card(output_dir)
        return output_dir

    def model_card_fields(self) -> dict[str, Any]:
        return {}

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> str:
        output_dir = output_dir or self.args.output_dir
        fields = self.model_card_fields()
        metrics = {k: v for k, v in (self.state.log_history[-1] if self.state.log_history else {}).items()}
        config = {k: v for k, v in self.args.to_dict().items() if not k.startswith("_") and "token" not in k}
        lines = [
            "---",
            "library_name: diffusers",
            "pipeline_tag: text-to-video",
            "tags:",
            *[f"- {t}" for t in self._tag_names],
            "---",
            "",
            f"# {os.path.basename(os.path.abspath(output_dir))}",
            "",
            f"A causal, streaming text-to-video generator trained with **{self._method_name}** in "
            "[diffusers-raven](https://pypi.org/project/diffusers-raven/).",
            "",
            "```python",
            "from diffusers_raven import CausalVideoPipeline",
            "",
            f'pipe = CausalVideoPipeline.from_pretrained("{self.args.hub_model_id or output_dir}")',
            'for chunk in pipe.stream("your prompt", num_frames=81):',
            "    ...",
            "```",
            "",
            "## Training",
            "",
            *[f"- **{k}**: {v}" for k, v in fields.items()],
            f"- **steps**: {self.state.global_step}",
            "",
            "## Metrics (last log)",
            "",
            "```json",
            json.dumps(metrics, indent=2, default=str),
            "```",
            "",
            "## Configuration",
            "",
            "```json",
            json.dumps(config, indent=2, default=str),
            "```",
            "",
            "## Citation",
            "",
            "```bibtex",
            self._citation.strip(),
            "```",
            "",
        ]
        path = os.path.join(output_dir, "README.md")
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path
