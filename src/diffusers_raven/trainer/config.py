"""The configuration every diffusers-raven trainer shares (TRL 1.x form: a documented ``TrainingArguments``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class VideoTrainerConfig(TrainingArguments):
    r"""Fields every causal-video trainer reads; [`RavenConfig`], [`ODERegressionConfig`] and the RL configs extend it.

    The rest are those of [`~transformers.TrainingArguments`].

    > Parameters that control the video

    num_frames (`int`, defaults to `21`): output frames of a training video (`1 + 4·(latent frames − 1)`, a whole
        number of chunks).
    height, width (`int`, *optional*): pixel size; default: the pipeline's.
    max_sequence_length (`int`, *optional*): text tokens; default: the tokenizer's `model_max_length` when at most
        512, else 512 (the pipeline's rule).
    denoising_sigmas (`list[float]`, *optional*): the few-step schedule; default: the scheduler's (four sigmas).
    context_noise (`float`, defaults to `0`): timestep of the context pass that writes the cache (METHOD §1); the
        same rule in rollouts, histories and inference.
    window_frames (`int`, *optional*), sink_frames (`int`, defaults to `0`): attention window and sinks (latent
        frames) of training rollouts and passes.
    chunk_loss_alpha (`float`, *optional*): α of the chunk-wise loss scaling (METHOD §4); each trainer sets its
        default.

    > Parameters that control generation batches

    steps_per_generation (`int`, *optional*): micro-batches served from one generation batch (rollouts made once,
        then split, as TRL's GRPO trainer does); default: `gradient_accumulation_steps`, so rollouts are made once per
        optimizer step.

    > Parameters that control the prompt-embedding cache

    prompt_cache_size (`int`, *optional*, defaults to `1024`): text-encoder states kept for at most that many prompts
        (least recently used out; `None`: no limit, `0`: encode every time). At Wan scale a prompt's states take up to
        8 MB (512 × 4096 float32; stored without their zero padding).
    prompt_cache_device (`str`, defaults to `"cpu"`): where the cached states live: `"cpu"` (host memory; copied to
        the training device per batch) or `"device"` (the training device, e.g. for small models).

    > Parameters that control the EMA, evaluation and samples

    ema_decay (`float`, *optional*): decay of the EMA of the trained weights (`diffusers.training_utils.EMAModel`
        with a fixed decay); `None` disables it.
    ema_start_step (`int`, defaults to `0`): up to this optimizer step the EMA copies the weights.
    reward_weights (`list[float]`, *optional*): weights of the reward functions (default: 1 each); evaluation
        reports their weighted sum as `reward`.
    sample_every_steps (`int`, *optional*): write a sample video to `output_dir/samples` every that many steps.
    sample_prompts (`list[str]`, *optional*): prompts of the sample videos (default: the first training prompt).
    """

    # Video
    num_frames: int = field(default=21, metadata={"help": "Output frames of a training video (1 + 4k)."})
    height: int | None = field(default=None, metadata={"help": "Pixel height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Pixel width (default: the pipeline's)."})
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Text tokens (default: the tokenizer's model_max_length if ≤ 512, else 512)."}
    )
    denoising_sigmas: list[float] | None = field(
        default=None, metadata={"help": "Few-step schedule (default: the scheduler's, [1.0, 0.9375, 0.8333, 0.625])."}
    )
    context_noise: float = field(default=0.0, metadata={"help": "Timestep of the cache-writing context pass."})
    window_frames: int | None = field(default=None, metadata={"help": "Attention window in latent frames."})
    sink_frames: int = field(default=0, metadata={"help": "Attention sink frames (with a window)."})
    chunk_loss_alpha: float | None = field(
        default=None, metadata={"help": "Chunk-wise loss scaling α (METHOD §4); default set by each trainer."}
    )
    # Generation batches
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches per generation batch (default: gradient_accumulation_steps)."}
    )
    # Prompt-embedding cache
    prompt_cache_size: int | None = field(
        default=1024, metadata={"help": "Prompts whose text states are cached (LRU; None: no limit, 0: none)."}
    )
    prompt_cache_device: str = field(
        default="cpu", metadata={"help": "Where the cached text states live: 'cpu' or 'device' (the training device)."}
    )
    # EMA, evaluation, samples
    ema_decay: float | None = field(default=None, metadata={"help": "EMA decay of the trained weights (None: off)."})
    ema_start_step: int = field(default=0, metadata={"help": "Up to this step the EMA copies the weights."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions (default: 1 each)."}
    )
    sample_every_steps: int | None = field(default=None, metadata={"help": "Write a sample video every N steps."})
    sample_prompts: list[str] | None = field(default=None, metadata={"help": "Prompts of the sample videos."})
    # TrainingArguments defaults changed for video trainers
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the dataset columns (required)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1 or (
            self.num_frames - 1
        ) % 4:
            raise ValueError(f"`num_frames` must be 1 + 4·k output frames, got {self.num_frames!r}.")
        for name in ("height", "width", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if not isinstance(self.context_noise, (int, float)) or self.context_noise < 0:
            raise ValueError(f"`context_noise` is a non-negative timestep, got {self.context_noise!r}.")
        if not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise ValueError(f"`sink_frames` must be a non-negative integer, got {self.sink_frames!r}.")
        if self.sink_frames and self.window_frames is None:
            raise ValueError("`sink_frames` needs a window: set `window_frames` too (or `sink_frames=0`).")
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if not isinstance(self.steps_per_generation, int) or self.steps_per_generation < 1:
            raise ValueError(f"`steps_per_generation` must be a positive integer, got {self.steps_per_generation!r}.")
        if self.prompt_cache_size is not None and (
            isinstance(self.prompt_cache_size, bool) or not isinstance(self.prompt_cache_size, int)
            or self.prompt_cache_size < 0
        ):
            raise ValueError(
                f"`prompt_cache_size` must be a non-negative integer or None, got {self.prompt_cache_size!r}."
            )
        if self.prompt_cache_device not in ("cpu", "device"):
            raise ValueError(f"`prompt_cache_device` must be 'cpu' or 'device', got {self.prompt_cache_device!r}.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must lie in [0, 1) or be None, got {self.ema_decay!r}.")
        if not isinstance(self.ema_start_step, int) or self.ema_start_step < 0:
            raise ValueError(f"`ema_start_step` must be a non-negative integer, got {self.ema_start_step!r}.")
        if self.remove_unused_columns:
            raise ValueError("`remove_unused_columns` must be False: the trainer reads the dataset columns itself.")
        if self.sample_every_steps is not None and (
            not isinstance(self.sample_every_steps, int) or self.sample_every_steps < 1
        ):
            raise ValueError(f"`sample_every_steps` must be a positive integer or None, got {self.sample_every_steps!r}.")
