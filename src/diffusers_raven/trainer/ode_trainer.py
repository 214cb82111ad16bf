"""ODE-regression initialisation of a causal student (METHOD.md §5), on the trainer base shared with RAVEN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..schedulers import ConsistencyFlowMatchScheduler
from ..training import frame_weights, ode_regression_inputs, ode_regression_loss, teacher_ode_trajectory
from .base import CausalVideoTrainerBase


@dataclass
class ODERegressionConfig(TrainingArguments):
    r"""Configuration of [`ODERegressionTrainer`].

    > Parameters that control the video and the pairs

    num_frames (`int`, defaults to `21`), height, width, max_sequence_length: as in [`RavenConfig`].
    denoising_sigmas (`list[float]`, *optional*): the few-step sigmas the student learns (default: the four Self
        Forcing sigmas).
    window_frames, sink_frames: attention window and sinks of the block-causal pass.
    chunk_loss_alpha (`float`, defaults to `0`): chunk-wise loss scaling (METHOD §4); 0 is the plain mean.

    > Parameters of samples and EMA

    ema_decay (`float`, *optional*), sample_every_steps, sample_prompts: as in [`RavenConfig`].
    """

    num_frames: int = field(default=21, metadata={"help": "Output frames (1 + 4k)."})
    height: int | None = field(default=None, metadata={"help": "Pixel height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Pixel width (default: the pipeline's)."})
    max_sequence_length: int = field(default=512, metadata={"help": "Text tokens."})
    denoising_sigmas: list[float] | None = field(default=None, metadata={"help": "The few-step sigmas."})
    window_frames: int | None = field(default=None, metadata={"help": "Attention window in latent frames."})
    sink_frames: int = field(default=0, metadata={"help": "Attention sink frames."})
    chunk_loss_alpha: float = field(default=0.0, metadata={"help": "Chunk-wise loss scaling α."})
    ema_decay: float | None = field(default=None, metadata={"help": "Student EMA decay (None disables)."})
    ema_start_step: int = field(default=0, metadata={"help": "First step that updates the EMA."})
    sample_every_steps: int | None = field(default=None, metadata={"help": "Write a sample video every N steps."})
    sample_prompts: list[str] | None = field(default=None, metadata={"help": "Prompts of the sample videos."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Student learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the dataset columns (required)."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"`num_frames` must be 1 + 4·k output frames, got {self.num_frames!r}.")


@torch.no_grad()
def build_ode_dataset(pipeline, teacher, prompts: list[str], num_frames: int, height: int | None = None,
                      width: int | None = None, num_steps: int = 48, guidance_scale: float = 3.0,
                      negative_prompt: str = "", denoising_sigmas: list[float] | None = None, seed: int = 0,
                      max_sequence_length: int = 512, batch_size: int = 1):
    """Teacher ODE pairs as a ``datasets.Dataset``: ``prompt``, ``ode_states`` (``[S, C, F, h, w]``, the states at
    the few-step sigmas) and ``latents`` (``[C, F, h, w]``, the ODE's end point).

    ``batch_size`` prompts are integrated together (8 at a time is 1.70x faster than 1 for the bundled model's sizes
    on a CPU: ``benchmarks/bench_ode_pairs.py``); each prompt's noise is drawn in prompt order whatever the batch
    size, so the pairs do not depend on it (up to the order of float sums)."""
    from datasets import Dataset

    if batch_size < 1:
        raise ValueError(f"`batch_size`={batch_size} must be >= 1.")

    sampler = ConsistencyFlowMatchScheduler.from_config(pipeline.scheduler.config)
    sampler.set_timesteps(sigmas=denoising_sigmas)
    record = sampler.schedule_sigmas[:-1]
    height = height or pipeline.default_height
    width = width or pipeline.default_width
    factor = pipeline.vae_scale_factor_spatial
    shape = (1, teacher.config.in_channels, pipeline.latent_frames_for(num_frames), height // factor, width // factor)
    generator = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "ode_states": [], "latents": []}
    device = teacher.device
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        text, negative = pipeline.encode_prompt(batch, negative_prompt, guidance_scale != 1.0,
                                                max_sequence_length=max_sequence_length, device=device,
                                                dtype=teacher.dtype)
        noise = torch.cat([torch.randn(shape, generator=generator) for _ in batch]).to(device, teacher.dtype)
        states, x0 = teacher_ode_trajectory(teacher, noise, text, negative, record, guidance_scale, num_steps,
                                            sampler.config.shift)
        for i, prompt in enumerate(batch):
            rows["prompt"].append(prompt)
            rows["ode_states"].append(states[:, i].float().cpu().numpy())
            rows["latents"].append(x0[i].float().cpu().numpy())
    return Dataset.from_dict(rows).with_format("torch")


class ODERegressionTrainer(CausalVideoTrainerBase):
    """Train a causal student to map the teacher's ODE states at the few-step sigmas to the ODE's end point, with one
    block-causal pass and an independent sigma per chunk (METHOD §5). The dataset comes from
    :func:`build_ode_dataset` (columns ``prompt``, ``ode_states``, ``latents``)."""

    _tag_names = ["diffusers-raven", "ode-regression", "text-to-video", "autoregressive"]
    _method_name = "ODE regression (causal student initialisation)"
    _citation = """@article{raven2026,
  title   = {RAVEN: Training-Time Test for Autoregressive Video Diffusion, with Consistency-Model GRPO},
  journal = {arXiv preprint arXiv:2605.15190},
  year    = {2026}
}"""

    def __init__(self, model, args: ODERegressionConfig | None = None, train_dataset=None, eval_dataset=None,
                 pipeline=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        args = args if args is not None else ODERegressionConfig(output_dir="ode-output")
        if not isinstance(args, ODERegressionConfig):
            raise TypeError(f"`args` must be an ODERegressionConfig, got {type(args).__name__}.")
        columns = getattr(train_dataset, "column_names", None) or []
        missing = [c for c in ("prompt", "ode_states", "latents") if c not in columns]
        if missing:
            raise ValueError(f"`train_dataset` lacks the columns {missing} (build it with `build_ode_dataset`).")
        super().__init__(model, args, train_dataset, eval_dataset, pipeline, peft_config, callbacks, optimizers)
        sampler = ConsistencyFlowMatchScheduler.from_config(self.pipeline.scheduler.config)
        sampler.set_timesteps(sigmas=args.denoising_sigmas)
        self.sigmas = torch.tensor(sampler.schedule_sigmas[:-1], dtype=torch.float32)
        chunk = self.pipeline.chunk_frames
        latent_frames = self.pipeline.latent_frames_for(args.num_frames)
        if latent_frames % chunk:
            raise ValueError(f"`num_frames`={args.num_frames} is not a whole number of {chunk}-frame chunks.")
        self.chunk_sizes = [chunk] * (latent_frames // chunk)
        self.weights = frame_weights(self.chunk_sizes, args.chunk_loss_alpha).float()

    def model_card_fields(self) -> dict:
        return {"method": self._method_name, "few-step sigmas": self.sigmas.tolist()}

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        device = self.accelerator.device
        text = self.encode_prompts(list(inputs["prompt"]))
        states = torch.stack([torch.as_tensor(s) for s in inputs["ode_states"]]).to(device).transpose(0, 1)
        target = torch.stack([torch.as_tensor(x) for x in inputs["latents"]]).to(device)
        if states.shape[3] != sum(self.chunk_sizes):
            raise ValueError(
                f"The dataset's ODE states have {states.shape[3]} latent frames; `num_frames` gives "
                f"{sum(self.chunk_sizes)}."
            )
        noisy, timesteps = ode_regression_inputs(states, self.sigmas, self.chunk_sizes, self.step_generator("ode"))
        with self.accelerator.autocast():
            velocity = model(noisy, timesteps, text, window_frames=self.args.window_frames,
                             sink_frames=self.args.sink_frames).sample
            sigma = (timesteps / 1000).view(noisy.shape[0], 1, -1, 1, 1)
            loss = ode_regression_loss(noisy - sigma * velocity, target, self.weights)
        self.accelerator.backward(loss)
        self.log_metric("loss/ode", loss.detach())
        return loss.detach()
