"""CMGRPOTrainer: online RL on the Gaussian transitions of a causal video sampler (METHOD.md §1, §6).

CM-GRPO treats every re-noising step of the few-step consistency sampler as a Gaussian policy step
``π_θ(x_{σ_{k+1}} | x_{σ_k}) = N((1 − σ_{k+1}) x̂0_θ, σ_{k+1}² I)``, so the rollouts stay the model's own inference
and no SDE sampler is needed. With ``sampler="sde"`` the same trainer runs on the Flow-GRPO Euler–Maruyama kernel
(the baseline). One optimizer step:

1. ``_generate`` (no grad, once per generation batch): each prompt's ``num_generations`` rollouts through the chunk
   sampler (recorded), decoded and scored by the reward functions; the rewards of every process are gathered,
   aggregated (``reward_aggregation``) and turned into per-group advantages (``scale_rewards``, ``adv_clip``); the
   policy steps of each rollout are drawn (one random non-final step by default, the reference code's choice);
2. ``compute_loss`` (per micro-batch): the interleaved training-time-test pass (METHOD §4: noisy = the recorded
   ``x_{σ_k}``, history = the rollout's recorded context) gives ``x̂0_θ`` for every chunk at once; the kernel of
   step ``k`` at ``x̂0_θ`` scores the recorded ``x_{σ_{k+1}}``; the chunk-weighted mean log-probability enters
   TRL's clipped-ratio loss (its gradient on-policy is CM-GRPO's surrogate ``−A ∇ log π_θ``, METHOD §6), times
   ``policy_loss_scaling``, plus ``beta`` times the KL to the reference policy.
"""

from __future__ import annotations

import math
import time

import torch

from ..schedulers import FlowMatchSDEScheduler
from ..training import frame_weights, pack_interleaved
from ..training.grpo import aggregate_rewards, group_advantages, ppo_clip_loss
from ..training.rollout import RolloutRecord
from .base import CausalVideoTrainerBase, reward_name, score_videos
from .cmgrpo_config import CMGRPOConfig

CMGRPO_CITATION = """@article{raven2026,
  title   = {RAVEN: Training-Time Test for Autoregressive Video Diffusion, with Consistency-Model GRPO},
  journal = {arXiv preprint arXiv:2605.15190},
  year    = {2026}
}"""

#: Columns of a generation batch that are not dataset columns for the reward functions.
_INTERNAL_COLUMNS = ("prompt", "prompt_embeds", "sample_index")


