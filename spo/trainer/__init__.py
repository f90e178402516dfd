"""Trainers on accelerate: GRPO-family baselines and the SPO trainers on one shared loop."""

from .base import RLTrainer
from .config import GRPOConfig
from .grpo import GRPOTrainer
from .samples import Sample

__all__ = ["GRPOConfig", "GRPOTrainer", "RLTrainer", "Sample"]
