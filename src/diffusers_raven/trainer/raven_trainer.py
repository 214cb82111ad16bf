"""RavenTrainer: DMD distillation of a causal few-step video generator (METHOD.md §3–§5).

One optimizer step of the generator (``Trainer`` does the backward pass, accumulation, clipping and the step) with
``critic_updates_per_generator_update`` critic updates before it (stepped here, with the critic's own AdamW):

1. ``_generate`` (no grad, once per generation batch): the student's rollouts through the chunk sampler; the critic
   trains with flow matching on their final clean latents (the first update on the rollout the generator step then
   uses in ``raven`` mode, the others on fresh rollouts);
2. ``compute_loss`` (per micro-batch): build the student's sample ``x̂0`` *with gradient*, from the history mode
   (METHOD §3):
   - ``raven``: the recorded rollout repacked as the interleaved training-time-test sequence at one step ``k`` per
     sample (the history is the context the rollout wrote), one forward with gradients into the history (METHOD §4);
   - ``self_forcing``: a cached rollout under no-grad except at one random exit step (the same for every chunk, sample and
     process), whose ``x̂0`` is the chunk's output;
   - ``diffusion_forcing``: the rollout's clean latents (or the dataset's), each chunk noised at its own random
     level, one block-causal pass;
   - ``teacher_forcing``: the dataset latents noised at one step, each chunk predicted through a cache of the data
     (written with the context-noise rule, under no-grad);
   then re-noise, ``x_τ = (1 − τ) x̂0 + τ ε``, score it with the critic (fake) and the guided teacher (real), and
   regress ``x̂0`` onto ``sg(x̂0 − (f − r)/D)`` with chunk weights (METHOD §4–§5).
"""

from __future__ import annotations

import copy
import os

import torch
from diffusers import WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor

from ..training import critic_loss, dmd_loss, frame_weights, pack_interleaved, sample_dmd_timesteps, sample_steps
from ..training.rollout import RolloutRecord
from .base import CausalVideoTrainerBase
from .raven_config import RavenConfig

RAVEN_CITATION = """@article{raven2026,
  title   = {RAVEN: Training-Time Test for Autoregressive Video Diffusion, with Consistency-Model GRPO},
  journal = {arXiv preprint arXiv:2605.15190},
  year    = {2026}
}"""


