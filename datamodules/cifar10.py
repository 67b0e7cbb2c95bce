"""CIFAR-10 from xz-compressed .npy shards; decompressed shards are cached as .npy.

Images are kept as uint8 (N, 3, 32, 32); batches are uint8 / 255 (the model maps them to bins,
discretised logistic likelihood). Val is carved from train by a fixed permutation (seed 0).
"""

from __future__ import annotations

import lzma
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import InMemoryDataModule, carve_val
from .catalog import CIFAR_LABELS as LABELS
from .catalog import CIFAR_TEST_SHARD as TEST_SHARD
from .catalog import CIFAR_TRAIN_SHARDS as TRAIN_SHARDS
from .paths import DataFiles, cache_dir, cached_md5

SHARD_SHAPE = (10_000, 32, 32, 3)


def read_shard(path: Path) -> np.ndarray:
    """uint8 HWC images (10000, 32, 32, 3) from a .npy or .npy.xz file."""
    with lzma.open(path) if path.suffix == ".xz" else open(path, "rb") as f:
        images = np.load(f, allow_pickle=False)
    if images.dtype != np.uint8 or images.shape != SHARD_SHAPE:
        raise ValueError(f"{images.dtype} {images.shape}, expected uint8 {SHARD_SHAPE}")
    return images


def read_labels(path: Path) -> dict[str, np.ndarray]:
    """{"train": (50000,), "test": (10000,)} integer labels 0..9."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # our handle: numpy leaks its own on a bad zip
        return {"train": z["train_labels"].astype(np.int64), "test": z["test_labels"].astype(np.int64)}


def cached_shard(files: DataFiles, rel: str) -> np.ndarray:
    """Shard ``rel``, decompressed once into <cache>/cifar10/<name>-<md5>.npy."""
    md5 = cached_md5(files.verified(rel))
    try:  # a cache must never stop a run: without one, each run decompresses the shard itself
        cached = cache_dir() / "cifar10" / f"{Path(rel).name.removesuffix('.npy.xz')}-{md5}.npy"
    except OSError:
        return files.load(rel, read_shard)
    if cached.is_file():
        try:
            return read_shard(cached)
        except Exception:  # a broken cache entry is rebuilt, never reported
            cached.unlink(missing_ok=True)
    images = files.load(rel, read_shard)
    from km.runs import atomic_write

    try:
        atomic_write(cached, lambda f: np.save(f, images))
    except OSError:
        pass
    return images


def to_chw(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) array -> contiguous uint8 (N, C, H, W) tensor."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10, image (3, 32, 32), discretised logistic likelihood."""

    name = "cifar10"
    image_shape = (3, 32, 32)
    likelihood = "logistic"
    default_val_size = 5000

    def required_files(self) -> list[str]:
        return [*TRAIN_SHARDS, TEST_SHARD, LABELS]

    def _load(self, files: DataFiles) -> dict:
        labels = files.load(LABELS, read_labels)
        x = to_chw(np.concatenate([cached_shard(files, rel) for rel in TRAIN_SHARDS]))  # (50000, 3, 32, 32)
        x_train, y_train, x_val, y_val = carve_val(x, torch.from_numpy(labels["train"]), self.val_size)
        x_test = to_chw(cached_shard(files, TEST_SHARD))  # (10000, 3, 32, 32)
        return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, torch.from_numpy(labels["test"]))}
