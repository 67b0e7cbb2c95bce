"""``km data download NAME``: fetch a data set (needs internet) and write the local layout.

torchvision downloads into a temporary folder under the cache dir; the pure conversion
functions below turn its output into the files of shared/data/README.md. Files written here
are listed with their md5 in ``<data_dir>/km_manifest.json`` (converted files differ from
the shared copies byte for byte), which :mod:`datamodules.paths` accepts.
"""

from __future__ import annotations

import hashlib
import lzma
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .paths import MANIFEST, DataError, cache_dir, md5_file, read_json, write_json_atomic

AMAT_URL = "https://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"
# md5 of each split's content (the uint8 (N, 784) array's bytes), pinned from the shared copy
# (shared/data/binarized_mnist/binarized_mnist.npz): whatever the transport, a changed file is refused.
AMAT_CONTENT_MD5 = {
    "train": "8d4f0427d6c2572b5e9994e08bad66de",
    "valid": "3e33becd40c694040e5e6c812e2f4b50",
    "test": "fc34623e13bd64fed2f8b61365198339",
}
MNIST_RAW = [f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
_OMNIGLOT_NAME = re.compile(r"(\d{4})_(\d{2})\.png$")


def parse_amat(text: str) -> np.ndarray:
    """Larochelle ``.amat`` text (one image of 784 space-separated 0/1 per line) -> uint8 (N, 784)."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    images = np.array(rows, dtype=np.float64).astype(np.uint8)
    if images.ndim != 2 or images.shape[1] != 784 or images.max(initial=0) > 1:
        raise ValueError(f"not a binarized MNIST .amat: array {images.shape}")
    return images


def checked_split(split: str, images: np.ndarray) -> np.ndarray:
    """`images` if their content md5 is the pinned one of `split` (AMAT_CONTENT_MD5), else ValueError."""
    got = hashlib.md5(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()
    if got != AMAT_CONTENT_MD5[split]:
        raise ValueError(f"binarized MNIST {split}: content md5 {got} != pinned {AMAT_CONTENT_MD5[split]}")
    return images


def pack_omniglot(items: Iterable[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """(file name ``XXXX_YY.png``, bool image) pairs -> {"images": bool (n_chars, 20, H, W), "labels"}.

    Characters are ordered by XXXX and drawers by YY, so ``images[i, j]`` is the i-th
    character's drawer ``j + 1``; ``labels[i, j] == i``.
    """
    by_key = {}
    for name, image in items:
        match = _OMNIGLOT_NAME.search(name)
        if match is None:
            raise ValueError(f"unexpected Omniglot file name {name!r}")
        by_key[int(match[1]), int(match[2])] = np.asarray(image, dtype=bool)
    chars = sorted({c for c, _ in by_key})
    drawers = sorted({d for _, d in by_key})
    if len(drawers) != 20 or len(by_key) != 20 * len(chars):
        raise ValueError(f"expected 20 drawers for each of {len(chars)} characters, got {len(by_key)} images")
    images = np.stack([np.stack([by_key[c, d] for d in drawers]) for c in chars])  # (n_chars, 20, H, W)
    labels = np.repeat(np.arange(len(chars), dtype=np.int64)[:, None], 20, axis=1)  # (n_chars, 20)
    return {"images": images, "labels": labels}


def cifar_files(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, classes: list[str]
) -> dict[str, np.ndarray | dict[str, np.ndarray]]:
    """HWC uint8 CIFAR-10 arrays -> {"train_k.npy.xz": (N/5, 32, 32, 3), "test.npy.xz", "labels.npz": {...}}."""
    shards = np.split(np.ascontiguousarray(train_x, dtype=np.uint8), 5)
    files: dict = {f"train_{k}.npy.xz": shard for k, shard in enumerate(shards)}
    files["test.npy.xz"] = np.ascontiguousarray(test_x, dtype=np.uint8)
    files["labels.npz"] = {
        "train_labels": np.asarray(train_y, dtype=np.uint8),
        "test_labels": np.asarray(test_y, dtype=np.uint8),
        "classes": np.array(classes),
    }
    return files


def save_npy_xz(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as an xz-compressed .npy file."""
    with lzma.open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def record_in_manifest(data_dir: Path, rel_paths: Iterable[str]) -> None:
    """Add the md5s of ``rel_paths`` (relative to ``data_dir``) to ``km_manifest.json``."""
    manifest = read_json(data_dir / MANIFEST)
    manifest.setdefault("md5", {}).update({rel: md5_file(data_dir / rel) for rel in rel_paths})
    write_json_atomic(data_dir / MANIFEST, manifest)


def _mnist(tmp: Path, data_dir: Path) -> list[str]:
    from torchvision.datasets import MNIST

    MNIST(tmp, download=True)
    (data_dir / "MNIST/raw").mkdir(parents=True, exist_ok=True)
    for name in MNIST_RAW:
        shutil.copyfile(tmp / "MNIST/raw" / name, data_dir / "MNIST/raw" / name)
    splits = {}
    for split in ("train", "valid", "test"):
        with urllib.request.urlopen(AMAT_URL.format(split), timeout=60) as response:
            splits[split] = checked_split(split, parse_amat(response.read().decode()))
    (data_dir / "binarized_mnist").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(data_dir / "binarized_mnist/binarized_mnist.npz", **splits)
    return [f"MNIST/raw/{name}" for name in MNIST_RAW] + ["binarized_mnist/binarized_mnist.npz"]


def _omniglot(tmp: Path, data_dir: Path) -> list[str]:
    from PIL import Image
    from torchvision.datasets import Omniglot

    (data_dir / "omniglot").mkdir(parents=True, exist_ok=True)
    written = []
    for background, stem in ((True, "images_background"), (False, "images_evaluation")):
        Omniglot(tmp, background=background, download=True)
        pngs = sorted((tmp / "omniglot-py" / stem).glob("*/*/*.png"))
        packed = pack_omniglot((p.name, np.array(Image.open(p).convert("1"))) for p in pngs)
        np.savez_compressed(data_dir / f"omniglot/{stem}.npz", **packed)
        written.append(f"omniglot/{stem}.npz")
    return written


def _cifar10(tmp: Path, data_dir: Path) -> list[str]:
    from torchvision.datasets import CIFAR10

    train, test = CIFAR10(tmp, train=True, download=True), CIFAR10(tmp, train=False, download=True)
    files = cifar_files(train.data, np.array(train.targets), test.data, np.array(test.targets), train.classes)
    (data_dir / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if name.endswith(".npz"):
            np.savez_compressed(data_dir / "cifar10" / name, **content)
        else:
            save_npy_xz(data_dir / "cifar10" / name, content)
    return [f"cifar10/{name}" for name in files]


_FETCHERS = {"mnist": _mnist, "omniglot": _omniglot, "cifar10": _cifar10}


def download(name: str, data_dir: Path) -> None:
    """Download data set ``name`` into ``data_dir`` in the local layout; failures raise a one-line DataError."""
    if name not in _FETCHERS:
        raise DataError(f"unknown data set {name!r}; choose from {sorted(_FETCHERS)}")
    data_dir = Path(data_dir).expanduser().resolve()
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f"download-{name}-") as tmp:
            written = _FETCHERS[name](Path(tmp), data_dir)
        record_in_manifest(data_dir, written)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        raise DataError(
            f"{name}: download into {data_dir} failed ({reason}). Check the internet connection and that"
            f" the folder is writable, or copy the files by hand (layout: shared/data/README.md)"
        ) from None
