r"""Kanerva++ (Ramapuram, Wu, Kalousis, ICLR 2021) on the shared nets.

Memory pieces (writer, window reads, the key -> affine map) are in `km.memory.block`, with the
decisions taken where the paper was not at hand. This file wires nets, memory and the bound.

Generative model (per episode):
    M ~ p(M) = N(0, I)                    (C_m, S, S) spatial memory
    Y_t ~ p(Y) = N(0, I_3)                read key: log-scale, x/y translation
    z_t ~ p(z_t | M, Y_t) = N(mu_p(win), sigma_p(win)^2),  win = window of M at Y_t
    x_t ~ p(x_t | z_t)                    the shared decoder + likelihood

Inference:
    q(M | X) = N(mu_M(X), sigma_M(X)^2)   deterministic, order-invariant feed-forward write
    q(Y_t | x_t, M)                       from e(x_t), refined over `read_steps` steps on the memory read
    q(z_t | x_t) = N(mu(e_t), sigma(e_t)^2)

Bound, reported per image (divided by T), every KL included, one reparameterised sample of M, Y, z:
    -ELBO/T = 1/T sum_t [ -ln p(x_t|z_t) + KL(q(z_t|x_t) || p(z_t|M,Y_t)) + KL(q(Y_t) || p(Y_t)) ]
              + KL(q(M|X) || p(M)) / T
Reading (`read`, used by the shared `denoise`): infer the keys of x on the memory mean, decode the
mean of p(z | M, Y). Generation: Y ~ p(Y), M ~ q(M | X) (or p(M)), z ~ p(z | M, Y), decode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from km.memory.block import BlockMemoryWriter, key_to_theta, read_windows
from km.models.base import EpisodeModel, EpisodeOutput
from km.models.km import gaussian_kl, gaussian_log_prob
from km.nets import NetConfig
from km.schema import KPPConfig  # noqa: F401 - re-exported


class KanervaPlusPlus(EpisodeModel):
    z_head = "q_z"  # carried by init_from with the encoder and decoder

    def __init__(self, cfg: KPPConfig, net: NetConfig, image_shape: tuple[int, int, int], likelihood: str):
        super().__init__(cfg, net, image_shape, likelihood)
        cfg.check()
        E, C, H = self.encoder.out_dim, cfg.code_dim, cfg.hidden
        win = cfg.mem_channels * cfg.window**2
        self.writer = BlockMemoryWriter(E, cfg.mem_channels, cfg.mem_size, H)
        self.q_z = nn.Linear(E, 2 * C)  # q(z | x): (mu, log sigma)
        self.q_key = nn.Linear(E, 6)  # initial q(Y | x): (mu, log sigma) of the 3 key coordinates
        self.refine = nn.Sequential(nn.Linear(E + win, H), nn.ELU(), nn.Linear(H, 3))  # key update from a read
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self.p_z = nn.Sequential(nn.Linear(win, H), nn.ELU(), nn.Linear(H, 2 * C))  # p(z | M, Y) from a window
        nn.init.zeros_(self.p_z[-1].weight)  # p(z | M, Y) starts as N(0, I): training starts from a VAE
        nn.init.zeros_(self.p_z[-1].bias)

    # ---- pieces --------------------------------------------------------------------------
    def windows(self, M: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """M (B, C_m, S, S), Y (B, T, 3) -> windows (B, T, C_m, w, w)."""
        return read_windows(M, key_to_theta(Y, self.cfg.window, self.cfg.mem_size), self.cfg.window)

    def posterior_keys(self, e: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(Y | x, M): mu, log sigma (B, T, 3), refined over read_steps reads of M at the current mean."""
        mu, log_sigma = self.q_key(e).chunk(2, dim=-1)
        for _ in range(self.cfg.read_steps):
            mu = mu + self.refine(torch.cat([e, self.windows(M, mu).flatten(2)], dim=-1))
        return mu, log_sigma.clamp(-6, 2)

    def prior_z(self, M: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z | M, Y): mu, log sigma (B, T, C)."""
        mu, log_sigma = self.p_z(self.windows(M, Y).flatten(2)).chunk(2, dim=-1)
        return mu, log_sigma.clamp(-6, 3)

    def posterior_z(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.q_z(e).chunk(2, dim=-1)
        return mu, log_sigma.clamp(-8, 4)

    @staticmethod
    def _sample(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * log_sigma.exp()

    # ---- EpisodeModel interface -----------------------------------------------------------
    def episode_elbo(self, x: torch.Tensor, targets: int = 0) -> EpisodeOutput:
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)  # written items, scored items
        T = x.shape[1]
        e = self.encode_images(x)  # (B, T, E)
        mu_M, ls_M = self.writer(e[:, ctx])  # (B, C_m, S, S) from the written items only
        M = self._sample(mu_M, ls_M)
        e, x = e[:, tgt], x[:, tgt]  # the scored items
        mu_Y, ls_Y = self.posterior_keys(e, M)  # (B, T, 3)
        Y = self._sample(mu_Y, ls_Y)
        kl_Y = gaussian_kl(mu_Y, ls_Y, torch.zeros_like(mu_Y), torch.zeros_like(ls_Y)).mean(1)  # (B,)
        mu_z, ls_z = self.posterior_z(e)
        mu_p, ls_p = self.prior_z(M, Y)
        kl_z = gaussian_kl(mu_z, ls_z, mu_p, ls_p).mean(1)  # (B,)
        recon = -self.log_px(self.decode_codes(self._sample(mu_z, ls_z)), x).mean(1)
        parts = {"kl_z": kl_z, "kl_Y": kl_Y}
        if not targets:  # the held-out targets do not pay for the memory (it is the context's)
            parts["kl_M"] = (
                gaussian_kl(
                    mu_M.flatten(1),
                    ls_M.flatten(1),
                    torch.zeros_like(mu_M.flatten(1)),
                    torch.zeros_like(ls_M.flatten(1)),
                )
                / T
            )  # (B,)
        kl = sum(parts.values())
        neg_elbo = recon + kl
        return EpisodeOutput(loss=neg_elbo.mean(), neg_elbo=neg_elbo, recon=recon, kl=kl, parts=parts)

    def describe_memory(self) -> str:
        c = self.cfg
        return f"{c.mem_channels}x{c.mem_size}x{c.mem_size} (C_m x S x S)"

    def write(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(M | X): mean and log-std (B, C_m, S, S)."""
        return self.writer(self.encode_images(x))

    def read_keys(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean keys (B, T, 3) of the items of x on the memory mean."""
        return self.posterior_keys(self.encode_images(x), memory[0])[0]

    def read(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder params (B, T, ...) of the mean of p(z | M, Y) at the mean keys of x on the memory mean."""
        if memory is None:
            memory = self._prior_memory(x.shape[0])
        return self.decode_codes(self.prior_z(memory[0], self.read_keys(x, memory))[0])

    def _prior_memory(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (B, self.cfg.mem_channels, self.cfg.mem_size, self.cfg.mem_size)
        zeros = torch.zeros(shape, device=self.device)
        return zeros, zeros

    def generate(self, memory: tuple[torch.Tensor, torch.Tensor] | None, n: int, batch: int = 1) -> torch.Tensor:
        """Y ~ p(Y), M ~ q(M | X) (p(M) if None), z ~ p(z | M, Y), decode."""
        mu_M, ls_M = memory if memory is not None else self._prior_memory(batch)
        M = self._sample(mu_M, ls_M)
        Y = torch.randn(M.shape[0], n, 3, device=M.device, dtype=M.dtype)
        return self.mean_image(self.decode_codes(self._sample(*self.prior_z(M, Y))))

    @torch.no_grad()
    def log_likelihood_is(self, x: torch.Tensor, samples: int, targets: int = 0) -> torch.Tensor:
        """Importance-sampled ln p(X) / T, proposal q(M | X) q(Y | X, M) q(Z | X) (joint over the episode).
        targets = n: ln p(x_targets | X_ctx) / n with M ~ q(M | X_ctx) and no M term in the weight."""
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)
        e = self.encode_images(x)
        mu_M, ls_M = self.writer(e[:, ctx])
        e, x = e[:, tgt], x[:, tgt]
        mu_z, ls_z = self.posterior_z(e)
        log_w = []
        for _ in range(samples):
            M = self._sample(mu_M, ls_M)
            mu_Y, ls_Y = self.posterior_keys(e, M)
            Y = self._sample(mu_Y, ls_Y)
            z = self._sample(mu_z, ls_z)
            mu_p, ls_p = self.prior_z(M, Y)
            zero3 = torch.zeros_like(Y)
            lw = (
                self.log_px(self.decode_codes(z), x)
                + gaussian_log_prob(z, mu_p, ls_p)
                - gaussian_log_prob(z, mu_z, ls_z)
                + gaussian_log_prob(Y, zero3, zero3)
                - gaussian_log_prob(Y, mu_Y, ls_Y)
            ).sum(1)  # (B,)
            if not targets:
                Mf, zero = M.flatten(1), torch.zeros_like(M.flatten(1))
                lw = lw + gaussian_log_prob(Mf, zero, zero) - gaussian_log_prob(Mf, mu_M.flatten(1), ls_M.flatten(1))
            log_w.append(lw)
        return (torch.logsumexp(torch.stack(log_w), 0) - math.log(samples)) / x.shape[1]
