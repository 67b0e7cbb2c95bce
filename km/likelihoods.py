"""Observation models p(x | z) and their reporting units.

- Bernoulli for binary images: log-likelihood in nats/image.
- Discretised logistic for 8-bit images (CIFAR-10): one logistic per sub-pixel over 256 bins
  (Salimans et al. 2017, PixelCNN++, without the mixture); reported in bits/dim.
Inputs x are always float in [0, 1] (binary sets exactly {0, 1}; 8-bit sets k/255).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Bernoulli:
    unit = "nats/image"

    def param_channels(self, c: int) -> int:
        return c  # logits

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params: (N, C, H, W) logits, x: (N, C, H, W) -> (N,) log p(x) in nats."""
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(params))

    def to_report(self, nats_per_image: torch.Tensor, dims: int) -> torch.Tensor:
        return nats_per_image


class DiscretisedLogistic:
    unit = "bits/dim"

    def param_channels(self, c: int) -> int:
        return 2 * c  # per sub-pixel mean and log-scale

    @staticmethod
    def _split(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_s = params.chunk(2, dim=1)
        return torch.tanh(mu), log_s.clamp(min=-7.0)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params: (N, 2C, H, W), x: (N, C, H, W) in [0, 1] -> (N,) log p(x) in nats."""
        mu, log_s = self._split(params)
        x = 2 * x - 1  # bin centres on [-1, 1], width 2/255
        inv_s = torch.exp(-log_s)
        plus = inv_s * (x - mu + 1 / 255)
        minus = inv_s * (x - mu - 1 / 255)
        cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): lowest bin
        log_one_minus_cdf_min = -F.softplus(minus)  # log(1 - sigmoid(minus)): highest bin
        mid = inv_s * (x - mu)
        log_pdf_mid = mid - log_s - 2 * F.softplus(mid)  # fallback when the bin mass underflows
        inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5))
        logp = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))
        return logp.flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        mu, _ = self._split(params)
        return (mu + 1) / 2

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        mu, log_s = self._split(params)
        u = torch.rand_like(mu).clamp(1e-5, 1 - 1e-5)
        x = mu + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        return torch.round((x.clamp(-1, 1) + 1) / 2 * 255) / 255

    def to_report(self, nats_per_image: torch.Tensor, dims: int) -> torch.Tensor:
        return nats_per_image / (dims * math.log(2))


LIKELIHOODS = {"bernoulli": Bernoulli, "logistic": DiscretisedLogistic}


def make_likelihood(name: str) -> Bernoulli | DiscretisedLogistic:
    return LIKELIHOODS[name]()
