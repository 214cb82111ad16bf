"""Trainers in TRL 1.x form: a ``...Config`` extending ``transformers.TrainingArguments`` and a ``...Trainer``
extending ``transformers.Trainer``."""

from .base import CausalVideoTrainerBase
from .ode_trainer import ODERegressionConfig, ODERegressionTrainer, build_ode_dataset
from .raven_config import HISTORY_MODES, RavenConfig
from .raven_trainer import RavenTrainer

__all__ = [
    "HISTORY_MODES",
    "CausalVideoTrainerBase",
    "ODERegressionConfig",
    "ODERegressionTrainer",
    "RavenConfig",
    "RavenTrainer",
    "build_ode_dataset",
]
