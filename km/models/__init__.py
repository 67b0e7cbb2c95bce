"""Models: `MODELS` maps a name to (LightningModule class, config dataclass).

A model is registered once, in `km.schema.MODELS` (its name, the dotted path of its class, its config
dataclass), plus its `configs/model/<name>.yaml`. The classes import torch and Lightning, so they load on first
use (PEP 562): `from km.models import MODELS` costs nothing until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from km.runs import NonFiniteLossError
from km.schema import CONFIGS, ModelConfig
from km.schema import MODELS as REGISTRY

_BASE = ("EpisodeModel", "EpisodeOutput")


def model_class(name: str) -> type:
    """The LightningModule class of model `name` (imports it)."""
    module, cls = REGISTRY[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(attr: str) -> Any:
    if attr == "MODELS":
        return {name: (model_class(name), cfg) for name, (_, cfg) in REGISTRY.items()}
    if attr in _BASE:
        return getattr(importlib.import_module("km.models.base"), attr)
    for name, (path, cfg) in REGISTRY.items():
        if attr == path.split(":")[1]:
            return model_class(name)
        if attr == cfg.__name__:
            return cfg
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = [
    "CONFIGS",
    "MODELS",
    "REGISTRY",
    "EpisodeModel",
    "EpisodeOutput",
    "ModelConfig",
    "NonFiniteLossError",
    "model_class",
]