class RavenTrainer(CausalVideoTrainerBase):
    """Distill a causal few-step generator from a bidirectional teacher with DMD (see the module docstring).

    Args:
        model: the student: a [`CausalVideoPipeline`] (or a path to one), or a [`CausalWanTransformer3DModel`]
            together with `pipeline=` for the text encoder, VAE and scheduler.
        teacher: the frozen bidirectional teacher, a `diffusers.WanTransformer3DModel` (or a folder holding one).
        args: a [`RavenConfig`].
        train_dataset: a `datasets.Dataset` with a `prompt` column (and `latents`, `[C, F, h, w]`, for
            `history="teacher_forcing"`, optionally for `"diffusion_forcing"`).
        eval_dataset: prompts whose videos `evaluate()` scores with `reward_funcs`.
        reward_funcs: reward functions (`fn(prompts, videos, **columns) -> list[float | None]`) of the evaluation.
        critic: the trainable fake-score model; default: a copy of the teacher.
        peft_config: train a LoRA adapter on the student instead of all its weights.
    """

    _tag_names = ["diffusers-raven", "raven", "dmd", "text-to-video", "autoregressive"]
    _method_name = "RAVEN (DMD with a training-time test)"
    _citation = RAVEN_CITATION
    config_class = RavenConfig

    def __init__(self, model, teacher=None, args: RavenConfig | None = None, train_dataset=None, eval_dataset=None,
                 reward_funcs=None, critic=None, pipeline=None, peft_config=None, callbacks=None,
                 optimizers=(None, None)):
        args = args if args is not None else RavenConfig(output_dir="raven-output")
        if teacher is None:
            raise ValueError("`teacher` is required: a bidirectional WanTransformer3DModel (or a folder holding one).")
        if isinstance(teacher, (str, os.PathLike)):
            teacher = WanTransformer3DModel.from_pretrained(teacher)
        if not isinstance(teacher, WanTransformer3DModel):
            raise TypeError(f"`teacher` must be a WanTransformer3DModel, got {type(teacher).__name__}.")
        if args.history == "teacher_forcing" and "latents" not in (getattr(train_dataset, "column_names", None) or []):
            raise ValueError("`history='teacher_forcing'` needs encoded videos: a `latents` column in the dataset.")
        super().__init__(model, args, train_dataset, eval_dataset, reward_funcs, pipeline, peft_config, callbacks,
                         optimizers)
        student = self.student
        for name in ("in_channels", "out_channels", "patch_size", "text_dim"):
            if tuple(_listify(teacher.config[name])) != tuple(_listify(student.config[name])):
                raise ValueError(
                    f"The teacher's `{name}` ({teacher.config[name]}) does not match the student's "
                    f"({student.config[name]}): they must share the latent space and text encoder."
                )
        device = self.accelerator.device
        self.teacher = teacher.to(device).requires_grad_(False).eval()
        critic = critic if critic is not None else copy.deepcopy(teacher)
        critic.requires_grad_(True).train()
        if args.gradient_checkpointing:  # the critic's update is a full pass with gradients too (Trainer only sets the student's)
            critic.enable_gradient_checkpointing()
        self.critic = self.accelerator.prepare(critic.to(device))
        # A plain optimizer: accelerate's wrapper would skip its steps on the micro-steps of a gradient-accumulation
        # cycle, and the critic steps during every generation, whatever the generator's accumulation.
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(),
            lr=args.critic_learning_rate,
            betas=(args.critic_adam_beta1, args.critic_adam_beta2),
            weight_decay=args.critic_weight_decay,
        )
        self.weights = frame_weights(self.chunk_sizes, args.chunk_loss_alpha).float()
        self.exit_steps: list[int] = []  # Self Forcing's exit step of every micro-step (equal on every process)

    def extra_state(self) -> dict:
        return {"critic": self.critic, "critic_optimizer": self.critic_optimizer}

    def model_card_fields(self) -> dict:
        return {
            "method": self._method_name,
            "history mode": self.args.history,
            "teacher": self.teacher.config.get("_name_or_path") or "a bidirectional WanTransformer3DModel",
            "base model": self.student.config.get("_name_or_path") or "unknown",
            "chunk loss alpha": self.args.chunk_loss_alpha,
            "critic updates per generator update": self.args.critic_updates_per_generator_update,
        }

    # ------------------------------------------------------------------ no-grad part: rollouts and the critic
    @torch.no_grad()
    def _generate(self, inputs: dict) -> dict:
        inputs = super()._generate(inputs)
        text = inputs["prompt_embeds"]
        index = inputs["sample_index"]
        mode = self.args.history
        # The student's rollout (recorded for RAVEN's interleaved pass); its clean latents train the critic first.
        chunks = self.rollout(text, self.sample_generators("rollout", index), record=mode == "raven")
        clean = torch.cat([c.clean for c in chunks], dim=2)
        if mode == "raven":
            inputs["record"] = RolloutRecord.from_chunks(chunks)
        elif mode == "diffusion_forcing" and "latents" not in inputs:
            inputs["latents"] = clean
        for i in range(self.args.critic_updates_per_generator_update):
            if i > 0:
                chunks = self.rollout(text, self.sample_generators(f"critic_rollout/{i}", index))
                clean = torch.cat([c.clean for c in chunks], dim=2)
            self._critic_update(clean, text, self.sample_generators(f"critic/{i}", index))
        return inputs

    def _critic_update(self, samples: torch.Tensor, text: torch.Tensor, generators: list[torch.Generator]) -> None:
        with torch.enable_grad():
            self.critic.train()
            with self.accelerator.autocast():
                x_tau, tau, noise = self._renoise(samples, generators)
                velocity = self.critic(x_tau, tau * self.num_train_timesteps, text).sample
                loss = critic_loss(velocity, noise, samples)
            self.accelerator.backward(loss)
            if self.args.critic_max_grad_norm > 0:
                norm = self.clip_gradients(self.critic, self.args.critic_max_grad_norm)
                self.log_metric("critic/grad_norm", norm)
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)
        self.log_metric("critic/loss", loss.detach())

    # ------------------------------------------------------------------ the generator's loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        text = inputs["prompt_embeds"]
        negative = self.encode_prompts([self.args.negative_prompt] * text.shape[0])
        with self.accelerator.autocast():
            x0 = self._student_sample(model, text, inputs)
            x_tau, tau, _ = self._renoise(x0.detach(), self.sample_generators("dmd", inputs["sample_index"]))
            fake_x0, real_x0 = self._fake_and_real(x_tau, tau, text, negative)
            # the graph runs through x̂0 (x_τ only enters the constants f and r)
            loss, grad = dmd_loss(x0, fake_x0, real_x0, frame_weights=self.weights)
        self.log_metric("dmd/loss", loss.detach())
        self.log_metric("dmd/score_norm", grad.flatten(1).norm(dim=1).mean())
        self.log_metric("chunk_weight/first", self.weights[0])
        self.log_metric("chunk_weight/last", self.weights[-1])
        return (loss, x0) if return_outputs else loss

    def _student_sample(self, model, text: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``x̂0`` with gradient, built as the history mode says (METHOD §3)."""
        mode = self.args.history
        batch = text.shape[0]
        index = inputs["sample_index"]
        if mode == "raven":
            record = inputs["record"]
            steps = sample_steps(batch, record.num_steps, self.sample_generators("raven_step", index))
            packed = pack_interleaved(record, steps, self.args.context_noise, self.num_train_timesteps)
            velocity = model(encoder_hidden_states=text, window_frames=self.args.window_frames,
                             sink_frames=self.args.sink_frames, **packed).sample
            sigma = record.sigmas[steps].to(velocity.device).view(-1, 1, 1, 1, 1)
            self.log_metric("history/step", steps.float().mean())
            return packed["hidden_states"] - sigma * velocity
        if mode == "self_forcing":
            exit_step = int(sample_steps(1, self.sampler.num_steps, self.shared_generator("exit_step"))[0])
            self.log_metric("history/step", exit_step)
            self.exit_steps.append(exit_step)
            chunks = self.rollout(text, self.sample_generators("sf_rollout", index), model=model, exit_step=exit_step,
                                  grad=True)
            return torch.cat([c.clean for c in chunks], dim=2)
        if mode == "diffusion_forcing":
            clean = inputs["latents"].to(text.device)
            levels = torch.stack([
                self.sigmas[sample_steps(len(self.chunk_sizes), self.sampler.num_steps, g)]
                for g in self.sample_generators("df_levels", index)
            ]).repeat_interleave(torch.tensor(self.chunk_sizes), dim=1).to(clean.device)  # [B, F]
            noise = randn_tensor(clean.shape, generator=self.sample_generators("df_noise", index), device=clean.device,
                                 dtype=clean.dtype)
            s = levels.view(batch, 1, -1, 1, 1)
            noisy = (1 - s) * clean + s * noise
            velocity = model(noisy, levels * self.num_train_timesteps, text, window_frames=self.args.window_frames,
                             sink_frames=self.args.sink_frames).sample
            return noisy - s * velocity
        # teacher forcing: the data noised at one step, predicted through a cache of the data
        data = inputs["latents"].to(text.device)
        step = int(sample_steps(1, self.sampler.num_steps, self.shared_generator("tf_step"))[0])
        self.log_metric("history/step", step)
        sigma = self.sampler.sigmas[step]
        noise = randn_tensor(data.shape, generator=self.sample_generators("tf_noise", index), device=data.device,
                             dtype=data.dtype)
        noisy = (1 - sigma) * data + sigma * noise
        chunks = self.rollout(text, self.sample_generators("tf_context", index), model=model, latents=noisy,
                              history=data, start_step=step, exit_step=step, grad=True)
        return torch.cat([c.clean for c in chunks], dim=2)

    # ------------------------------------------------------------------ scores
    def _renoise(self, x0: torch.Tensor, generators: list[torch.Generator]):
        """``(x_τ, τ, ε)``: ``x0`` re-noised at a DMD level (METHOD §5), one generator per sample."""
        args = self.args
        tau = sample_dmd_timesteps(x0.shape[0], args.dmd_min_sigma, args.dmd_max_sigma, args.timestep_shift,
                                   generators, self.num_train_timesteps)
        tau = tau.to(x0.device, x0.dtype)
        noise = randn_tensor(x0.shape, generator=generators, device=x0.device, dtype=x0.dtype)
        s = tau.view(-1, 1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, tau, noise

    @torch.no_grad()
    def _fake_and_real(self, x_tau, tau, text, negative) -> tuple[torch.Tensor, torch.Tensor]:
        """The critic's (fake) and the guided teacher's (real) denoised estimates ``x̂0`` of ``x_τ``."""
        t = tau * self.num_train_timesteps
        s = tau.view(-1, 1, 1, 1, 1)
        real = self.teacher(x_tau, t, text).sample
        if self.args.guidance_scale != 1.0:
            uncond = self.teacher(x_tau, t, negative).sample
            real = uncond + self.args.guidance_scale * (real - uncond)
        fake = self.critic(x_tau, t, text).sample
        return x_tau - s * fake, x_tau - s * real


def _listify(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]
