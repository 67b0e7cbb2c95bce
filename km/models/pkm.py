r"""Product Kanerva Machine (Marblestone, Wu, Wayne 2020) on the shared nets: P small Kanerva memories.

The combination rule and its equations are in `km.memory.product` (this project's design; no public
code exists). This model is the Kanerva Machine (`km.models.km`) with its one memory replaced by P
memories of K_p = K / P slots each (`memory_size` is the total K, so PKM and KM compare at equal size):

    addresses  w_tp = block p of A f(y_t)                      (KM's A, split into P blocks of K_p rows)
    weights    pi_t = softmax(W_c e(x_t)) over the P machines  (top_k > 0: sparse, k machines per item)
    write      q(M_p | X): item t written into machine p with weight pi_tp (noise sigma_xi^2 / pi_tp)
    read       r_t = sum_p pi_tp w_tp^T R_p -> q(z_t | x_t, y_t, M) as in KM
    bound      -ELBO/T = 1/T sum_t [ -E ln p(x_t|z_t) + KL(y_t) + KL(c_t) + sum_p pi_tp KL(q(z_t) || p(z_t|y_t,p,M)) ]
               + sum_p KL(q(M_p) || p(M_p)) / T
    The z-KL takes the exact expectation over q(M) per machine (KM's default); `sample_memory=true`
    draws one M_p per machine instead.

With machines = 1 every term is KM's (tested to 1e-6 from KM's parameters). Generation: y ~ p(y),
c ~ Uniform(P), z ~ N(w_c^T M_c, sigma_xi^2), decode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from km.memory import MemoryState, log_prob_matrix_normal
from km.memory.product import ProductMemory, kl_machine_weights, machine_weights
from km.models.base import EpisodeOutput, MemoryDtype
from km.models.km import KanervaMachine, gaussian_kl, gaussian_log_prob
from km.nets import NetConfig
from km.schema import PKMConfig  # noqa: F401 - re-exported


class ProductKanervaMachine(KanervaMachine):
    def __init__(self, cfg: PKMConfig, net: NetConfig, image_shape: tuple[int, int, int], likelihood: str):
        cfg.check()
        super().__init__(cfg, net, image_shape, likelihood)
        P = cfg.machines
        self.memory = ProductMemory(
            P,
            cfg.memory_size // P,
            cfg.code_dim,
            sigma_xi=cfg.sigma_xi,
            learn_sigma_xi=cfg.learn_sigma_xi,
            algebra_dtype=MemoryDtype(cfg.memory_dtype).torch_dtype,
        )
        self.q_c = nn.Linear(self.encoder.out_dim, P)  # machine-weight logits from e(x)

    # ---- pieces --------------------------------------------------------------------------
    def address(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, T, d_y) -> per-machine addresses w (B, P, T, K_p): KM's A f(y), split into P blocks."""
        w = super().address(y)  # (B, T, K)
        B, T, _ = w.shape
        return w.view(B, T, self.cfg.machines, -1).transpose(1, 2)

    def machine_weights(self, e: torch.Tensor) -> torch.Tensor:
        """e (B, T, E) -> pi (B, T, P)."""
        return machine_weights(self.q_c(e), self.cfg.top_k)

    def _write(
        self,
        e: torch.Tensor,
        w: torch.Tensor,  # type: ignore[override]
        pi: torch.Tensor,
    ) -> tuple[MemoryState, torch.Tensor]:
        """Every machine's q(M_p | X) and sum_p KL(q(M_p | X) || p(M_p)) (B,)."""
        return self.memory.write_with_kl(w, self.bottom_up(e)[0], pi, mode=self.cfg.write_mode)

    @staticmethod
    def _combine(pi: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """pi (B, T, P), reads (B, P, T, C) -> sum_p pi_tp reads_p: (B, T, C)."""
        return torch.einsum("btp,bptc->btc", pi, reads)

    def _read_z(self, e, w, pi, M):
        """q(z | x, y, M) from the combined read: mu_z, log_sigma_z (B, T, C) and per-machine reads (B, P, T, C)."""
        reads = w @ M  # (B, P, T, C)
        mu_b, ls_b = self.bottom_up(e)
        d_mu, d_ls = self.q_z_top(torch.cat([e, self._combine(pi, reads)], dim=-1)).chunk(2, dim=-1)
        return mu_b + d_mu, (ls_b + d_ls).clamp(-8, 4), reads

    # ---- EpisodeModel interface -----------------------------------------------------------
    def episode_elbo(self, x: torch.Tensor, targets: int = 0) -> EpisodeOutput:
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)  # written items, scored items
        T = x.shape[1]
        e = self.encode_images(x)  # (B, T, E)
        mu_y, ls_y = self.posterior_y(e)
        y = mu_y + torch.randn_like(mu_y) * ls_y.exp()
        w = self.address(y)  # (B, P, T, K_p)
        pi = self.machine_weights(e)  # (B, T, P)
        post, kl_M = self._write(e[:, ctx], w[:, :, ctx], pi[:, ctx])  # R (B, P, K_p, C), U (B, P, K_p, K_p)
        e, w, pi, x = e[:, tgt], w[:, :, tgt], pi[:, tgt], x[:, tgt]  # the scored items
        mu_y, ls_y = mu_y[:, tgt], ls_y[:, tgt]
        ls_xi = self._log_sigma_xi()
        if self.cfg.sample_memory:
            mu_z, ls_z, reads = self._read_z(e, w, pi, self.memory.sample(post))
            kl_zp = gaussian_kl(mu_z[:, None], ls_z[:, None], reads, ls_xi.expand_as(reads))  # (B, P, T)
        else:  # exact E_q(M_p): KL at the mean read + C w^T U_p w / (2 sigma_xi^2)
            mu_z, ls_z, reads = self._read_z(e, w, pi, post.R)
            read_var = torch.einsum("bptk,bpkl,bptl->bpt", w, post.U, w)  # (B, P, T)
            kl_zp = (
                gaussian_kl(mu_z[:, None], ls_z[:, None], reads, ls_xi.expand_as(reads))
                + 0.5 * reads.shape[-1] * read_var / (2 * ls_xi).exp()
            )
        kl_z = (pi.transpose(1, 2) * kl_zp).sum(1).mean(1)  # (B,) E_q(c) of the z-KL
        kl_c = kl_machine_weights(pi).mean(1)  # (B,)
        z = mu_z + torch.randn_like(mu_z) * ls_z.exp()
        recon = -self.log_px(self.decode_codes(z), x).mean(1)
        kl_y_dims = gaussian_kl(
            mu_y[..., None], ls_y[..., None], torch.zeros_like(mu_y[..., None]), torch.zeros_like(ls_y[..., None])
        )  # (B, T, d_y)
        kl_y = kl_y_dims.sum(-1).mean(1)
        parts = {"kl_y": kl_y, "kl_c": kl_c, "kl_z": kl_z}
        if not targets:  # the held-out targets do not pay for the memory (it is the context's)
            parts["kl_M"] = kl_M / T
        kl = sum(parts.values())
        neg_elbo = recon + kl
        loss = neg_elbo
        if self.cfg.kl_y_free_bits > 0:
            loss = loss - kl_y + kl_y_dims.mean((0, 1)).clamp(min=self.cfg.kl_y_free_bits).sum()
        return EpisodeOutput(loss=loss.mean(), neg_elbo=neg_elbo, recon=recon, kl=kl, parts=parts)

    def _posterior_means(self, x: torch.Tensor):
        e = self.encode_images(x)
        return e, self.address(self.posterior_y(e)[0]), self.machine_weights(e)

    def write(self, x: torch.Tensor) -> MemoryState:
        """q(M | X) for every machine, addressing with the means of q(y|x)."""
        return self._write(*self._posterior_means(x))[0]

    def addressing(self, x: torch.Tensor) -> torch.Tensor:
        """Addressing weights over all P * K_p slots (B, T, K), machine blocks side by side."""
        w = self._posterior_means(x)[1]  # (B, P, T, K_p)
        return w.transpose(1, 2).flatten(2)

    def item_machines(self, x: torch.Tensor) -> torch.Tensor:
        """Machine weights pi (B, T, P) of the items of x."""
        return self.machine_weights(self.encode_images(x))

    def describe_memory(self) -> str:
        c = self.cfg
        return f"{c.machines} x {c.memory_size // c.machines} slots x {c.code_dim}"

    def memory_read(self, x: torch.Tensor, memory: MemoryState) -> torch.Tensor:
        """Decoder params of the machines' reads combined by pi: sum_p pi_p w_p^T R_p (no bottom-up correction)."""
        e = self.encode_images(x)
        w = self.address(self.posterior_y(e)[0])
        return self.decode_codes(self._combine(self.machine_weights(e), w @ memory.R))

    def read(self, x: torch.Tensor, memory: MemoryState | None = None) -> torch.Tensor:
        if memory is None:
            memory = self.memory.prior(x.shape[0])
        e, w, pi = self._posterior_means(x)
        return self.decode_codes(self._read_z(e, w, pi, memory.R)[0])

    def generate(self, memory: MemoryState | None, n: int, batch: int = 1) -> torch.Tensor:
        """y ~ p(y), c ~ Uniform(P), M ~ memory, z ~ N(w_c^T M_c, sigma_xi^2)."""
        if memory is None:
            memory = self.memory.prior(batch)
        B, P = memory.R.shape[:2]
        y = torch.randn(B, n, self.cfg.y_dim, device=memory.R.device, dtype=memory.R.dtype)
        reads = self.address(y) @ self.memory.sample(memory)  # (B, P, n, C)
        c = torch.randint(P, (B, n), device=reads.device)
        r = reads.gather(1, c[:, None, :, None].expand(B, 1, n, reads.shape[-1]))[:, 0]  # (B, n, C)
        return self.mean_image(self.decode_codes(r + torch.randn_like(r) * self._log_sigma_xi().exp()))

    @torch.no_grad()
    def log_likelihood_is(self, x: torch.Tensor, samples: int, targets: int = 0) -> torch.Tensor:
        """Importance-sampled ln p(X) / T, c summed out exactly: p(z|y,M) = 1/P sum_p N(z; w_p^T M_p, sigma_xi^2).
        targets = n: ln p(x_targets | X_ctx) / n with M ~ q(M | X_ctx) and no M term in the weight (as KM)."""
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)
        B = x.shape[0]
        e = self.encode_images(x)
        mu_y, ls_y = self.posterior_y(e)
        pi = self.machine_weights(e)
        P = self.cfg.machines
        log_w = []
        for _ in range(samples):
            y = mu_y + torch.randn_like(mu_y) * ls_y.exp()
            w = self.address(y)
            post = self._write(e[:, ctx], w[:, :, ctx], pi[:, ctx])[0]
            M = self.memory.sample(post)
            et, wt, pit, yt = e[:, tgt], w[:, :, tgt], pi[:, tgt], y[:, tgt]
            mu_z, ls_z, _ = self._read_z(et, wt, pit, M if self.cfg.sample_memory else post.R)
            reads = wt @ M  # (B, P, T, C)
            z = mu_z + torch.randn_like(mu_z) * ls_z.exp()
            ls_xi = self._log_sigma_xi().expand_as(reads)
            log_pz = torch.logsumexp(gaussian_log_prob(z[:, None], reads, ls_xi), dim=1) - math.log(P)  # (B, T)
            lw = (
                self.log_px(self.decode_codes(z), x[:, tgt])
                + log_pz
                - gaussian_log_prob(z, mu_z, ls_z)
                + gaussian_log_prob(yt, torch.zeros_like(yt), torch.zeros_like(yt))
                - gaussian_log_prob(yt, mu_y[:, tgt], ls_y[:, tgt])
            ).sum(1)
            if not targets:
                prior = self.memory.prior(B)
                lw = lw + (log_prob_matrix_normal(M, prior) - log_prob_matrix_normal(M, post)).sum(-1)
            log_w.append(lw)
        return (torch.logsumexp(torch.stack(log_w), 0) - math.log(samples)) / (tgt.stop - tgt.start)
