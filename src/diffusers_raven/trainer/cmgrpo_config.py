"""Configuration of :class:`CMGRPOTrainer` (METHOD.md §1, §6, §8)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import VideoTrainerConfig

SAMPLERS = ("consistency", "sde")
SCALE_REWARDS = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("normalize_then_sum", "sum_then_normalize")


@dataclass
class CMGRPOConfig(VideoTrainerConfig):
    r"""Configuration of [`CMGRPOTrainer`]: online RL (GRPO) on the Gaussian transitions of a causal video sampler.

    The video, window, EMA, reward-weight and sample parameters are those of [`VideoTrainerConfig`], the rest those
    of [`~transformers.TrainingArguments`]. Defaults are those of RAVEN's CM-GRPO reference code unless noted; LoRA
    (the trainer's `peft_config`) is the documented default for RL, and then the reference policy of the KL term is
    the model with its adapter disabled.

    > Parameters that control the rollouts

    num_generations (`int`, defaults to `8`): rollouts per prompt (G), the group whose rewards are normalised
        together. The global generation batch (`per_device_train_batch_size × processes × steps_per_generation`)
        must be a multiple of it; a group's rollouts may sit on different processes.
    sampler (`str`, defaults to `"consistency"`): the policy's kernel. `"consistency"`: the model's own few-step
        consistency sampler, every re-noising step a Gaussian policy step (CM-GRPO); `"sde"`: the Flow-GRPO
        Euler–Maruyama kernel on the same sigmas (the baseline).
    sde_noise_level (`float`, defaults to `0.7`): the noise level `a` of the `"sde"` sampler (Flow-GRPO's value).
    shared_initial_noise (`bool`, defaults to `False`): the `G` rollouts of a prompt start every chunk from the same
        initial noise and differ only by the sampler's own noise (the policy's actions) and the context noise, so
        that the group's advantages measure the actions rather than the starting noise (DanceGRPO's choice; the
        reference code draws independent initial noise).

    > Parameters that control the rewards and advantages

    reward_aggregation (`str`, defaults to `"normalize_then_sum"`): `"normalize_then_sum"` (each reward z-scored in
        its group, weighted sum divided by Σ|w|) or `"sum_then_normalize"` (weighted sum, then the group advantage).
    scale_rewards (`str`, defaults to `"group"`): divide the advantage by the group's reward std (`"group"`), the
        batch's (`"batch"`) or not at all (`"none"`), as TRL's GRPO trainer.
    adv_clip (`float`, *optional*, defaults to `5.0`): advantages are clipped to ±`adv_clip`.

    > Parameters that control the policy loss

    policy_steps (`float`, defaults to `1`): the non-final sampler steps trained per rollout: an integer count
        (1: one random step, the reference code), or a fraction in (0, 1) of the non-final steps (rounded up).
    policy_loss_scaling (`float`, defaults to `100.0`): factor of the policy loss (the reference code's 100).
    chunk_loss_alpha (`float`, *optional*): α of the chunk-wise loss weights (METHOD §4); default −1 (RAVEN).
    beta (`float`, defaults to `0.0`): coefficient of the KL to the reference policy (0 in the paper: no reference
        model is needed).
    num_iterations (`int`, defaults to `1`): optimisation passes over each generation batch; above 1 the loss is
        PPO's clipped ratio of the recorded log-probabilities.
    epsilon (`float`, defaults to `1e-4`), epsilon_high (`float`, *optional*): the lower and upper clip of the ratio
        (`1 − epsilon`, `1 + epsilon_high`; `epsilon_high` defaults to `epsilon`). The log-probabilities are means
        over the latent elements (Flow-GRPO's convention, whose clip range 1e-4 is the default here); TRL's 0.2 is
        meant for per-token ratios and would almost never clip.
    """

    # Rollouts
    num_generations: int = field(default=8, metadata={"help": "Rollouts per prompt (G)."})
    sampler: str = field(default="consistency", metadata={"help": f"Policy kernel, one of {SAMPLERS}."})
    sde_noise_level: float = field(default=0.7, metadata={"help": "Noise level a of the 'sde' sampler."})
    shared_initial_noise: bool = field(
        default=False, metadata={"help": "A prompt's G rollouts share their initial noise (per chunk)."}
    )
    # Rewards and advantages
    reward_aggregation: str = field(
        default="normalize_then_sum", metadata={"help": f"Reward aggregation, one of {REWARD_AGGREGATIONS}."}
    )
    scale_rewards: str = field(default="group", metadata={"help": f"Advantage scaling, one of {SCALE_REWARDS}."})
    adv_clip: float | None = field(default=5.0, metadata={"help": "Advantages are clipped to ± this (None: off)."})
    # Policy loss
    policy_steps: float = field(
        default=1, metadata={"help": "Non-final steps trained per rollout: a count, or a fraction in (0, 1)."}
    )
    policy_loss_scaling: float = field(default=100.0, metadata={"help": "Factor of the policy loss."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the reference policy."})
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes per generation batch."})
    epsilon: float = field(default=1e-4, metadata={"help": "Lower clip of the PPO ratio (1 − epsilon)."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clip of the PPO ratio (1 + epsilon_high); default epsilon."}
    )
    # Defaults changed for RL
    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate (of the LoRA adapter by default)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_loss_alpha is None:
            self.chunk_loss_alpha = -1.0
        if self.sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {self.sampler!r}.")
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"`num_generations` must be an integer ≥ 2 (a group needs two rollouts to compare), got "
                f"{self.num_generations!r}."
            )
        if self.reward_aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(
                f"`reward_aggregation` must be one of {REWARD_AGGREGATIONS}, got {self.reward_aggregation!r}."
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}.")
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"`adv_clip` must be positive or None, got {self.adv_clip!r}.")
        steps = self.policy_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not steps > 0 or (
            steps >= 1 and steps != math.floor(steps)
        ):
            raise ValueError(
                f"`policy_steps` must be a positive integer count or a fraction in (0, 1), got {self.policy_steps!r}."
            )
        if not self.sde_noise_level > 0:
            raise ValueError(f"`sde_noise_level` must be positive, got {self.sde_noise_level!r}.")
        if self.beta < 0:
            raise ValueError(f"`beta` must be non-negative, got {self.beta!r}.")
        if isinstance(self.num_iterations, bool) or not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            raise ValueError(f"`num_iterations` must be a positive integer, got {self.num_iterations!r}.")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not 0 < self.epsilon < 1 or not self.epsilon_high > 0:
            raise ValueError(
                f"Need 0 < `epsilon` < 1 and `epsilon_high` > 0, got {self.epsilon!r} and {self.epsilon_high!r}."
            )
