"""RavenTrainer: DMD distillation of a causal few-step video generator (METHOD.md §3–§5).

One training step = one generator update (returned to ``Trainer``, which clips and steps the generator's optimizer)
and ``critic_updates_per_generator_update`` critic updates (stepped here, with the critic's own AdamW):

1. build the student's sample ``x̂0`` *with gradient*, from the history mode (METHOD §3):
   - ``raven``: a no-grad self-rollout, repacked as the interleaved training-time-test sequence at one step ``k`` per
     sample, one forward (gradients into the history, METHOD §4);
   - ``self_forcing``: a cached rollout under no-grad except at one random exit step (the same for every chunk and
     every process), whose ``x̂0`` is the chunk's output;
   - ``diffusion_forcing``: a no-grad rollout (or dataset latents), each chunk noised at its own random level, one
     block-causal pass;
   - ``teacher_forcing``: dataset latents noised at one step per sample; each chunk predicted through a cache of the
     clean data written under no-grad;
2. re-noise, ``x_τ = (1 − τ) x̂0 + τ ε``, score it with the critic (fake) and the guided teacher (real), and regress
   ``x̂0`` onto ``sg(x̂0 − (f − r)/D)`` with chunk weights (METHOD §4–§5);
3. train the critic with flow matching on detached generator samples.
"""

from __future__ import annotations

import copy
import os

import torch
from diffusers import WanTransformer3DModel

