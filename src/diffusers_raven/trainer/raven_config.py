"""Configuration of :class:`RavenTrainer` (METHOD.md §3–§5)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import VideoTrainerConfig

HISTORY_MODES = ("raven", "self_forcing", "diffusion_forcing", "teacher_forcing")


@dataclass
class RavenConfig(VideoTrainerConfig):
    r"""Configuration of [`RavenTrainer`]: DMD distillation of a causal few-step video generator.

    Only the parameters specific to DMD and the history modes are listed here; the video, EMA and sample parameters
    are those of [`VideoTrainerConfig`], the rest those of [`~transformers.TrainingArguments`].

    Defaults are the values of RAVEN's reference code at Wan scale (METHOD §5): generator / critic learning rates
    2e-6 / 4e-7, AdamW betas (0, 0.999), 2 critic updates per generator update, EMA decay 0.9675, gradient clipping at
    norm 1000 for both, re-noising levels `0.02 + 0.96 · shift_5(u)`. Self Forcing's reference code differs in 5
    critic updates, EMA 0.99 and clipping at 10.

    > Parameters that control the history

    history (`str`, defaults to `"raven"`): how the student's history is built during training: `"raven"`
        (training-time test: its own rollout, repacked as an interleaved sequence with gradients into the history),
        `"self_forcing"` (its own rollout, one random exit step, detached history), `"diffusion_forcing"` (chunks
        noised at independent levels, one block-causal pass) or `"teacher_forcing"` (clean data as history; needs a
        `latents` column).
    chunk_loss_alpha (`float`, *optional*): α of the chunk-wise loss scaling (METHOD §4); default −1 for `raven`, 0
        (no scaling) for the baselines.

    > Parameters that control DMD

    guidance_scale (`float`, defaults to `3.0`): classifier-free guidance of the teacher (the real score).
    negative_prompt (`str`, defaults to `""`): the unconditional prompt of the teacher.
    critic_updates_per_generator_update (`int`, defaults to `2`): critic steps per generator step (Self Forcing: 5).
        They run before the generator step, on the clean latents of the student's no-grad rollouts (the first on the
        rollout the generator step then uses in `raven` mode).
    critic_learning_rate (`float`, defaults to `4e-7`), critic_adam_beta1/2, critic_weight_decay,
        critic_max_grad_norm (defaults to `1000`): the critic's AdamW.
    dmd_min_sigma, dmd_max_sigma (`float`, defaults to `0.02`, `0.98`), timestep_shift (`float`, defaults to `5.0`):
        the re-noising level `τ = min + (max − min) · shift(u)`, `u ~ U[0, 1]`, rounded to an integer timestep.
    """

    # History
    history: str = field(default="raven", metadata={"help": f"History mode, one of {HISTORY_MODES}."})
    # DMD
    guidance_scale: float = field(default=3.0, metadata={"help": "Teacher classifier-free guidance."})
    negative_prompt: str = field(default="", metadata={"help": "Unconditional prompt of the teacher."})
    critic_updates_per_generator_update: int = field(default=2, metadata={"help": "Critic steps per generator step."})
    critic_learning_rate: float = field(default=4e-7, metadata={"help": "Critic learning rate."})
    critic_adam_beta1: float = field(default=0.0, metadata={"help": "Critic AdamW beta1."})
    critic_adam_beta2: float = field(default=0.999, metadata={"help": "Critic AdamW beta2."})
    critic_weight_decay: float = field(default=0.0, metadata={"help": "Critic AdamW weight decay."})
    critic_max_grad_norm: float = field(default=1000.0, metadata={"help": "Critic gradient clipping (0 disables)."})
    dmd_min_sigma: float = field(default=0.02, metadata={"help": "Lowest DMD re-noising level."})
    dmd_max_sigma: float = field(default=0.98, metadata={"help": "Highest DMD re-noising level."})
    timestep_shift: float = field(default=5.0, metadata={"help": "Shift of the DMD re-noising levels."})
    # Defaults of the shared config and of TrainingArguments changed to RAVEN's reference values
    ema_decay: float | None = field(default=0.9675, metadata={"help": "Generator EMA decay (None disables)."})
    learning_rate: float = field(default=2e-6, metadata={"help": "Generator learning rate."})
    adam_beta1: float = field(default=0.0, metadata={"help": "Generator AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Generator AdamW beta2."})
    max_grad_norm: float = field(default=1000.0, metadata={"help": "Generator gradient clipping."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.history not in HISTORY_MODES:
            raise ValueError(f"`history` must be one of {HISTORY_MODES}, got {self.history!r}.")
        if self.chunk_loss_alpha is None:
            self.chunk_loss_alpha = -1.0 if self.history == "raven" else 0.0
        if (
            isinstance(self.critic_updates_per_generator_update, bool)
            or not isinstance(self.critic_updates_per_generator_update, int)
            or self.critic_updates_per_generator_update < 1
        ):
            raise ValueError(
                "`critic_updates_per_generator_update` must be a positive integer, got "
                f"{self.critic_updates_per_generator_update!r}."
            )
        if not 0.0 <= self.dmd_min_sigma < self.dmd_max_sigma <= 1.0:
            raise ValueError(
                f"Need 0 ≤ `dmd_min_sigma` < `dmd_max_sigma` ≤ 1, got {self.dmd_min_sigma}, {self.dmd_max_sigma}."
            )
