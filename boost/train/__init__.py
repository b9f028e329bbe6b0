"""The BOOST trainer: :class:`Trainer` (``python -m boost.train``) and its :class:`TrainConfig`."""

from boost.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from boost.train.loop import Trainer, prepare_data

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "Trainer", "prepare_data"]
