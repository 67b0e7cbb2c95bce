"""Binarised MNIST (Larochelle & Murray 50k/10k/10k split), static or dynamic binarisation.

``binarize="static"``: the fixed binary arrays of ``binarized_mnist/binarized_mnist.npz``.
Its train and valid parts are shuffled and carry no labels (y = -1). Its test part is the MNIST
test set sorted by class (stable, in MNIST order): matching each binary image to the most likely
grey MNIST test image gives labels 0..9 in blocks of ``TEST_CLASS_COUNTS`` with no exception,
every boundary item's best match is in its block by >= 62 nats, and `tests/test_data.py` checks
a sample on every run. So the test split has labels and supports ``eval_episodes=class``.

``binarize="dynamic"`` (training only): grey MNIST training images (``MNIST/raw/train-*``, with
labels), re-binarised by Bernoulli(grey / 255) for every batch drawn; val/test stay the static
Larochelle arrays. The Larochelle train/valid parts are a shuffled split of all 60,000 MNIST
training images (not its first 50,000), so the dynamic training set is those 60,000 minus the
9,991 grey images in ``mnist_valid_sources.npy``: the maximum-likelihood source (under
Bernoulli(grey / 255)) of each of the 10,000 validation images (`ml_sources`; nine pairs of
validation images share a source). It leaves 50,009 images, and validation is disjoint from
dynamic training. Using MNIST's first 50,000 instead, as an earlier version did, trained on the
sources of 8,404 validation images. For 94% of validation images the runner-up source is more
than 10 nats less likely; the rest are thin digits that several grey images explain about as well.
`tests/test_data.py` re-derives the source of a sample of validation images on every run.
To regenerate the file (about 30 s)::

    src, _ = ml_sources(read_binarized_npz(NPZ)["valid"], read_idx(TRAIN_IMAGES).reshape(-1, 784))
    np.save("datamodules/mnist_valid_sources.npy", np.unique(src).astype(np.uint16))
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .base import InMemoryDataModule
from .catalog import MNIST_NPZ as NPZ  # noqa: E402
from .catalog import MNIST_TRAIN_IMAGES as TRAIN_IMAGES  # noqa: E402
from .catalog import MNIST_TRAIN_LABELS as TRAIN_LABELS  # noqa: E402
from .paths import DataError, DataFiles

VALID_SOURCES = Path(__file__).with_name("mnist_valid_sources.npy")  # MNIST train indices behind Larochelle valid
TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)  # digits 0..9 of MNIST t10k


def read_binarized_npz(path: Path) -> dict[str, np.ndarray]:
    """{"train", "valid", "test"}: uint8 (N, 784) arrays of 0/1."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # our handle: numpy leaks its own on a bad zip
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


def ml_sources(binary: np.ndarray, grey: np.ndarray, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """For each binary image (N, 784) of 0/1, the index of the grey image (G, 784) of 0..255 under which it
    is most likely as Bernoulli(grey / 255) draws, and that log-likelihood's margin (nats) over the runner-up."""
    p = torch.from_numpy(grey.astype(np.float32) / 255).clamp(1e-6, 1 - 1e-6)  # (G, 784)
    log1, log0 = p.log(), (1 - p).log()
    W, c = (log1 - log0).T.contiguous(), log0.sum(1)  # ln p(x|g) = x . W[:, g] + c[g]
    idx, gap = [], []
    for i in range(0, len(binary), chunk):
        top = (torch.from_numpy(binary[i : i + chunk]).float() @ W + c).topk(2, dim=1)
        idx.append(top.indices[:, 0])
        gap.append(top.values[:, 0] - top.values[:, 1])
    return torch.cat(idx).numpy(), torch.cat(gap).numpy()


def dynamic_train_indices() -> np.ndarray:
    """MNIST training-image indices of the dynamic training set: all 60,000 but the validation sources."""
    return np.setdiff1d(np.arange(60_000), np.load(VALID_SOURCES).astype(np.int64))


class MNISTDataModule(InMemoryDataModule):
    """Binarised MNIST, image (1, 28, 28), Bernoulli likelihood."""

    name = "mnist"
    labels_hint = (
        "The static Larochelle training arrays carry no labels: add data.binarize=dynamic "
        "(the grey MNIST training images, with labels)."
    )
    image_shape = (1, 28, 28)
    likelihood = "bernoulli"
    default_val_size = 10_000

    def __init__(self, binarize: str = "static", **kwargs):
        super().__init__(**kwargs)
        if binarize not in ("static", "dynamic"):
            raise ValueError(f"binarize must be 'static' or 'dynamic', got {binarize!r}")
        if self.val_size != self.default_val_size:
            raise DataError(
                f"data.val_size={self.val_size}: mnist uses the fixed Larochelle split (10000 validation images); "
                "leave data.val_size unset (null)"
            )
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
            keep = dynamic_train_indices()  # (50009,) disjoint from the validation images' sources
            grey = files.load(TRAIN_IMAGES, read_idx)[keep]  # (50009, 28, 28) 0..255
            labels = files.load(TRAIN_LABELS, read_idx)[keep]  # (50009,)
            splits["train"] = (torch.from_numpy(grey).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
            self.dynamic_splits = {"train"}
        return splits
