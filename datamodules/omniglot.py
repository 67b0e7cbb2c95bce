"""Omniglot (Lake et al.) downscaled to ``image_size``: background set = train (+ val), evaluation = test.

Ink (``1 - images``) is resized 105 -> ``image_size`` with antialiased bilinear (area-like)
interpolation to grey [0, 1], then binarised once by Bernoulli draws from a generator seeded 0
(background first, then evaluation). ``binarize="dynamic"`` keeps training images grey
(uint8 0..255) and re-binarises every batch; val/test are always the static images.
Labels are character indices, evaluation offset by the number of background characters (964).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import InMemoryDataModule, bernoulli_fixed, carve_val
from .catalog import OMNIGLOT_BACKGROUND as BACKGROUND  # noqa: E402
from .catalog import OMNIGLOT_EVALUATION as EVALUATION  # noqa: E402
from .paths import DataFiles


def read_images(path: Path) -> np.ndarray:
    """bool (n_chars, 20, 105, 105), True = paper."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # our handle: numpy leaks its own on a bad zip
        images = z["images"]
    if images.dtype != bool or images.shape[1:] != (20, 105, 105):
        raise ValueError(f"images: {images.dtype} {images.shape}, expected bool (n, 20, 105, 105)")
    return images


def ink_grey(images: np.ndarray, size: int, chunk: int = 4096) -> Tensor:
    """Paper-True bool images (..., 105, 105) -> ink grey float32 (N, 1, size, size) in [0, 1]."""
    flat = torch.from_numpy(images.reshape(-1, 1, *images.shape[-2:]))  # (N, 1, 105, 105) bool
    return torch.cat(
        [
            F.interpolate((~part).float(), size=(size, size), mode="bilinear", antialias=True)
            for part in flat.split(chunk)
        ]
    ).clamp_(0, 1)


class OmniglotDataModule(InMemoryDataModule):
    """Omniglot, image (1, S, S) with S = ``image_size`` (28 or 32), Bernoulli likelihood."""

    name = "omniglot"
    likelihood = "bernoulli"
    default_val_size = 1000

    def __init__(self, binarize: str = "static", image_size: int = 28, **kwargs):
        super().__init__(**kwargs)
        if binarize not in ("static", "dynamic"):
            raise ValueError(f"binarize must be 'static' or 'dynamic', got {binarize!r}")
        self.binarize, self.image_shape = binarize, (1, image_size, image_size)

    def required_files(self) -> list[str]:
        return [BACKGROUND, EVALUATION]

    def _load(self, files: DataFiles) -> dict:
        background, evaluation = files.load(BACKGROUND, read_images), files.load(EVALUATION, read_images)
        grey = ink_grey(np.concatenate([background, evaluation]), self.image_shape[-1])  # (N_bg + N_ev, 1, S, S)
        chars = torch.arange(len(background) + len(evaluation)).repeat_interleave(20)  # (N_bg + N_ev,)
        binary = bernoulli_fixed(grey)  # (N_bg + N_ev, 1, S, S) 0/1
        n_bg = len(background) * 20
        x_train, y_train, x_val, y_val = carve_val(binary[:n_bg], chars[:n_bg], self.val_size)
        if self.binarize == "dynamic":
            grey_u8 = grey[:n_bg].mul(255).round_().to(torch.uint8)  # (N_bg, 1, S, S) 0..255
            x_train = carve_val(grey_u8, chars[:n_bg], self.val_size)[0]
            self.dynamic_splits = {"train"}
        return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (binary[n_bg:], chars[n_bg:])}
