"""Algorithm pieces shared by the trainers: pure functions, each tested against an independent computation."""

from .chunk_weights import chunk_weights, frame_weights, participation_scores, participation_transform, weighted_mean
from .dmd import critic_loss, dmd_gradient, dmd_loss, flow_matching_loss, sample_dmd_timesteps
from .grpo import (
    aggregate_rewards,
    cm_grpo_loss,
    group_advantages,
    ppo_clip_loss,
    reference_kl,
    reference_kl_loss,
)
from .kvpo import (
    GateDecision,
    anchor_advantages,
    branch_plans,
    fuse_advantages,
    gibbs_log_policy,
    kvpo_loss,
    recorded_velocity,
    safety_gate,
    trajectory_velocity_energy,
)
from .ode import ode_regression_inputs, ode_regression_loss, shifted_grid, teacher_ode_trajectory
from .rollout import RolloutRecord, pack_interleaved, sample_steps

__all__ = [
    "GateDecision",
    "RolloutRecord",
    "aggregate_rewards",
    "anchor_advantages",
    "branch_plans",
    "chunk_weights",
    "cm_grpo_loss",
    "critic_loss",
    "dmd_gradient",
    "dmd_loss",
    "flow_matching_loss",
    "frame_weights",
    "fuse_advantages",
    "gibbs_log_policy",
    "group_advantages",
    "kvpo_loss",
    "pack_interleaved",
    "ode_regression_inputs",
    "ode_regression_loss",
    "participation_scores",
    "participation_transform",
    "ppo_clip_loss",
    "recorded_velocity",
    "reference_kl",
    "reference_kl_loss",
    "safety_gate",
    "sample_dmd_timesteps",
    "sample_steps",
    "shifted_grid",
    "teacher_ode_trajectory",
    "trajectory_velocity_energy",
    "weighted_mean",
]
