"""In-memory episodic data modules for Kanerva Machine experiments.

``build_datamodule("mnist" | "omniglot" | "cifar10", **kwargs)``; see
:class:`datamodules.base.InMemoryDataModule` for the arguments and the batch format.
"""

from __future__ import annotations

import importlib
from typing import Any

from .catalog import NAMES
from .paths import DataError, resolve_data_dir

# The torch-using names load on first use (PEP 562), so `from datamodules import DataError` stays cheap.
_LAZY = {
    "InMemoryDataModule": ".base",
    "CIFAR10DataModule": ".cifar10",
    "EpisodeLoader": ".episodes",
    "MNISTDataModule": ".mnist",
    "OmniglotDataModule": ".omniglot",
}
_CLASSES = {"mnist": "MNISTDataModule", "omniglot": "OmniglotDataModule", "cifar10": "CIFAR10DataModule"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name == "DATAMODULES":
        return {n: __getattr__(c) for n, c in _CLASSES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_datamodule(name: str, **kwargs) -> Any:
    """Construct the data module called ``name`` (no data are loaded until ``setup``)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown data set {name!r}; choose from {NAMES}")
    return __getattr__(_CLASSES[name])(**kwargs)


__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "DataError",
    "EpisodeLoader",
    "InMemoryDataModule",
    "MNISTDataModule",
    "OmniglotDataModule",
    "build_datamodule",
    "resolve_data_dir",
]
