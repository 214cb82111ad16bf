"""Trainers in TRL 1.x form: a ``...Config`` extending :class:`VideoTrainerConfig` (itself a
``transformers.TrainingArguments``) and a ``...Trainer`` extending :class:`CausalVideoTrainerBase` (itself a
``transformers.Trainer``)."""

from .base import CausalVideoTrainerBase
from .cmgrpo_config import CMGRPOConfig
from .cmgrpo_trainer import CMGRPOTrainer
from .config import VideoTrainerConfig
from .kvpo_config import KVPOConfig
from .kvpo_trainer import KVPOTrainer
from .ode_trainer import ODERegressionConfig, ODERegressionTrainer, build_ode_dataset
from .raven_config import HISTORY_MODES, RavenConfig
from .raven_trainer import RavenTrainer

__all__ = [
    "HISTORY_MODES",
    "CMGRPOConfig",
    "CMGRPOTrainer",
    "CausalVideoTrainerBase",
    "KVPOConfig",
    "KVPOTrainer",
    "ODERegressionConfig",
    "ODERegressionTrainer",
    "RavenConfig",
    "RavenTrainer",
    "VideoTrainerConfig",
    "build_ode_dataset",
]
