r"""Kanerva++ memory: a spatial latent memory written deterministically, read through windows.

Ramapuram, Wu, Kalousis, "Kanerva++: extending the Kanerva Machine with differentiable, locally
block allocated latent memory", ICLR 2021 (K++). Shapes::

    M:      (B, C_m, S, S)   the memory: C_m channels on an S x S grid
    Y:      (B, T, 3)        read keys (y_s, y_x, y_y): log-scale and 2-D translation
    window: (B, T, C_m, w, w) what a key cuts out of the memory

Reading (spatial transformer). A key maps to the affine map theta = [[a, 0, t_x], [0, a, t_y]] from
the window's normalised coordinates to the memory's (``affine_grid`` / ``grid_sample``,
align_corners=False, bilinear, zero padding):
    a   = (w / S) exp(y_s)              a = w / S is "unit scale": the window covers w memory cells
    t_. = (1 - w / S) tanh(y_.)         at unit scale the window stays inside the memory
With a = w / S, a window whose top-left cell is at integer offset (o_x, o_y) has
    t_. = (2 o_. + w) / S - 1           and reads exactly M[:, :, o_y:o_y + w, o_x:o_x + w] (tested).

Decisions where the paper text was not at hand (tagged [recall] in the spec):
    * Writing: the memory is a latent with q(M | X) = N(mu_M(X), diag sigma_M(X)^2) and prior
      p(M) = N(0, I); mu_M and sigma_M come from a deterministic feed-forward network over the whole
      episode: a per-item MLP on e(x_t), a *mean over the episode* (so the write is invariant to the
      order of the items: tested), then transposed convolutions up to the S x S grid. One write pass,
      not the authors' several write steps. KL(q(M | X) || p(M)) is always in the reported bound
      (without it a memory computed from the episode would let each image's prior peek at the image).
    * Keys: p(Y) = N(0, I_3); q(Y_t | x_t, M) = N(mu_Y, sigma_Y^2) starts from e(x_t) and is refined
      over ``read_steps`` steps (iterative read inference): mu_Y <- mu_Y + g([e(x_t), window(mu_Y)]).
    * One window per item; p(z_t | M, Y_t) = N(mu_p, sigma_p^2) from an MLP on the flattened window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BlockMemoryWriter", "key_to_theta", "offset_theta", "read_windows"]


def key_to_theta(Y: Tensor, window: int, size: int) -> Tensor:
    """Keys Y (..., 3) = (y_s, y_x, y_y) -> affine maps theta (..., 2, 3) (see module doc)."""
    unit = window / size
    a = unit * Y[..., 0].exp()
    t = (1.0 - unit) * torch.tanh(Y[..., 1:])  # (..., 2): t_x, t_y
    zero = torch.zeros_like(a)
    return torch.stack([torch.stack([a, zero, t[..., 0]], -1), torch.stack([zero, a, t[..., 1]], -1)], -2)


def offset_theta(o_x: float, o_y: float, window: int, size: int) -> Tensor:
    """theta (2, 3) at unit scale whose window's top-left memory cell is (o_x, o_y)."""
    a = window / size
    return torch.tensor([[a, 0.0, (2 * o_x + window) / size - 1], [0.0, a, (2 * o_y + window) / size - 1]])


def read_windows(M: Tensor, theta: Tensor, window: int) -> Tensor:
    """Cut windows (B, T, C_m, w, w) out of memories M (B, C_m, S, S) with affine maps theta (B, T, 2, 3)."""
    B, T = theta.shape[:2]
    C_m = M.shape[1]
    grid = F.affine_grid(theta.flatten(0, 1), [B * T, C_m, window, window], align_corners=False)  # (B T, w, w, 2)
    # the T windows of an episode stacked along the output height: one grid_sample per memory, no copies of M
    out = F.grid_sample(
        M, grid.view(B, T * window, window, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (B, C_m, T w, w)
    return out.view(B, C_m, T, window, window).transpose(1, 2)  # (B, T, C_m, w, w)


class BlockMemoryWriter(nn.Module):
    """Deterministic, order-invariant write: e (B, T, E) -> q(M | X) mean and log-std (B, C_m, S, S)."""

    def __init__(self, E: int, channels: int, size: int, hidden: int = 256, width: int = 64):
        super().__init__()
        ups = int(math.log2(size / 4))
        if size < 8 or 4 * 2**ups != size:
            raise ValueError(f"memory size must be 4 * 2^k with k >= 1 (8, 16, 32, ...), got {size}")
        self.channels, self.size, self.width = channels, size, width
        self.item = nn.Sequential(nn.Linear(E, hidden), nn.ELU(), nn.Linear(hidden, hidden))  # per item
        self.pooled = nn.Sequential(nn.ELU(), nn.Linear(hidden, width * 16), nn.ELU())  # after the mean
        layers: list[nn.Module] = []
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ELU()]
        layers.append(nn.ConvTranspose2d(width, 2 * channels, 4, 2, 1))
        self.up = nn.Sequential(*layers)

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        h = self.item(e).mean(1)  # (B, hidden): a mean over the episode, order invariant
        out = self.up(self.pooled(h).view(-1, self.width, 4, 4))  # (B, 2 C_m, S, S)
        mu, log_sigma = out.chunk(2, dim=1)
        return mu, log_sigma.clamp(-8, 2)
