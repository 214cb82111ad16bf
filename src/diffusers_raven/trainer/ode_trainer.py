"""ODE-regression initialisation of a causal student (METHOD.md §5; CausVid and Self Forcing initialise their causal
students this way), on the trainer base shared with RAVEN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..schedulers import ConsistencyFlowMatchScheduler
from ..training import frame_weights, ode_regression_inputs, ode_regression_loss, teacher_ode_trajectory
from .base import CausalVideoTrainerBase
from .config import VideoTrainerConfig


@dataclass
class ODERegressionConfig(VideoTrainerConfig):
    r"""Configuration of [`ODERegressionTrainer`]. The video, EMA and sample parameters are those of
    [`VideoTrainerConfig`] (`denoising_sigmas`: the few-step sigmas the student learns; `window_frames`,
    `sink_frames`: of the block-causal pass; `chunk_loss_alpha` defaults to 0, the plain mean), the rest those of
    [`~transformers.TrainingArguments`].
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Student learning rate."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_loss_alpha is None:
            self.chunk_loss_alpha = 0.0


@torch.no_grad()
def build_ode_dataset(pipeline, teacher, prompts: list[str], num_frames: int, height: int | None = None,
                      width: int | None = None, num_steps: int = 48, guidance_scale: float = 3.0,
                      negative_prompt: str = "", denoising_sigmas: list[float] | None = None, seed: int = 0,
                      max_sequence_length: int | None = None, batch_size: int = 1):
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
                                            sampler.config.shift, sampler.config.num_train_timesteps)
        for i, prompt in enumerate(batch):
            rows["prompt"].append(prompt)
            rows["ode_states"].append(states[:, i].float().cpu().numpy())
            rows["latents"].append(x0[i].float().cpu().numpy())
    return Dataset.from_dict(rows).with_format("torch")


class ODERegressionTrainer(CausalVideoTrainerBase):
    """Train a causal student to map the teacher's ODE states at the few-step sigmas to the ODE's end point, with one
    block-causal pass and an independent sigma per chunk (METHOD §5; the initialisation of CausVid and Self Forcing).
    The dataset comes from :func:`build_ode_dataset` (columns ``prompt``, ``ode_states``, ``latents``)."""

    _tag_names = ["diffusers-raven", "ode-regression", "text-to-video", "autoregressive"]
    _method_name = "ODE regression (causal student initialisation, as in CausVid and Self Forcing)"
    _citation = """@inproceedings{yin2025causvid,
  title     = {From Slow Bidirectional to Fast Autoregressive Video Diffusion Models},
  author    = {Yin, Tianwei and Zhang, Qiang and Zhang, Richard and Freeman, William T. and Durand, Fredo and
               Shechtman, Eli and Huang, Xun},
  booktitle = {CVPR},
  year      = {2025}
}
@article{huang2025selfforcing,
  title   = {Self Forcing: Bridging the Train-Test Gap in Autoregressive Video Diffusion},
  author  = {Huang, Xun and Li, Zhengqi and He, Guande and Zhou, Mingyuan and Shechtman, Eli},
  journal = {arXiv preprint arXiv:2506.08009},
  year    = {2025}
}"""
    config_class = ODERegressionConfig

    def __init__(self, model, args: ODERegressionConfig | None = None, train_dataset=None, eval_dataset=None,
                 reward_funcs=None, pipeline=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        args = args if args is not None else ODERegressionConfig(output_dir="ode-output")
        columns = getattr(train_dataset, "column_names", None) or []
        missing = [c for c in ("prompt", "ode_states", "latents") if c not in columns]
        if missing:
            raise ValueError(f"`train_dataset` lacks the columns {missing} (build it with `build_ode_dataset`).")
        super().__init__(model, args, train_dataset, eval_dataset, reward_funcs, pipeline, peft_config, callbacks,
                         optimizers)
        self.weights = frame_weights(self.chunk_sizes, args.chunk_loss_alpha).float()

    def model_card_fields(self) -> dict:
        return {"method": self._method_name, "few-step sigmas": self.sampler.sigmas[:-1]}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        device = self.accelerator.device
        text = inputs["prompt_embeds"]
        states = torch.stack([torch.as_tensor(s) for s in inputs["ode_states"]]).to(device).transpose(0, 1)
        target = torch.stack([torch.as_tensor(x) for x in inputs["latents"]]).to(device)
        if states.shape[3] != sum(self.chunk_sizes):
            raise ValueError(
                f"The dataset's ODE states have {states.shape[3]} latent frames; `num_frames` gives "
                f"{sum(self.chunk_sizes)}."
            )
        sigmas = self.sigmas[:-1]
        noisy, timesteps = ode_regression_inputs(states, sigmas, self.chunk_sizes, self.sample_generators("ode", inputs["sample_index"]),
                                                 self.num_train_timesteps)
        with self.accelerator.autocast():
            velocity = model(noisy, timesteps, text, window_frames=self.args.window_frames,
                             sink_frames=self.args.sink_frames).sample
            sigma = (timesteps / self.num_train_timesteps).view(noisy.shape[0], 1, -1, 1, 1)
            x0 = noisy - sigma * velocity
            loss = ode_regression_loss(x0, target, self.weights)
        self.log_metric("ode/loss", loss.detach())
        return (loss, x0) if return_outputs else loss
