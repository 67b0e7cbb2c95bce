r"""Kanerva Machine (Wu, Wayne, Graves, Lillicrap, ICLR 2018) on the shared nets.

Memory math lives in `km.memory.kanerva` (plain torch); this file wires nets, memory and the bound.

Generative model (per episode X = x_1..x_T):
    M ~ p(M) = MN(R_0, U_0, I_C)                          learned prior, K x C
    y_t ~ N(0, I_{d_y});  b_t = f(y_t) (MLP);  w_t = A b_t   A: (K, S) learned addresses, rows L2-normalised
    z_t ~ p(z_t | y_t, M) = N(w_t^T M, sigma_xi^2 I_C)
    x_t ~ p(x_t | z_t)                                    the shared decoder + likelihood

Inference (decisions where the paper text was not at hand are marked *):
    q(y_t | x_t) = N(mu_y(e_t), sigma_y(e_t)^2),  e_t = e(x_t) the shared encoder
    writing:  q(M | X) = the exact Bayesian posterior of M after writing the codes
              c_t = mu_b(e_t) (*deterministic write codes, see reading) at addresses w_t (same y_t samples),
              observation noise sigma_xi: `KanervaMemory.write` (batched closed form; on-line gives
              the same posterior and is a config switch).
    reading:  q(z_t | x_t, y_t, M) = N(mu_b(e_t) + g_mu([e_t, r_t]), exp(2 (ls_b(e_t) + g_ls([e_t, r_t])))),
              r_t = w_t^T M with M ~ q(M | X) reparameterised. (*The bottom-up mean mu_b is also the write
              code c_t, so the memory stores what the posterior wants z to be and the memory prior
              p(z_t | y_t, M) = N(r_t, sigma_xi^2) can match it; g starts at zero, so training starts from
              a VAE whose prior is read from memory. An earlier separate write head c_t = W_c e_t left the
              memory prior far from q(z) and lost to the VAE by ~25 nats at equal budget.)

    The expectation over q(M) in the z-KL is exact by default: q(z) reads the posterior mean R and
        E_q(M) KL(q(z) || N(w^T M, sigma_xi^2)) = KL(q(z) || N(w^T R, sigma_xi^2)) + C w^T U w / (2 sigma_xi^2);
    `sample_memory=true` uses one reparameterised M ~ q(M | X) for both instead (also valid, noisier).

Bound (KM Eq. 12 form), reported per image (divided by T), every KL included:
    -ELBO/T = 1/T sum_t [ -E ln p(x_t|z_t) + KL(q(y_t)||p(y_t)) + KL(q(z_t)||p(z_t|y_t,M)) ]
              + KL(q(M|X) || p(M)) / T
    KL(M) is the closed-form matrix-normal KL of the final posterior (the per-step KLs of the
    on-line write do not telescope to it pointwise; see km.memory.kanerva).

Initialisation (decision; `start_as_vae`, default true): the KM starts as the VAE it extends. The
    top-down head g is zero (always), the q(y) head is zero so q(y | x) = p(y) and KL_y = 0, and the last
    layer of f is scaled by 0.1 so the addresses are small (|w| ~ 0.1 instead of ~ 1): a write then barely
    moves M (KL(M) ~ 0) and the read w^T M ~ 0, so p(z | y, M) ~ N(0, sigma_xi^2 = 1), the VAE's prior.
    Measured on a KM warm-started from a trained VAE, at step 0, on 32 one-character Omniglot test
    episodes: 171.3 nats/image with this init, the VAE itself 171.0, and 197.9 with PyTorch's default
    Linear inits (`start_as_vae=false`; R_0 as in the official code either way): KL(M) 16.6, KL_y 3.5
    and KL_z 16.0 against 9.1, because the large random addresses make every write costly. Over 512
    continuation steps on MNIST this turned a 2-of-3-seed win over the VAE into 3 of 3, and it made
    iterative reading denoise about as well as DKM's attractor at CPU budgets (README). Memory,
    addresses and q(y) then grow only as far as the bound rewards them.

Iterative reading (KM Algorithm 1): x -> e(x) -> mu_y -> w -> mean of q(z | x, y, M=R) -> decode ->
feed the mean image back, `iters` times. One-shot generation: y ~ p(y), M ~ q(M|X), z ~ p(z|y,M),
decode; the paper's samples then run iterative reading on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from km.memory import KanervaMemory, MemoryState, log_prob_matrix_normal
from km.models.base import EpisodeModel, EpisodeOutput, MemoryDtype
from km.nets import NetConfig
from km.schema import KMConfig  # noqa: F401 - re-exported

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log density summed over the last dim."""
    return (-0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * LOG_2PI).sum(-1)


