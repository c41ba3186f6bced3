"""Break-for-Make: PLP adapters trained with MCP, composed and fine-tuned (the method).

This package is the method alone: it imports no web, database or queue code.
"""

from .adapter import Adapter
from .config import ConfigError, PLPConfig, TrainConfig
from .data import Concept, load_concept
from .generation import GenerationRequest, Generator, expand_prompt
from .models import BaseModel, load_base
from .training import (BreakStage, Hooks, IncompatibleAdapters, MakeStage, TrainingCanceled, compose, fuse,
                       train_concept)

__all__ = ["Adapter", "BaseModel", "BreakStage", "Concept", "ConfigError", "GenerationRequest", "Generator",
           "Hooks", "IncompatibleAdapters", "MakeStage", "PLPConfig", "TrainConfig", "TrainingCanceled", "compose",
           "expand_prompt", "fuse", "load_base", "load_concept", "train_concept"]
