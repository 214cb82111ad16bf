"""Schedulers of diffusers-raven (METHOD §0–§1): the few-step consistency sampler, the Flow-GRPO SDE sampler and
the Gaussian transition kernels they return for RL. A leaf package: it imports nothing else from diffusers_raven."""

from .scheduling_consistency import ConsistencyFlowMatchScheduler, SchedulerStepOutput, expand_sigma
from .scheduling_sde import FlowMatchSDEScheduler
from .transitions import GaussianTransition

__all__ = [
    "ConsistencyFlowMatchScheduler",
    "FlowMatchSDEScheduler",
    "GaussianTransition",
    "SchedulerStepOutput",
    "expand_sigma",
]
