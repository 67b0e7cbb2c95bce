"""VAE baseline on the shared nets.

The VAE has no memory: an episode is T independent images, so it is evaluated on exactly
the same episodes as the memory models. Its three test protocols coincide: the memory-conditional
number is the joint bound (there is no KL(M)), and the held-out one scores the same targets on
their own (the context is ignored). q(z|x) = N(mu(e(x)), diag sigma^2(e(x))),
p(z) = N(0, I), x ~ p(x | decoder(z)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from km.models.base import EpisodeModel, EpisodeOutput
from km.nets import NetConfig
from km.schema import VAEConfig  # noqa: F401 - re-exported


class VAE(EpisodeModel):
    z_head = "q_z"  # carried by init_from with the encoder and decoder
    episodic = False  # no memory: trains on plain iid batches whatever data.episodes says

    def __init__(self, cfg: VAEConfig, net: NetConfig, image_shape: tuple[int, int, int], likelihood: str):
        super().__init__(cfg, net, image_shape, likelihood)
        self.q_z = nn.Linear(self.encoder.out_dim, 2 * cfg.code_dim)  # -> (mu, log sigma)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C, H, W) -> mu, log_sigma: (B, T, C_z)."""
        mu, log_sigma = self.q_z(self.encode_images(x)).chunk(2, dim=-1)
        return mu, log_sigma.clamp(-10, 5)

    def episode_elbo(self, x: torch.Tensor, targets: int = 0) -> EpisodeOutput:
        x = x[:, self.check_episodes(x, self.image_shape, targets)[1]]  # no memory: score the targets alone
        mu, log_sigma = self.posterior(x)
        z = mu + torch.randn_like(mu) * log_sigma.exp()  # (B, T, C_z) reparameterised
        recon = -self.log_px(self.decode_codes(z), x).mean(1)  # (B,)
        kl = 0.5 * (mu**2 + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(-1).mean(1)  # (B,)
        neg_elbo = recon + kl
        return EpisodeOutput(loss=neg_elbo.mean(), neg_elbo=neg_elbo, recon=recon, kl=kl, parts={"kl_z": kl})

    def write(self, x: torch.Tensor) -> None:
        return None  # no memory

    def read(self, x: torch.Tensor, memory: None = None) -> torch.Tensor:
        mu, _ = self.posterior(x)
        return self.decode_codes(mu)

    def generate(self, memory: None, n: int, batch: int = 1) -> torch.Tensor:
        z = torch.randn(batch, n, self.cfg.code_dim, device=self.device)
        return self.mean_image(self.decode_codes(z))

    @torch.no_grad()
    def log_likelihood_is(self, x: torch.Tensor, samples: int, targets: int = 0, chunk: int = 25) -> torch.Tensor:
        """log p(x) ~= logmeanexp_s [log p(x|z_s) + log p(z_s) - log q(z_s|x)], per image, mean over T
        (over the last `targets` items only when targets > 0: the context says nothing to a VAE)."""
        x = x[:, self.check_episodes(x, self.image_shape, targets)[1]]
        mu, log_sigma = self.posterior(x)  # (B, T, C_z)
        log_w = []
        for s0 in range(0, samples, chunk):
            s = min(chunk, samples - s0)
            eps = torch.randn(s, *mu.shape, device=mu.device)  # (S, B, T, C_z)
            z = mu + eps * log_sigma.exp()
            log_q = (-0.5 * eps**2 - log_sigma - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
            params = self.decode_codes(z.flatten(0, 1))  # (S*B, T, ...)
            log_px = self.log_px(params, x.repeat(s, 1, 1, 1, 1)).view(s, *mu.shape[:2])
            log_w.append(log_px + log_p - log_q)
        log_w = torch.cat(log_w)  # (S, B, T)
        return (torch.logsumexp(log_w, 0) - math.log(samples)).mean(1)