class CMGRPOTrainer(CausalVideoTrainerBase):
    """Align a causal few-step video generator with rewards by GRPO on its sampler's Gaussian transitions.

    Args:
        model: the policy: a [`CausalVideoPipeline`] (or a path to one), or a [`CausalWanTransformer3DModel`]
            together with `pipeline=` for the text encoder, VAE and scheduler.
        reward_funcs: one or more reward functions `fn(prompts, videos, **columns) -> list[float | None]` (videos
            `[B, F, 3, H, W]` in [0, 1]; `None` = no score); `fn.__name__` names its metrics.
        args: a [`CMGRPOConfig`].
        train_dataset: a `datasets.Dataset` with a `prompt` column (other columns reach the reward functions).
        eval_dataset: prompts whose videos `evaluate()` scores with the same reward functions.
        ref_model: the reference policy of the KL term (`beta > 0`) when training all weights; default: a frozen
            copy of the starting model. With `peft_config` the reference is the model with its adapter disabled.
        peft_config: train a LoRA adapter (the documented default for RL).
    """

    _tag_names = ["diffusers-raven", "cm-grpo", "grpo", "rl", "text-to-video", "autoregressive"]
    _method_name = "CM-GRPO (GRPO on the consistency sampler's Gaussian transitions)"
    _citation = CMGRPO_CITATION
    config_class = CMGRPOConfig
    _card_curves = (("reward", "Reward during training"),)

    def __init__(self, model, reward_funcs=None, args: CMGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, ref_model=None, pipeline=None, peft_config=None, callbacks=None,
                 optimizers=(None, None)):
        args = args if args is not None else CMGRPOConfig(output_dir="cmgrpo-output")
        if isinstance(args, CMGRPOConfig):
            self.num_generations = args.num_generations
            self.num_iterations = args.num_iterations
        if not reward_funcs:
            raise ValueError("`reward_funcs` is required: one or more functions `fn(prompts, videos, **columns)`.")
        super().__init__(model, args, train_dataset, eval_dataset, reward_funcs, pipeline, peft_config, callbacks,
                         optimizers)
        if self.sampler.num_steps < 2:
            raise ValueError("CM-GRPO needs a schedule of at least two steps: the last step is not a policy step.")
        self.weights = frame_weights(self.chunk_sizes, args.chunk_loss_alpha).float()
        non_final = self.sampler.num_steps - 1
        steps = args.policy_steps
        self.policy_steps = int(steps) if steps >= 1 else math.ceil(steps * non_final)
        if self.policy_steps > non_final:
            raise ValueError(
                f"`policy_steps`={args.policy_steps} exceeds the {non_final} non-final steps of the schedule."
            )
        self._init_reference(ref_model, needed=args.beta > 0)

    def _rollout_scheduler(self, pipe, args):
        if getattr(args, "sampler", "consistency") == "sde":
            return FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=args.sde_noise_level)
        return super()._rollout_scheduler(pipe, args)

    def model_card_fields(self) -> dict:
        args = self.args
        return {
            "method": self._method_name if args.sampler == "consistency" else "Flow-GRPO (SDE sampler baseline)",
            "base model": self.student.config.get("_name_or_path") or "unknown",
            "reward functions": ", ".join(reward_name(f) for f in self.reward_funcs),
            "reward weights": args.reward_weights or [1.0] * len(self.reward_funcs),
            "rollouts per prompt": args.num_generations,
            "sampler": args.sampler,
            "policy steps per rollout": self.policy_steps,
            "beta": args.beta,
        }

    # ------------------------------------------------------------------ no-grad part: rollouts, rewards, advantages
    @torch.no_grad()
    def _generate(self, inputs: dict) -> dict:
        inputs = super()._generate(inputs)
        text, index = inputs["prompt_embeds"], inputs["sample_index"]
        prompts = list(inputs["prompt"])
        start = time.perf_counter()
        latents = self._initial_noise(index) if self.args.shared_initial_noise else None
        record = RolloutRecord.from_chunks(
            self.rollout(text, self.sample_generators("rollout", index), latents=latents, record=True)
        )
        videos = self.decode_videos(record.clean)
        rollout_done = time.perf_counter()
        columns = {k: v for k, v in inputs.items() if k not in _INTERNAL_COLUMNS}
        scores = score_videos(self.reward_funcs, prompts, videos, columns)
        self.log_metric("timing/rollout", rollout_done - start)
        self.log_metric("timing/reward", time.perf_counter() - rollout_done)

        # Every process's scores, in global sample order, so that groups split across processes are whole.
        device = self.accelerator.device
        all_scores = self.accelerator.gather(scores.to(device)).cpu()
        all_index = self.accelerator.gather(index.to(device)).cpu()
        order = torch.argsort(all_index)
        all_scores, all_index = all_scores[order], all_index[order]
        if bool(torch.isnan(all_scores).all()):
            raise ValueError(
                "Every reward function returned None for every video of the generation batch: no reward to learn from."
            )
        groups = all_index // self.num_generations
        weights = torch.tensor(self.args.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float64)
        rewards = aggregate_rewards(all_scores, weights, groups, self.args.reward_aggregation)
        advantages, stats = group_advantages(rewards, groups, self.args.scale_rewards, clip=self.args.adv_clip)
        self._log_rewards(all_scores, weights, groups, stats)
        mine = torch.searchsorted(all_index, index.cpu())
        inputs["advantages"] = advantages[mine].float().to(device)

        # The policy steps of each rollout: distinct non-final steps, drawn per sample.
        non_final = self.sampler.num_steps - 1
        inputs["policy_steps"] = torch.stack([
            torch.randperm(non_final, generator=g)[: self.policy_steps]
            for g in self.sample_generators("policy_steps", index)
        ])
        inputs["record"] = record
        if self.num_iterations > 1:  # the recorded (old) policy's log-probabilities, for PPO's ratio
            inputs["old_log_prob"] = torch.stack([
                self._log_prob(record, record.pred_original[k, torch.arange(len(k))], k)
                for k in inputs["policy_steps"].T
            ], dim=1)
        if self.args.beta > 0:
            inputs["ref_pred_original"] = self._reference_predictions(text, record, inputs["policy_steps"])
        return inputs

    def _initial_noise(self, sample_index: torch.Tensor) -> torch.Tensor:
        """Every chunk's initial noise ``[B, C, F, h, w]``, one draw per prompt group (``shared_initial_noise``),
        seeded by (seed, generation batch, group): the same on whichever process holds the group's samples."""
        channels, frames, h, w = self.latent_shape
        draws = {}
        for group in (sample_index // self.num_generations).tolist():
            if group not in draws:
                generator = self._seeded(f"{self._generation}/{group}/initial_noise")
                draws[group] = torch.randn((1, channels, frames, h, w), generator=generator, dtype=torch.float32)
        noise = torch.cat([draws[g] for g in (sample_index // self.num_generations).tolist()])
        return noise.to(self.accelerator.device, self.student.dtype)

    def _log_rewards(self, scores: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor, stats: dict) -> None:
        """TRL's reward metrics (:meth:`log_reward_metrics`) and the fraction of groups without reward spread."""
        self.log_reward_metrics(scores, weights, groups)
        self.log_metric("frac_reward_zero_std", stats["frac_reward_zero_std"])

    def _reference_predictions(self, text, record: RolloutRecord, policy_steps: torch.Tensor) -> torch.Tensor:
        """``x̂0_ref`` of the reference policy at every policy step (adapter disabled, or the frozen copy)."""
        with self.reference_model() as reference:
            return self._predict(reference, text, record, policy_steps)

    # ------------------------------------------------------------------ the policy's loss
    def _predict(self, model, text: torch.Tensor, record: RolloutRecord, policy_steps: torch.Tensor) -> torch.Tensor:
        """``x̂0_θ`` ``[B, m, C, F, h, w]`` at the ``m`` policy steps of each rollout, by the interleaved pass."""
        batch, m = policy_steps.shape
        rows = torch.arange(batch).repeat_interleave(m)
        expanded = RolloutRecord(
            sigmas=record.sigmas, noisy=record.noisy[:, rows], pred_original=record.pred_original[:, rows],
            clean=record.clean[rows], chunk_sizes=record.chunk_sizes,
            context=None if record.context is None else record.context[rows],
        )
        steps = policy_steps.flatten()
        packed = pack_interleaved(expanded, steps, self.args.context_noise, self.num_train_timesteps)
        velocity = model(encoder_hidden_states=text[rows], window_frames=self.args.window_frames,
                         sink_frames=self.args.sink_frames, **packed).sample
        sigma = record.sigmas[steps].to(velocity).view(-1, 1, 1, 1, 1)
        return (packed["hidden_states"] - sigma * velocity).unflatten(0, (batch, m))

    def _transition(self, record: RolloutRecord, pred_original: torch.Tensor, steps: torch.Tensor):
        """The sampler's kernel of step ``k_b`` from the recorded ``x_{σ_k}`` with prediction ``x̂0`` (per sample)."""
        rows = torch.arange(len(steps))
        x = record.noisy[steps, rows]
        sigma = record.sigmas[steps].to(x)
        sigma_next = record.sigmas[steps + 1].to(x)
        velocity = (x - pred_original) / sigma.view(-1, 1, 1, 1, 1)
        return self.sampler.scheduler.step_from_sigmas(velocity, x, sigma, sigma_next).transition

    def _log_prob(self, record: RolloutRecord, pred_original: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Per sample: the chunk-weighted mean over elements of ``log π(x_{σ_{k+1}} | x_{σ_k})`` (METHOD §1, §4)."""
        transition = self._transition(record, pred_original, steps)
        x_next = record.noisy[steps + 1, torch.arange(len(steps))]
        per_element = transition.log_prob(x_next, reduction="none")
        weights = self.weights.to(per_element).view(1, 1, -1, 1, 1)
        return (per_element * weights).flatten(1).mean(dim=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        record, steps, advantages = inputs["record"], inputs["policy_steps"], inputs["advantages"]
        pred = self._predict(model, inputs["prompt_embeds"], record, steps)  # [B, m, ...]
        batch, m = steps.shape
        log_prob = torch.stack([self._log_prob(record, pred[:, j], steps[:, j]) for j in range(m)], dim=1)
        old = inputs["old_log_prob"] if "old_log_prob" in inputs else log_prob.detach()
        loss, clip = ppo_clip_loss(log_prob.flatten(), old.flatten(), advantages.repeat_interleave(m),
                                   self.args.epsilon, self.args.epsilon_high)
        loss = loss * self.args.policy_loss_scaling
        if self.args.beta > 0:
            kl = torch.stack([self._kl(record, pred[:, j], inputs["ref_pred_original"][:, j], steps[:, j])
                              for j in range(m)], dim=1)
            loss = loss + self.args.beta * self.args.policy_loss_scaling * kl.mean()
            self.log_metric("kl", kl.mean().detach())
        for name, value in clip.items():
            self.log_metric("policy/ratio" if name == "ratio_mean" else name, value)
        self.log_metric("policy/loss", loss.detach())
        self.log_metric("policy/step", steps.float().mean())
        return (loss, pred) if return_outputs else loss

    def _kl(self, record, pred, ref_pred, steps) -> torch.Tensor:
        """Per sample: the chunk-weighted mean over elements of KL(π_θ ‖ π_ref) at the same state (the same std)."""
        mine = self._transition(record, pred, steps)
        ref = self._transition(record, ref_pred, steps)
        per_element = (mine.mean - ref.mean.detach()) ** 2 / (2 * mine.std.to(mine.mean) ** 2)
        weights = self.weights.to(per_element).view(1, 1, -1, 1, 1)
        return (per_element * weights).flatten(1).mean(dim=1)
