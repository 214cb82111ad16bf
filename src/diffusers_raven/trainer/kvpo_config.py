"""Configuration of :class:`KVPOTrainer` (METHOD.md §2, §7, §8)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..training.kvpo import ENERGY_SPACES, FUSIONS, GATES
from .config import VideoTrainerConfig

#: How the fork chunk is drawn: per prompt, or once per generation batch for every prompt and process.
FORK_SAMPLINGS = ("prompt", "batch")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class KVPOConfig(VideoTrainerConfig):
    r"""Configuration of [`KVPOTrainer`]: RL by KV-cache routing, the trajectory velocity energy and a Gibbs policy.

    The video, window, EMA, reward-weight and sample parameters are those of [`VideoTrainerConfig`], the rest those
    of [`~transformers.TrainingArguments`]. Defaults are those of KVPO's reference code unless noted. LoRA (the
    trainer's `peft_config`) is the documented default, and then the initial policy of the KL term is the model with
    its adapter disabled. A row of the dataset is one prompt: its `num_branches` routed branches and its anchor are
    rolled out, scored and trained on one process (`per_device_train_batch_size` counts prompts). A row may instead
    be a prompt schedule (`prompt` a list of prompts, `switch_frames` the output frames at which the next one takes
    over, as the pipeline's arguments): rollouts switch prompt as the pipeline does (LongLive re-cache), forks are
    drawn where no switch falls inside the routed stretch, and each segment is scored against its own prompt.

    > Parameters that control the branches (METHOD §2, §7)

    num_branches (`int`, defaults to `8`): routed branches per prompt (G). They share the initial noise and the
        sampler's noise with each other and with the unrouted anchor: only the routing differs.
    routed_chunks (`int`, defaults to `5`): chunks of the routed stretch (P) after the fork; then every branch
        continues unrouted to the end of the video.
    selected_frames (`int`, defaults to `3`): older frames `n` a branch attends to in the routed stretch, besides the
        sinks and the recent frames (ours; one chunk's worth).
    recent_frames (`int`, defaults to `4`): the `m` most recent frames a routed chunk sees, counting its own frames
        (the reference code's convention: `m = 4` with 3-frame chunks is the chunk and one earlier frame). At least
        the chunk size, at most `window_frames - sink_frames`.
    pool_frames (`int`, *optional*): frames a windowed cache holds (sinks included), the pool the branch plans draw
        from; default `window_frames - 1 + num_branches · selected_frames` (the reference code keeps 33 frames for a
        12-frame window). Needs `window_frames`; a global cache keeps every frame.
    fork_start_chunk (`int`, *optional*), fork_end_chunk (`int`, *optional*): the fork (the first routed chunk) is
        drawn per prompt, uniformly in `[fork_start_chunk, fork_end_chunk]`. Default start: the first chunk at which
        the cache holds enough routable frames for `num_branches` distinct plans of `selected_frames` frames; default
        end: the last chunk at which the routed stretch still fits in the video.
    fork_sampling (`str`, defaults to `"prompt"`): `"prompt"` draws a fork per prompt (seeded by the prompt's place
        in the global generation batch, so the draws do not depend on the number of processes); `"batch"` draws one
        fork per generation batch, shared by every prompt and process. FSDP needs `"batch"`: a sharded forward pass is
        a collective, so every process must run as many passes (a branch rolls from its fork to the end of the video).

    > Parameters that control the rewards and advantages

    reward_weights (`list[float]`, *optional*): weights of the reward functions on the whole video (the global
        rewards; default 1 each); also those of `evaluate()` and of the `reward` metric.
    local_reward_weights (`list[float]`, *optional*): weights of the same functions on the frames of the routed
        stretch (the local rewards); default: `reward_weights`. A weight of 0 leaves a function out of that scope.
    fusion (`str`, defaults to `"std"`): how the local and global anchor-relative advantages combine: `"std"`,
        `"zscore"` or `"none"` (see `fuse_advantages`).
    local_weight (`float`, defaults to `1.0`), global_weight (`float`, defaults to `0.5`): weights of the fusion.
    adv_clip (`float`, *optional*, defaults to `2.5`): the fused advantage is clipped to ±`adv_clip`.
    gate (`str`, defaults to `"skip"`): when no branch beats the anchor, `"skip"` drops the prompt's update, `"scale"`
        multiplies its loss by `1 − π_anchor` (the anchor's probability under the rollout policy), `"none"` never
        gates.

    > Parameters that control the policy loss

    grad_steps (`int`, defaults to `2`): the energy's gradient flows through the first `grad_steps` sampler steps of
        every routed chunk (the later steps count in the energy, without gradient). At most the number of steps.
    energy_space (`str`, defaults to `"velocity"`): `"velocity"` (`w_k = 1`, ours) or `"x0"` (the reference code's
        clean-sample error over `max(σ_k, sigma_floor)²`).
    sigma_floor (`float`, defaults to `1.0`): the σ floor of `energy_space="x0"`.
    ppo_epochs (`int`, defaults to `1`): optimisation passes over each generation batch (TRL's `num_iterations`).
    epsilon_low (`float`, defaults to `0.1`), epsilon_high (`float`, defaults to `0.2`): the ratio is clipped to
        `[1 − epsilon_low, 1 + epsilon_high]`.
    max_log_ratio (`float`, defaults to `20`): the log-ratio is clamped to ±this.
    beta (`float`, defaults to `10.0`): coefficient of the KL to the initial policy (the adapter-disabled model
        under LoRA, else a frozen copy of the start).
    old_policy_sync_every (`int`, defaults to `1`): generation batches between two copies of the trained weights
        into the old policy of the ratio's denominator; `1`: the policy that made the rollouts.
    branches_per_backward (`int`, *optional*): replay this many branches with gradients per backward pass, their
        energies' gradients weighted by the loss's gradient with respect to each energy (computed from the energies
        replayed once without gradients): the same gradient, with the activations of that many branches instead of
        all of a prompt's, for one more replay without gradients. Default: the prompt's branches in one backward pass.
    """

    # Branches
    num_branches: int = field(default=8, metadata={"help": "Routed branches per prompt (G)."})
    routed_chunks: int = field(default=5, metadata={"help": "Chunks of the routed stretch (P)."})
    selected_frames: int = field(default=3, metadata={"help": "Older frames n a branch attends to when routed."})
    recent_frames: int = field(
        default=4, metadata={"help": "Most recent frames m a routed chunk sees, counting its own."}
    )
    pool_frames: int | None = field(
        default=None,
        metadata={"help": "Frames a windowed cache holds (default window_frames - 1 + num_branches·selected_frames)."},
    )
    fork_start_chunk: int | None = field(
        default=None, metadata={"help": "Earliest chunk at which the routed stretch starts (default: the first possible)."}
    )
    fork_end_chunk: int | None = field(
        default=None, metadata={"help": "Latest chunk at which it starts (default: the last at which it fits)."}
    )
    fork_sampling: str = field(
        default="prompt",
        metadata={"help": f"One fork per prompt or per generation batch (shared by all processes; FSDP needs it), one of "
                          f"{FORK_SAMPLINGS}."},
    )
    # Rewards and advantages
    local_reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions on the routed stretch (default reward_weights)."}
    )
    fusion: str = field(default="std", metadata={"help": f"Local/global fusion, one of {FUSIONS}."})
    local_weight: float = field(default=1.0, metadata={"help": "Weight of the local advantage in the fusion."})
    global_weight: float = field(default=0.5, metadata={"help": "Weight of the global advantage in the fusion."})
    adv_clip: float | None = field(default=2.5, metadata={"help": "The fused advantage is clipped to ± this."})
    gate: str = field(default="skip", metadata={"help": f"Safety gate when no branch beats the anchor, one of {GATES}."})
    # Policy loss
    grad_steps: int = field(default=2, metadata={"help": "Sampler steps the energy's gradient flows through."})
    energy_space: str = field(default="velocity", metadata={"help": f"Energy weights, one of {ENERGY_SPACES}."})
    sigma_floor: float = field(default=1.0, metadata={"help": "σ floor of energy_space='x0'."})
    ppo_epochs: int = field(default=1, metadata={"help": "Optimisation passes per generation batch."})
    epsilon_low: float = field(default=0.1, metadata={"help": "Lower clip of the ratio (1 − epsilon_low)."})
    epsilon_high: float = field(default=0.2, metadata={"help": "Upper clip of the ratio (1 + epsilon_high)."})
    max_log_ratio: float = field(default=20.0, metadata={"help": "The log-ratio is clamped to ± this."})
    beta: float = field(default=10.0, metadata={"help": "KL coefficient to the initial policy."})
    old_policy_sync_every: int = field(
        default=1, metadata={"help": "Generation batches between two syncs of the old policy."}
    )
    branches_per_backward: int | None = field(
        default=None,
        metadata={"help": "Branches replayed with gradients per backward pass (default: all of a prompt's in one)."},
    )
    # Defaults changed for KVPO
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Prompts per micro-batch and process."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate (of the LoRA adapter by default)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("num_branches", 2), ("routed_chunks", 1), ("selected_frames", 1), ("recent_frames", 1),
                          ("grad_steps", 1), ("ppo_epochs", 1),
                          ("old_policy_sync_every", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"`{name}` must be an integer ≥ {low}, got {value!r}.")
        if self.fork_start_chunk is not None and (not _is_int(self.fork_start_chunk) or self.fork_start_chunk < 1):
            raise ValueError(f"`fork_start_chunk` must be an integer ≥ 1 or None, got {self.fork_start_chunk!r}.")
        if self.fork_end_chunk is not None and (
            not _is_int(self.fork_end_chunk) or self.fork_end_chunk < (self.fork_start_chunk or 1)
        ):
            raise ValueError(
                f"`fork_end_chunk` must be an integer ≥ `fork_start_chunk` ({self.fork_start_chunk or 1}) or None, "
                f"got {self.fork_end_chunk!r}."
            )
        if self.branches_per_backward is not None and (
            not _is_int(self.branches_per_backward) or self.branches_per_backward < 1
        ):
            raise ValueError(
                f"`branches_per_backward` must be an integer ≥ 1 or None, got {self.branches_per_backward!r}."
            )
        if self.fork_sampling not in FORK_SAMPLINGS:
            raise ValueError(f"`fork_sampling` must be one of {FORK_SAMPLINGS}, got {self.fork_sampling!r}.")
        if self.window_frames is not None and self.recent_frames > self.window_frames - self.sink_frames:
            raise ValueError(
                f"`recent_frames` ({self.recent_frames}) is larger than the window: at most `window_frames - "
                f"sink_frames` = {self.window_frames - self.sink_frames}."
            )
        if self.pool_frames is not None:
            if self.window_frames is None:
                raise ValueError(
                    "`pool_frames` needs a window (`window_frames`): a global cache already keeps every frame."
                )
            need = self.window_frames - 1 + self.selected_frames
            if not _is_int(self.pool_frames) or self.pool_frames < need:
                raise ValueError(
                    f"`pool_frames` ({self.pool_frames!r}) must hold the window's frames and the pinned selected "
                    f"frames: at least `window_frames - 1 + selected_frames` = {need}."
                )
        elif self.window_frames is not None:
            self.pool_frames = self.window_frames - 1 + self.num_branches * self.selected_frames
        if self.denoising_sigmas is not None and self.grad_steps > len(self.denoising_sigmas):
            raise ValueError(
                f"`grad_steps` ({self.grad_steps}) is beyond the {len(self.denoising_sigmas)} steps of "
                "`denoising_sigmas`."
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"`fusion` must be one of {FUSIONS}, got {self.fusion!r}.")
        if self.gate not in GATES:
            raise ValueError(f"`gate` must be one of {GATES}, got {self.gate!r}.")
        if self.energy_space not in ENERGY_SPACES:
            raise ValueError(f"`energy_space` must be one of {ENERGY_SPACES}, got {self.energy_space!r}.")
        if not 0 < self.sigma_floor <= 1:
            raise ValueError(f"`sigma_floor` must lie in (0, 1], got {self.sigma_floor!r}.")
        for name in ("local_weight", "global_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number ≥ 0, got {value!r}.")
        if self.local_weight == self.global_weight == 0:
            raise ValueError("`local_weight` and `global_weight` must not both be 0.")
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"`adv_clip` must be positive or None, got {self.adv_clip!r}.")
        if not 0 < self.epsilon_low < 1 or not self.epsilon_high > 0:
            raise ValueError(
                f"Need 0 < `epsilon_low` < 1 and `epsilon_high` > 0, got {self.epsilon_low!r} and "
                f"{self.epsilon_high!r}."
            )
        if not self.max_log_ratio > 0:
            raise ValueError(f"`max_log_ratio` must be positive, got {self.max_log_ratio!r}.")
        if not self.beta >= 0:
            raise ValueError(f"`beta` must be non-negative, got {self.beta!r}.")
        if self.local_reward_weights is None:
            self.local_reward_weights = None if self.reward_weights is None else list(self.reward_weights)
