"""Binarised MNIST (Larochelle & Murray 50k/10k/10k split), static or dynamic binarisation.

``binarize="static"``: the fixed binary arrays of ``binarized_mnist/binarized_mnist.npz``.
Its train and valid parts are shuffled and carry no labels (y = -1). Its test part is the MNIST
test set sorted by class (stable, in MNIST order): matching each binary image to the most likely
grey MNIST test image gives labels 0..9 in blocks of ``TEST_CLASS_COUNTS`` with no exception,
every boundary item's best match is in its block by >= 62 nats, and `tests/test_data.py` checks
a sample on every run. So the test split has labels and supports ``eval_episodes=class``.

``binarize="dynamic"`` (training only): the first 50,000 grey MNIST training images
(``MNIST/raw/train-*``, with labels), re-binarised by Bernoulli(grey / 255) for every batch drawn;
val/test stay the static Larochelle arrays. Caveat, found by the same matching: the Larochelle
train/valid parts are a shuffled split of all 60,000 MNIST training images, not its first 50,000,
so 8,404 of the 10,000 validation images are binarisations of images in this dynamic training
set. Val numbers (and checkpoint selection) under ``dynamic`` are therefore optimistic; the test
split (t10k) is disjoint from both.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .base import InMemoryDataModule
from .paths import DataFiles

NPZ = "binarized_mnist/binarized_mnist.npz"
TRAIN_IMAGES = "MNIST/raw/train-images-idx3-ubyte.gz"
TRAIN_LABELS = "MNIST/raw/train-labels-idx1-ubyte.gz"
N_TRAIN = 50_000
TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)  # digits 0..9 of MNIST t10k


def read_binarized_npz(path: Path) -> dict[str, np.ndarray]:
    """{"train", "valid", "test"}: uint8 (N, 784) arrays of 0/1."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("train", "valid", "test")}
    for key, n in (("train", 50_000), ("valid", 10_000), ("test", 10_000)):
        if arrays[key].shape != (n, 784) or arrays[key].max() > 1:
            raise ValueError(f"{key}: shape {arrays[key].shape}, expected ({n}, 784) of 0/1")
    return arrays


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): uint8 images (N, 28, 28) or labels (N,)."""
    data = gzip.open(path).read()
    ndim = data[3]
    dims = np.frombuffer(data[4 : 4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class MNISTDataModule(InMemoryDataModule):
    """Binarised MNIST, image (1, 28, 28), Bernoulli likelihood."""

    name = "mnist"
    labels_hint = ("The static Larochelle training arrays carry no labels: add data.binarize=dynamic "
                   "(the grey MNIST training images, with labels).")
    image_shape = (1, 28, 28)
    likelihood = "bernoulli"
    default_val_size = 10_000

    def __init__(self, binarize: str = "static", **kwargs):
        super().__init__(**kwargs)
        if binarize not in ("static", "dynamic"):
            raise ValueError(f"binarize must be 'static' or 'dynamic', got {binarize!r}")
        if self.val_size != self.default_val_size:
            raise ValueError("mnist uses the fixed Larochelle split: val_size is 10000")
        self.binarize = binarize

    def required_files(self) -> list[str]:
        return [NPZ, TRAIN_IMAGES, TRAIN_LABELS] if self.binarize == "dynamic" else [NPZ]

    def _load(self, files: DataFiles) -> dict:
        static = files.load(NPZ, read_binarized_npz)
        splits = {}
        for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
            x = torch.from_numpy(static[key]).view(-1, *self.image_shape)  # (N, 1, 28, 28) 0/1
            splits[split] = (x, torch.full((len(x),), -1, dtype=torch.long))
        counts = torch.tensor(TEST_CLASS_COUNTS)
        if counts.sum() == len(splits["test"][0]):  # the Larochelle test part: MNIST t10k sorted by class
            splits["test"] = (splits["test"][0], torch.repeat_interleave(torch.arange(10), counts))
        if self.binarize == "dynamic":
            grey = files.load(TRAIN_IMAGES, read_idx)[:N_TRAIN]  # (50000, 28, 28) 0..255
            labels = files.load(TRAIN_LABELS, read_idx)[:N_TRAIN]  # (50000,)
            splits["train"] = (torch.from_numpy(grey.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
            self.dynamic_splits = {"train"}
        return splits
