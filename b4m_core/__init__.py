"""Break-for-Make: PLP adapters trained with MCP, composed and fine-tuned (the method).

This package is the method alone: it imports no web, database or queue code. Its names
load on first use (PEP 562), so `b4m` commands that only talk to a server start without
importing torch and diffusers.
"""

from importlib import import_module

_WHERE = {
    "Adapter": "adapter",
    "ConfigError": "config",
    "PLPConfig": "config",
    "TrainConfig": "config",
    "Concept": "data",
    "load_concept": "data",
    "GenerationRequest": "generation",
    "Generator": "generation",
    "expand_prompt": "generation",
    "BaseModel": "models",
    "load_base": "models",
    "BreakStage": "training",
    "Hooks": "training",
    "IncompatibleAdapters": "training",
    "MakeStage": "training",
    "TrainingCanceled": "training",
    "TrainingPaused": "training",
    "compose": "training",
    "fuse": "training",
    "train_concept": "training",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'b4m_core' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
