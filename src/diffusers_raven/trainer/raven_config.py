"""Configuration of :class:`RavenTrainer` (METHOD.md §3–§5)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

HISTORY_MODES = ("raven", "self_forcing", "diffusion_forcing", "teacher_forcing")


@dataclass
class RavenConfig(TrainingArguments):
    r"""Configuration of [`RavenTrainer`]: DMD distillation of a causal few-step video generator.

    Only the parameters specific to RAVEN are listed here; the rest are those of [`~transformers.TrainingArguments`].
    Defaults are the values of the RAVEN / Self Forcing reference code at Wan scale (METHOD §5) unless noted.

    > Parameters that control the video

    num_frames (`int`, defaults to `21`): output frames of a training rollout (`1 + 4·(latent frames − 1)`).
    height, width (`int`, *optional*): pixel size; default: the pipeline's default size.
    max_sequence_length (`int`, defaults to `512`): text tokens.
    denoising_sigmas (`list[float]`, *optional*): the few-step schedule; default: the scheduler's four sigmas.

    > Parameters that control the history

    history (`str`, defaults to `"raven"`): how the student's history is built during training: `"raven"`
        (training-time test: its own rollout, repacked as an interleaved sequence with gradients into the history),
        `"self_forcing"` (its own rollout, one random exit step, detached history), `"diffusion_forcing"` (chunks
        noised at independent levels, one block-causal pass) or `"teacher_forcing"` (clean data as history; needs a
        `latents` column).
    chunk_loss_alpha (`float`, *optional*): α of the chunk-wise loss scaling (METHOD §4); default −1 for `raven`, 0
        (no scaling) for the baselines.
    context_noise (`float`, defaults to `0`): timestep of the context pass that writes the cache.
    window_frames, sink_frames: attention window and sinks (latent frames) used in training rollouts.

    > Parameters that control DMD

    guidance_scale (`float`, defaults to `3.0`): classifier-free guidance of the teacher (the real score).
    negative_prompt (`str`, defaults to `""`): the unconditional prompt of the teacher.
    critic_updates_per_generator_update (`int`, defaults to `2`): critic steps per generator step (Self Forcing: 5).
    critic_learning_rate (`float`, defaults to `4e-7`), critic_adam_beta1/2, critic_weight_decay,
        critic_max_grad_norm: the critic's AdamW.
    dmd_min_u, dmd_max_u (`float`, defaults to `0.02`, `0.98`), timestep_shift (`float`, defaults to `5.0`): the
        re-noising level `τ = shift(u)`, `u ~ U[min, max]` of the generator and critic steps.
    ema_decay (`float`, *optional*, defaults to `0.99`): EMA of the generator; `None` disables it.
    ema_start_step (`int`, defaults to `0`): first step that updates the EMA (before it, the EMA copies the weights).

    > Parameters that control samples

    sample_every_steps (`int`, *optional*): write a sample video to `output_dir/samples` every that many steps.
    sample_prompts (`list[str]`, *optional*): prompts of the sample videos (default: the first training prompt).
    """

    # Video
    num_frames: int = field(default=21, metadata={"help": "Output frames of a training rollout (1 + 4k)."})
    height: int | None = field(default=None, metadata={"help": "Pixel height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Pixel width (default: the pipeline's)."})
    max_sequence_length: int = field(default=512, metadata={"help": "Text tokens of the prompt encoder."})
    denoising_sigmas: list[float] | None = field(
        default=None, metadata={"help": "Few-step schedule (default: [1.0, 0.9375, 0.8333, 0.625])."}
    )
    # History
    history: str = field(default="raven", metadata={"help": f"History mode, one of {HISTORY_MODES}."})
    chunk_loss_alpha: float | None = field(
        default=None, metadata={"help": "Chunk-wise loss scaling α (default −1 for raven, 0 otherwise)."}
    )
    context_noise: float = field(default=0.0, metadata={"help": "Timestep of the cache-writing context pass."})
    window_frames: int | None = field(default=None, metadata={"help": "Attention window in latent frames."})
    sink_frames: int = field(default=0, metadata={"help": "Attention sink frames (with a window)."})
    # DMD
    guidance_scale: float = field(default=3.0, metadata={"help": "Teacher classifier-free guidance."})
    negative_prompt: str = field(default="", metadata={"help": "Unconditional prompt of the teacher."})
    critic_updates_per_generator_update: int = field(default=2, metadata={"help": "Critic steps per generator step."})
    critic_learning_rate: float = field(default=4e-7, metadata={"help": "Critic learning rate."})
    critic_adam_beta1: float = field(default=0.0, metadata={"help": "Critic AdamW beta1."})
    critic_adam_beta2: float = field(default=0.999, metadata={"help": "Critic AdamW beta2."})
    critic_weight_decay: float = field(default=0.0, metadata={"help": "Critic AdamW weight decay."})
    critic_max_grad_norm: float = field(default=10.0, metadata={"help": "Critic gradient clipping (0 disables)."})
    dmd_min_u: float = field(default=0.02, metadata={"help": "Lower bound of u in τ = shift(u)."})
    dmd_max_u: float = field(default=0.98, metadata={"help": "Upper bound of u in τ = shift(u)."})
    timestep_shift: float = field(default=5.0, metadata={"help": "Shift of the DMD re-noising levels."})
    ema_decay: float | None = field(default=0.99, metadata={"help": "Generator EMA decay (None disables)."})
    ema_start_step: int = field(default=0, metadata={"help": "First step that updates the EMA."})
    # Samples
    sample_every_steps: int | None = field(default=None, metadata={"help": "Write a sample video every N steps."})
    sample_prompts: list[str] | None = field(default=None, metadata={"help": "Prompts of the sample videos."})
    # TrainingArguments defaults changed to the reference values
    learning_rate: float = field(default=2e-6, metadata={"help": "Generator learning rate."})
    adam_beta1: float = field(default=0.0, metadata={"help": "Generator AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Generator AdamW beta2."})
    max_grad_norm: float = field(default=10.0, metadata={"help": "Generator gradient clipping."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the prompt column (required)."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.history not in HISTORY_MODES:
            raise ValueError(f"`history` must be one of {HISTORY_MODES}, got {self.history!r}.")
        if self.chunk_loss_alpha is None:
            self.chunk_loss_alpha = -1.0 if self.history == "raven" else 0.0
        if not isinstance(self.critic_updates_per_generator_update, int) or self.critic_updates_per_generator_update < 1:
            raise ValueError(
                "`critic_updates_per_generator_update` must be a positive integer, got "
                f"{self.critic_updates_per_generator_update!r}."
            )
        if not 0.0 <= self.dmd_min_u < self.dmd_max_u <= 1.0:
            raise ValueError(f"Need 0 ≤ `dmd_min_u` < `dmd_max_u` ≤ 1, got {self.dmd_min_u}, {self.dmd_max_u}.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must lie in [0, 1) or be None, got {self.ema_decay!r}.")
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                "`gradient_accumulation_steps` must be 1: every generator step has its own critic updates. Raise "
                "`per_device_train_batch_size` or the number of processes instead."
            )
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"`num_frames` must be 1 + 4·k output frames, got {self.num_frames!r}.")
        if self.remove_unused_columns:
            raise ValueError("`remove_unused_columns` must be False: the trainer reads the `prompt` column itself.")
