"""diffusers-raven: streaming autoregressive video diffusion for the Hugging Face ecosystem.

Public names are imported lazily so that ``import diffusers_raven`` stays cheap and the training stack
(``trl``, ``peft``, ``datasets``) is only needed by the trainers.
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING as _TYPE_CHECKING

__version__ = "0.1.0.dev0"

_LAZY = {
    # Re-exported so that diffusers resolves ``["diffusers_raven", "<Class>"]`` entries of model_index.json.
    "DiffusionPipeline": "diffusers",
    "ModelMixin": "diffusers",
    "SchedulerMixin": "diffusers",
    "CausalWanTransformer3DModel": "diffusers_raven.models",
    "KVCache": "diffusers_raven.models",
    "ConsistencyFlowMatchScheduler": "diffusers_raven.schedulers",
    "FlowMatchSDEScheduler": "diffusers_raven.schedulers",
    "GaussianTransition": "diffusers_raven.schedulers",
    "CausalVideoPipeline": "diffusers_raven.pipelines",
    "CausalVideoPipelineOutput": "diffusers_raven.pipelines",
    "CausalVideoChunk": "diffusers_raven.pipelines",
    "CMGRPOConfig": "diffusers_raven.trainer",
    "CMGRPOTrainer": "diffusers_raven.trainer",
    "KVPOConfig": "diffusers_raven.trainer",
    "KVPOTrainer": "diffusers_raven.trainer",
    "ODERegressionConfig": "diffusers_raven.trainer",
    "ODERegressionTrainer": "diffusers_raven.trainer",
    "RavenConfig": "diffusers_raven.trainer",
    "RavenTrainer": "diffusers_raven.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffusers_raven' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if _TYPE_CHECKING:  # pragma: no cover
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: F401

    from .models import CausalWanTransformer3DModel, KVCache  # noqa: F401
    from .pipelines import CausalVideoChunk, CausalVideoPipeline, CausalVideoPipelineOutput  # noqa: F401
    from .schedulers import ConsistencyFlowMatchScheduler, FlowMatchSDEScheduler, GaussianTransition  # noqa: F401
    from .trainer import (  # noqa: F401
        CMGRPOConfig,
        CMGRPOTrainer,
        KVPOConfig,
        KVPOTrainer,
        ODERegressionConfig,
        ODERegressionTrainer,
        RavenConfig,
        RavenTrainer,
    )
