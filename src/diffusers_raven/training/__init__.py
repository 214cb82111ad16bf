"""Algorithm pieces shared by the trainers: pure functions, each tested against an independent computation."""

from .chunk_weights import chunk_weights, frame_weights, participation_scores, participation_transform, weighted_mean
from .dmd import critic_loss, dmd_gradient, dmd_loss, flow_matching_loss, sample_dmd_timesteps
from .ode import ode_regression_inputs, ode_regression_loss, shifted_grid, teacher_ode_trajectory
from .rollout import RolloutRecord, pack_interleaved, sample_steps

__all__ = [
    "RolloutRecord",
    "chunk_weights",
    "critic_loss",
    "dmd_gradient",
    "dmd_loss",
    "flow_matching_loss",
    "frame_weights",
    "pack_interleaved",
    "ode_regression_inputs",
    "ode_regression_loss",
    "participation_scores",
    "participation_transform",
    "sample_dmd_timesteps",
    "sample_steps",
    "shifted_grid",
    "teacher_ode_trajectory",
    "weighted_mean",
]