from ..models import KVCache
from ..schedulers import ConsistencyFlowMatchScheduler
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
        critic: the trainable fake-score model; default: a copy of the teacher.
        peft_config: train a LoRA adapter on the student instead of all its weights.
    """

    _tag_names = ["diffusers-raven", "raven", "dmd", "text-to-video", "autoregressive"]
    _method_name = "RAVEN (DMD with a training-time test)"
    _citation = RAVEN_CITATION

    def __init__(self, model, teacher=None, args: RavenConfig | None = None, train_dataset=None, eval_dataset=None,
                 critic=None, pipeline=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        args = args if args is not None else RavenConfig(output_dir="raven-output")
        if not isinstance(args, RavenConfig):
            raise TypeError(f"`args` must be a RavenConfig, got {type(args).__name__}.")
        if teacher is None:
            raise ValueError("`teacher` is required: a bidirectional WanTransformer3DModel (or a folder holding one).")
        if isinstance(teacher, (str, os.PathLike)):
            teacher = WanTransformer3DModel.from_pretrained(teacher)
        if not isinstance(teacher, WanTransformer3DModel):
            raise TypeError(f"`teacher` must be a WanTransformer3DModel, got {type(teacher).__name__}.")
        super().__init__(model, args, train_dataset, eval_dataset, pipeline, peft_config, callbacks, optimizers)
        student = self.student
        for name in ("in_channels", "out_channels", "patch_size", "text_dim"):
            if tuple(_listify(teacher.config[name])) != tuple(_listify(student.config[name])):
                raise ValueError(
                    f"The teacher's `{name}` ({teacher.config[name]}) does not match the student's "
                    f"({student.config[name]}): they must share the latent space and text encoder."
                )
        if args.history == "teacher_forcing" and "latents" not in train_dataset.column_names:
            raise ValueError("`history='teacher_forcing'` needs encoded videos: a `latents` column in the dataset.")
        self._check_frames()

        device = self.accelerator.device
        self.teacher = teacher.to(device).requires_grad_(False).eval()
        critic = critic if critic is not None else copy.deepcopy(teacher)
        critic.requires_grad_(True).train()
        self.critic_optimizer = torch.optim.AdamW(
            critic.parameters(),
            lr=args.critic_learning_rate,
            betas=(args.critic_adam_beta1, args.critic_adam_beta2),
            weight_decay=args.critic_weight_decay,
        )
        self.critic, self.critic_optimizer = self.accelerator.prepare(critic.to(device), self.critic_optimizer)
        self.sampler = ConsistencyFlowMatchScheduler.from_config(self.pipeline.scheduler.config)
        self.sampler.set_timesteps(sigmas=args.denoising_sigmas)
        self.sigmas = torch.tensor(self.sampler.schedule_sigmas, dtype=torch.float32)
        self.weights = frame_weights(self.chunk_sizes, args.chunk_loss_alpha).float()
        self.exit_steps: list[int] = []  # Self Forcing's exit step of every generator step (equal on every process)

    # ------------------------------------------------------------------ set-up
    def _check_frames(self) -> None:
        pipe, args = self.pipeline, self.args
        latent_frames = pipe.latent_frames_for(args.num_frames)
        chunk = pipe.chunk_frames
        if latent_frames % chunk:
            raise ValueError(
                f"`num_frames`={args.num_frames} gives {latent_frames} latent frames, not a whole number of "
                f"{chunk}-frame chunks."
            )
        self.chunk_sizes = [chunk] * (latent_frames // chunk)
        self.height = args.height or pipe.default_height
        self.width = args.width or pipe.default_width
        factor = pipe.vae_scale_factor_spatial
        self.latent_shape = (pipe.transformer.config.in_channels, latent_frames, self.height // factor,
                             self.width // factor)

    def extra_state(self) -> dict:
        return {"critic": self.critic, "critic_optimizer": self.critic_optimizer}

    def model_card_fields(self) -> dict:
        return {
            "method": self._method_name,
            "history mode": self.args.history,
            "teacher": self.teacher.config.get("_name_or_path", "a bidirectional WanTransformer3DModel"),
            "base model": self.student.config.get("_name_or_path", "unknown"),
            "chunk loss alpha": self.args.chunk_loss_alpha,
            "critic updates per generator update": self.args.critic_updates_per_generator_update,
        }

    # ------------------------------------------------------------------ rollouts
    def _noise(self, shape, generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(self.accelerator.device)

    @torch.no_grad()
    def rollout(self, text: torch.Tensor, generator: torch.Generator) -> RolloutRecord:
        """A no-grad self-rollout of the student (the pipeline's cached sampler), recorded for every step."""
        pipe = self.pipeline
        out = pipe(
            prompt_embeds=text,
            num_frames=self.args.num_frames,
            height=self.height,
            width=self.width,
            sigmas=self.args.denoising_sigmas,
            generator=generator,
            window_frames=self.args.window_frames,
            sink_frames=self.args.sink_frames,
            context_noise=self.args.context_noise,
            output_type="latent",
            return_trajectory=True,
        )
        return RolloutRecord.from_chunks(out.trajectory)

    def _student_sample(self, model, text: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``x̂0`` with gradient, built as the history mode says (METHOD §3)."""
        mode = self.args.history
        batch = text.shape[0]
        if mode == "raven":
            record = self.rollout(text, self.step_generator("rollout"))
            steps = sample_steps(batch, record.num_steps, self.step_generator("raven_step"))
            packed = pack_interleaved(record, steps, self.args.context_noise)
            velocity = model(encoder_hidden_states=text, window_frames=self.args.window_frames,
                             sink_frames=self.args.sink_frames, **packed).sample
            sigma = record.sigmas[steps].to(velocity.device).view(-1, 1, 1, 1, 1)
            self.log_metric("raven/step", steps.float().mean())
            return packed["hidden_states"] - sigma * velocity
        if mode == "self_forcing":
            return self._self_forcing_sample(model, text)
        if mode == "diffusion_forcing":
            clean = inputs.get("latents")
            clean = clean.to(text.device) if clean is not None else self.rollout(text, self.step_generator("rollout")).clean
            g = self.step_generator("df_levels")
            levels = torch.stack([
                self.sigmas[sample_steps(len(self.chunk_sizes), len(self.sigmas) - 1, g)] for _ in range(batch)
            ]).repeat_interleave(torch.tensor(self.chunk_sizes), dim=1).to(clean.device)  # [B, F]
            noise = self._noise(clean.shape, self.step_generator("df_noise"))
            s = levels.view(batch, 1, -1, 1, 1)
            noisy = (1 - s) * clean + s * noise
            velocity = model(noisy, levels * 1000, text, window_frames=self.args.window_frames,
                             sink_frames=self.args.sink_frames).sample
            return noisy - s * velocity
        return self._teacher_forcing_sample(model, text, inputs["latents"].to(text.device))

    def _self_forcing_sample(self, model, text: torch.Tensor) -> torch.Tensor:
        """Self Forcing: cached rollout, gradient only at one random exit step (same for all chunks and processes)."""
        student = self.student
        num_steps = len(self.sigmas) - 1
        exit_step = int(sample_steps(1, num_steps, self.step_generator("exit_step", per_process=False))[0])
        self.log_metric("self_forcing/exit_step", exit_step)
        self.exit_steps.append(exit_step)
        g = self.step_generator("rollout")
        batch = text.shape[0]
        channels, _, h, w = self.latent_shape
        cache = KVCache.for_model(student, batch, window_frames=self.args.window_frames,
                                  sink_frames=self.args.sink_frames)
        outputs, frame = [], 0
        for size in self.chunk_sizes:
            x = self._noise((batch, channels, size, h, w), g)
            for k in range(exit_step + 1):
                sigma = float(self.sigmas[k])
                t = torch.full((batch,), 1000 * sigma, device=x.device)
                if k < exit_step:
                    with torch.no_grad():
                        v = student(x, t, text, kv_cache=cache, frame_offset=frame).sample
                        x0 = x - sigma * v
                        nxt = float(self.sigmas[k + 1])
                        x = (1 - nxt) * x0 + nxt * self._noise(x.shape, g)
                else:
                    v = model(x, t, text, kv_cache=cache, frame_offset=frame).sample
                    x0 = x - sigma * v
            outputs.append(x0)
            with torch.no_grad():
                t_ctx = torch.full((batch,), float(self.args.context_noise), device=x.device)
                student(x0.detach(), t_ctx, text, kv_cache=cache, frame_offset=frame, update_cache=True)
            frame += size
        return torch.cat(outputs, dim=2)

    def _teacher_forcing_sample(self, model, text: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: noisy data chunks predicted through a cache of the clean data (no gradient into it)."""
        student = self.student
        batch = text.shape[0]
        steps = sample_steps(batch, len(self.sigmas) - 1, self.step_generator("tf_step"))
        sigma = self.sigmas[steps].to(data.device).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * data + sigma * self._noise(data.shape, self.step_generator("tf_noise"))
        t = (sigma.flatten() * 1000)
        cache = KVCache.for_model(student, batch, window_frames=self.args.window_frames,
                                  sink_frames=self.args.sink_frames)
        outputs, frame = [], 0
        for size in self.chunk_sizes:
            sl = slice(frame, frame + size)
            v = model(noisy[:, :, sl], t, text, kv_cache=cache, frame_offset=frame).sample
            outputs.append(noisy[:, :, sl] - sigma * v)
            with torch.no_grad():
                t_ctx = torch.full((batch,), float(self.args.context_noise), device=data.device)
                student(data[:, :, sl], t_ctx, text, kv_cache=cache, frame_offset=frame, update_cache=True)
            frame += size
        return torch.cat(outputs, dim=2)

    # ------------------------------------------------------------------ scores
    def _renoise(self, x0: torch.Tensor, purpose: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.step_generator(purpose)
        tau = sample_dmd_timesteps(x0.shape[0], self.args.dmd_min_u, self.args.dmd_max_u, self.args.timestep_shift, g)
        tau = tau.to(x0.device, x0.dtype)
        noise = self._noise(x0.shape, g).to(x0.dtype)
        s = tau.view(-1, 1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, tau, noise

    @torch.no_grad()
    def _real_and_fake(self, x_tau, tau, text, negative) -> tuple[torch.Tensor, torch.Tensor]:
        t = tau * 1000
        s = tau.view(-1, 1, 1, 1, 1)
        cond = self.teacher(x_tau, t, text).sample
        if self.args.guidance_scale != 1.0:
            uncond = self.teacher(x_tau, t, negative).sample
            cond = uncond + self.args.guidance_scale * (cond - uncond)
        fake = self.critic(x_tau, t, text).sample
        return x_tau - s * fake, x_tau - s * cond

    # ------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        prompts = list(inputs["prompt"])
        text = self.encode_prompts(prompts)
        negative = self.encode_prompts([self.args.negative_prompt] * len(prompts))

        # 1-2. generator: DMD on the student's sample.
        with self.accelerator.autocast():
            x0 = self._student_sample(model, text, inputs)
            x_tau, tau, _ = self._renoise(x0.detach(), "dmd")
            fake_x0, real_x0 = self._real_and_fake(x_tau, tau, text, negative)
            # the graph runs through x̂0 (x_τ only enters the constants f and r)
            loss, grad = dmd_loss(x0, fake_x0, real_x0, frame_weights=self.weights)
        self.accelerator.backward(loss)
        self.log_metric("loss/dmd", loss.detach())
        self.log_metric("dmd/grad_norm", grad.flatten(1).norm(dim=1).mean())
        self.log_metric("chunk_weight/first", self.weights[0])
        self.log_metric("chunk_weight/last", self.weights[-1])

        # 3. critic: flow matching on detached generator samples (fresh rollouts after the first update).
        samples = x0.detach()
        for i in range(self.args.critic_updates_per_generator_update):
            if i > 0:
                samples = self.rollout(text, self.step_generator(f"critic_rollout/{i}")).clean
            self._critic_update(samples, text, f"critic/{i}")
        return loss.detach()

    def _critic_update(self, samples: torch.Tensor, text: torch.Tensor, purpose: str) -> None:
        self.critic.train()
        with self.accelerator.autocast():
            x_tau, tau, noise = self._renoise(samples, purpose)
            velocity = self.critic(x_tau, tau * 1000, text).sample
            loss = critic_loss(velocity, noise, samples)
        self.accelerator.backward(loss)
        if self.args.critic_max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.critic.parameters(), self.args.critic_max_grad_norm)
            self.log_metric("grad_norm/critic", norm)
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.log_metric("loss/critic", loss.detach())


def _listify(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]
