"""In-memory episodic data modules for Kanerva Machine experiments.

``build_datamodule("mnist" | "omniglot" | "cifar10", **kwargs)``; see
:class:`datamodules.base.InMemoryDataModule` for the arguments and the batch format.
"""

from __future__ import annotations

from .base import InMemoryDataModule
from .cifar10 import CIFAR10DataModule
from .episodes import EpisodeLoader
from .mnist import MNISTDataModule
from .omniglot import OmniglotDataModule
from .paths import DataError, resolve_data_dir

DATAMODULES: dict[str, type[InMemoryDataModule]] = {
    "mnist": MNISTDataModule,
    "omniglot": OmniglotDataModule,
    "cifar10": CIFAR10DataModule,
}


def build_datamodule(name: str, **kwargs) -> InMemoryDataModule:
    """Construct the data module called ``name`` (no data are loaded until ``setup``)."""
    if name not in DATAMODULES:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(DATAMODULES)}")
    return DATAMODULES[name](**kwargs)


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
