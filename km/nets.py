"""The shared convolutional encoder/decoder (KM paper, Appendix C style).

Every model in the project uses these two nets unchanged, so comparisons between
models are matched: only the latent/memory machinery in between differs.

Encoder: pad the image to a multiple of 8, then 3 blocks of
  {4x4 conv stride 2 -> residual block of two 3x3 convs}, flatten, linear -> e(x).
Decoder: the mirror image: linear -> 3 blocks of
  {residual block -> 4x4 transposed conv stride 2}, crop to the image size.

Memory format (decision, `net.channels_last`, default false): the convolutions can run channels_last (NHWC), the
same function (tested) with a different layout. Measured with `python bench/steps.py --threads 1` (training
step, B = 16, T = 32, NCHW / channels_last, interleaved medians, 2-core machine at load 3.1-3.6): VAE 1.02 /
1.19, KM 1.18 / 1.06, DKM 1.18 / 1.22 on 1x28x28 / 3x32x32 images; faster in every row. It is not the default
because NHWC kernels round differently, so every recorded result (docs/results.md) and the seeded learning tests
would move; set net.channels_last=true for new studies (results within a study must share the setting).
On an H200 (bench/gpu.py --set net.channels_last=..., 2026-12-01) it was never slower and cut the peak memory of a
B x T = 512 step by 47%, so the papers' GPU configs (configs/experiment/paper_*) set it true.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from km.schema import NetConfig  # noqa: F401 - re-exported


class ResBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(relu(x))))."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _padded(size: int) -> int:
    return int(math.ceil(size / 8) * 8)


class Encoder(nn.Module):
    """x: (N, C, H, W) in [0, 1] -> e(x): (N, embed_dim)."""

    def __init__(self, image_shape: tuple[int, int, int], cfg: NetConfig):
        super().__init__()
        c, h, w = image_shape
        self.pad = (0, _padded(w) - w, 0, _padded(h) - h)
        layers: list[nn.Module] = []
        ch_in = c
        for ch in cfg.channels:
            layers += [nn.Conv2d(ch_in, ch, 4, stride=2, padding=1), ResBlock(ch)]
            ch_in = ch
        layers += [nn.ReLU(), nn.Flatten()]
        self.conv = nn.Sequential(*layers)
        feat = ch_in * (_padded(h) // 8) * (_padded(w) // 8)
        self.fc = nn.Linear(feat, cfg.embed_dim)
        self.out_dim = cfg.embed_dim
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.conv.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(2 * x - 1, self.pad)  # centre inputs on 0
        return self.fc(self.conv(x.contiguous(memory_format=self.memory_format)))  # Flatten keeps (C, H, W) order


class Decoder(nn.Module):
    """z: (N, in_dim) -> likelihood parameters (N, out_channels, H, W)."""

    def __init__(self, in_dim: int, image_shape: tuple[int, int, int], out_channels: int, cfg: NetConfig):
        super().__init__()
        _, h, w = image_shape
        self.h, self.w = h, w
        chs = list(cfg.channels)[::-1]
        self.base = (chs[0], _padded(h) // 8, _padded(w) // 8)
        self.fc = nn.Linear(in_dim, chs[0] * self.base[1] * self.base[2])
        layers: list[nn.Module] = []
        for i, ch in enumerate(chs):
            ch_out = chs[i + 1] if i + 1 < len(chs) else out_channels
            layers += [ResBlock(ch), nn.ReLU(), nn.ConvTranspose2d(ch, ch_out, 4, stride=2, padding=1)]
        self.deconv = nn.Sequential(*layers)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.deconv.to(memory_format=self.memory_format)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.deconv(self.fc(z).view(-1, *self.base).contiguous(memory_format=self.memory_format))
        return out[..., : self.h, : self.w]