def gaussian_kl(mu_q, log_sigma_q, mu_p, log_sigma_p) -> torch.Tensor:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) for diagonal Gaussians, summed over the last dim."""
    var_ratio = (2 * (log_sigma_q - log_sigma_p)).exp()
    return 0.5 * (var_ratio + ((mu_q - mu_p) / log_sigma_p.exp()) ** 2 - 1 - 2 * (log_sigma_q - log_sigma_p)).sum(-1)


class KanervaMachine(EpisodeModel):
    z_head = "q_z_bottom"  # carried by init_from with the encoder and decoder

    def __init__(self, cfg: KMConfig, net: NetConfig, image_shape: tuple[int, int, int], likelihood: str):
        super().__init__(cfg, net, image_shape, likelihood)
        cfg.check()
        E, K, C = self.encoder.out_dim, cfg.memory_size, cfg.code_dim
        self.memory = KanervaMemory(
            K,
            C,
            sigma_xi=cfg.sigma_xi,
            learn_sigma_xi=cfg.learn_sigma_xi,
            algebra_dtype=MemoryDtype(cfg.memory_dtype).torch_dtype,
        )
        self.q_y = nn.Linear(E, 2 * cfg.y_dim)  # -> (mu_y, log sigma_y)
        self.f = nn.Sequential(nn.Linear(cfg.y_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.addr_dim))
        self.A = nn.Parameter(torch.randn(K, cfg.addr_dim) / math.sqrt(cfg.addr_dim))  # (K, S) addresses
        self.q_z_bottom = nn.Linear(E, 2 * C)  # bottom-up (mu_b, log sigma_b); mu_b is also the write code
        self.q_z_top = nn.Sequential(nn.Linear(E + C, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 2 * C))
        nn.init.zeros_(self.q_z_top[-1].weight)  # start as the bottom-up posterior; learn to use the read
        nn.init.zeros_(self.q_z_top[-1].bias)
        if cfg.start_as_vae:  # see "Initialisation" in the module docstring
            nn.init.zeros_(self.q_y.weight)  # q(y | x) = p(y) = N(0, I): KL_y = 0 at step 0
            nn.init.zeros_(self.q_y.bias)
            with torch.no_grad():  # addresses 10x smaller: |w| ~ 0.1, writes barely move M, KL(M) ~ 0
                self.f[-1].weight.mul_(0.1)
                self.f[-1].bias.mul_(0.1)

    # ---- pieces --------------------------------------------------------------------------
    def address(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, T, d_y) -> w: (B, T, K) = A f(y), A with unit-norm rows."""
        return self.f(y) @ F.normalize(self.A, dim=-1).T

    def posterior_y(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.q_y(e).chunk(2, dim=-1)
        return mu, log_sigma.clamp(-8, 4)

    def bottom_up(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e (B,T,E) -> mu_b, log_sigma_b (B,T,C): the perception-only part of q(z | x, y, M)."""
        mu, log_sigma = self.q_z_bottom(e).chunk(2, dim=-1)
        return mu, log_sigma

    def read_z(self, e: torch.Tensor, w: torch.Tensor, M: torch.Tensor):
        """q(z | x, y, M): e (B,T,E), w (B,T,K), M (B,K,C) -> mu_z, log_sigma_z (B,T,C), read r (B,T,C)."""
        r = w @ M  # (B, T, C) top-down memory read w^T M
        mu_b, ls_b = self.bottom_up(e)
        d_mu, d_ls = self.q_z_top(torch.cat([e, r], dim=-1)).chunk(2, dim=-1)
        return mu_b + d_mu, (ls_b + d_ls).clamp(-8, 4), r

    def _write(self, e: torch.Tensor, w: torch.Tensor) -> tuple[MemoryState, torch.Tensor]:
        """q(M | X), the exact posterior after writing the bottom-up codes mu_b(e_t) at addresses w_t, and
        KL(q(M | X) || p(M)) (B,) from the write's own factor."""
        return self.memory.write_with_kl(w, self.bottom_up(e)[0], mode=self.cfg.write_mode)

    def _log_sigma_xi(self) -> torch.Tensor:
        return self.memory.log_sigma_xi

    # ---- EpisodeModel interface -----------------------------------------------------------
    def episode_elbo(self, x: torch.Tensor, targets: int = 0) -> EpisodeOutput:
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)  # written items, scored items
        T = x.shape[1]
        e = self.encode_images(x)  # (B, T, E)
        mu_y, ls_y = self.posterior_y(e)  # (B, T, d_y)
        y = mu_y + torch.randn_like(mu_y) * ls_y.exp()
        w = self.address(y)  # (B, T, K)
        post, kl_M = self._write(e[:, ctx], w[:, ctx])  # q(M | X_ctx): R (B, K, C), U (B, K, K); KL (B,)
        e, w, mu_y, ls_y, x = e[:, tgt], w[:, tgt], mu_y[:, tgt], ls_y[:, tgt], x[:, tgt]  # the scored items
        ls_xi = self._log_sigma_xi()
        if self.cfg.sample_memory:  # one reparameterised M ~ q(M | X)
            mu_z, ls_z, r = self.read_z(e, w, self.memory.sample(post))
            kl_z = gaussian_kl(mu_z, ls_z, r, ls_xi.expand_as(r))  # (B, T)
        else:  # exact E_q(M): KL at the mean read + C w^T U w / (2 sigma_xi^2)
            mu_z, ls_z, r = self.read_z(e, w, post.R)
            read_var = torch.einsum("btk,bkl,btl->bt", w, post.U, w)  # (B, T) Var(w^T M) per coordinate
            kl_z = gaussian_kl(mu_z, ls_z, r, ls_xi.expand_as(r)) + 0.5 * r.shape[-1] * read_var / (2 * ls_xi).exp()
        kl_z = kl_z.mean(1)  # (B,)
        z = mu_z + torch.randn_like(mu_z) * ls_z.exp()  # (B, T, C)
        recon = -self.log_px(self.decode_codes(z), x).mean(1)  # (B,)
        kl_y_dims = gaussian_kl(
            mu_y[..., None], ls_y[..., None], torch.zeros_like(mu_y[..., None]), torch.zeros_like(ls_y[..., None])
        )  # (B, T, d_y) per dimension
        kl_y = kl_y_dims.sum(-1).mean(1)  # (B,)
        parts = {"kl_y": kl_y, "kl_z": kl_z}
        if not targets:  # the joint bound pays for the memory; the held-out targets do not (it is the context's)
            parts["kl_M"] = kl_M / T
        kl = sum(parts.values())
        neg_elbo = recon + kl  # the reported bound: every KL in full
        loss = neg_elbo
        if self.cfg.kl_y_free_bits > 0:  # free bits keep the addresses from collapsing early in training
            loss = loss - kl_y + kl_y_dims.mean((0, 1)).clamp(min=self.cfg.kl_y_free_bits).sum()
        return EpisodeOutput(loss=loss.mean(), neg_elbo=neg_elbo, recon=recon, kl=kl, parts=parts)

    def write(self, x: torch.Tensor) -> MemoryState:
        """q(M | X) from the episode x (B, T, C, H, W), addressing with the means of q(y|x)."""
        e = self.encode_images(x)
        return self._write(e, self.address(self.posterior_y(e)[0]))[0]

    def addressing(self, x: torch.Tensor) -> torch.Tensor:
        """Addressing weights w (B, T, K) of x, at the means of q(y|x)."""
        return self.address(self.posterior_y(self.encode_images(x))[0])

    def read(self, x: torch.Tensor, memory: MemoryState | None = None) -> torch.Tensor:
        """One read cycle: decoder params (B, T, ...) of the mean of q(z | x, y=mu_y, M=R)."""
        if memory is None:
            memory = self.memory.prior(x.shape[0])
        e = self.encode_images(x)
        w = self.address(self.posterior_y(e)[0])
        mu_z, _, _ = self.read_z(e, w, memory.R)
        return self.decode_codes(mu_z)

    def memory_read(self, x: torch.Tensor, memory: MemoryState) -> torch.Tensor:
        """Decoder params (B, T, ...) of the memory's own read w^T R at the addresses of x (the mean of
        p(z | y, M), no bottom-up correction): what the capacity study scores beside `read`."""
        e = self.encode_images(x)
        return self.decode_codes(self.address(self.posterior_y(e)[0]) @ memory.R)

    def generate(self, memory: MemoryState | None, n: int, batch: int = 1) -> torch.Tensor:
        """One-shot samples (B, n, C, H, W): y ~ p(y), M ~ memory (prior if None), z ~ p(z|y,M)."""
        if memory is None:
            memory = self.memory.prior(batch)
        B = memory.R.shape[0]
        y = torch.randn(B, n, self.cfg.y_dim, device=memory.R.device, dtype=memory.R.dtype)
        M = self.memory.sample(memory)
        r = self.address(y) @ M  # (B, n, C)
        z = r + torch.randn_like(r) * self._log_sigma_xi().exp()
        return self.mean_image(self.decode_codes(z))

    @torch.no_grad()
    def log_likelihood_is(self, x: torch.Tensor, samples: int, targets: int = 0) -> torch.Tensor:
        """Importance-sampled ln p(X) / T per episode, proposal q(Y) q(M|X,Y) q(Z|X,Y,M) (joint over the episode).

        targets = n: ln p(x_targets | X_ctx) / n, where M ~ q(M | X_ctx) (context addresses sampled from q(y))
        is the model's belief about the memory after the context; the targets' y and z are importance-sampled
        and the weight has no M term (M is drawn from the distribution it is integrated against)."""
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)
        B = x.shape[0]
        e = self.encode_images(x)
        mu_y, ls_y = self.posterior_y(e)
        log_w = []
        for _ in range(samples):
            y = mu_y + torch.randn_like(mu_y) * ls_y.exp()
            w = self.address(y)
            post = self._write(e[:, ctx], w[:, ctx])[0]
            M = self.memory.sample(post)
            et, wt, yt, mu_yt, ls_yt = e[:, tgt], w[:, tgt], y[:, tgt], mu_y[:, tgt], ls_y[:, tgt]
            # the proposal q(z | x, y, M) reads the same M as the bound does (sampled, or the mean R)
            mu_z, ls_z, _ = self.read_z(et, wt, M if self.cfg.sample_memory else post.R)
            r = wt @ M  # mean of p(z | y, M)
            z = mu_z + torch.randn_like(mu_z) * ls_z.exp()
            ls_xi = self._log_sigma_xi().expand_as(r)
            lw = (
                self.log_px(self.decode_codes(z), x[:, tgt])
                + gaussian_log_prob(yt, torch.zeros_like(yt), torch.zeros_like(yt))
                - gaussian_log_prob(yt, mu_yt, ls_yt)
                + gaussian_log_prob(z, r, ls_xi)
                - gaussian_log_prob(z, mu_z, ls_z)
            ).sum(1)  # (B,)
            if not targets:
                lw = lw + log_prob_matrix_normal(M, self.memory.prior(B)) - log_prob_matrix_normal(M, post)
            log_w.append(lw)
        return (torch.logsumexp(torch.stack(log_w), 0) - math.log(samples)) / (tgt.stop - tgt.start)
