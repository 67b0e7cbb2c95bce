r"""Dynamic Kanerva Machine (Wu, Wayne, Lillicrap, Graves, NeurIPS 2018) on the shared nets.

Memory math: `km.memory.dynamic` (least-squares addressing) on the KM memory `km.memory.kanerva`
(one Bayesian update in the codebase). This file wires nets, memory and the bound.

Generative model (per episode X = x_1..x_T; KM's graphical model with z dropped):
    M ~ p(M) = MN(R_0, U_0, I_C)            learned prior, K x C
    w_t ~ p(w_t) = N(0, sigma_w0^2 I_K)
    x_t ~ p(x_t | w_t, M) = decoder(w_t^T M)  the shared decoder + likelihood, on the noise-free read

Inference:
    z_t = e(x_t)                            deterministic embedding: shared encoder + linear map to C
    q(M | X): exact Bayesian posterior after writing z_t, observation noise sigma_xi, at addresses solved
              against the prior mean R_0 (order invariant; `km.memory.dynamic`)
    q(w_t | x_t, M) = N(mu(z_t, M), sigma_w^2 I_K), mu the regularised least-squares solve on M

Bound, reported per image (divided by T), every KL included, estimated with one reparameterised
M ~ q(M | X) and w_t ~ q(w_t | x_t, M) (so it is an unbiased estimate of a true ELBO):
    -ELBO/T = 1/T sum_t [ -ln p(x_t | w_t^T M) + KL(q(w_t) || p(w_t)) ] + KL(q(M | X) || p(M)) / T
    KL(M) is the closed-form matrix-normal KL of the final posterior. The per-step KLs of the
    official code do not sum to it for a given episode (only in expectation; see km.memory.kanerva);
    `memory_kl: steps` trains on their sum as the official code does, the reported bound keeps the
    closed form either way.

Training loss = the bound + `ae_weight` * the autoencoder term -1/T sum_t ln p(x_t | e(x_t)) (DKM paper;
reported as `ae_recon`, never part of the bound). `sample: false` trains with the means (w = mu, M = R)
as the official code does by default; validation and test always report the sampled bound.

`query_noise: p` (not in the paper; issue #18's attractor study): in training, each scored item addresses the
memory with a corrupted query, q(w_t | e(x~_t), M), x~_t = x_t with a fraction p of its pixels flipped, while
the likelihood still scores the clean x_t. Any q gives a bound, so the training loss stays a bound for every
draw of the corruption; what changes is that a read can only restore x_t from what the memory stored, which is
the basin an attractor needs. Validation and test use clean queries (the reported numbers are unchanged).
`query_reads: n` (also training only) unrolls the dynamics: read k + 1 addresses the memory with the mean image
of read k, and the training loss averages the n reads' bounds (an average of bounds is a bound), so a stored
item is trained to be a fixed point of the read, not only the target of the first one. `query_feedback: threshold`
feeds read k + 1 the mean image of read k thresholded at 0.5 instead (binary data; the query is then a constant,
no gradient through it): the query the thresholded dynamics of `km study attractors` use, so the unrolled reads
are trained on the chain's own errors, as query_noise trains the first read on random flips.

Attractor dynamics (test time only, never unrolled in training):
    x -> z = e(x) -> mu_w = solve(R, z) -> mu_w^T R -> decode -> mean image -> repeat.
`energy(x, memory)` is the per-image negative ELBO of a query at the means (w = mu_w, M = R), the
quantity the paper says acts as a Lyapunov function of these dynamics (KL(M) is constant for a fixed
memory and left out). Generation: w ~ p(w), M ~ q(M | X), decode w^T M, then run the dynamics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from km.memory import DynamicMemory, MemoryState, log_prob_matrix_normal
from km.models.base import EpisodeModel, EpisodeOutput, MemoryDtype
from km.nets import NetConfig
from km.overrides import ConfigError
from km.schema import DKMConfig, MemoryKL, Solver  # noqa: F401 - re-exported

LOG_2PI = math.log(2 * math.pi)


class DynamicKanervaMachine(EpisodeModel):
    def __init__(self, cfg: DKMConfig, net: NetConfig, image_shape: tuple[int, int, int], likelihood: str):
        super().__init__(cfg, net, image_shape, likelihood)
        cfg.check()
        self.memory = DynamicMemory(
            cfg.memory_size,
            cfg.code_dim,
            sigma_xi=cfg.sigma_xi,
            learn_sigma_xi=cfg.learn_sigma_xi,
            sigma_w0=cfg.sigma_w0,
            sigma_w_init=cfg.sigma_w_init,
            solver=cfg.solver,
            algebra_dtype=MemoryDtype(cfg.memory_dtype).torch_dtype,
        )
        self.to_code = nn.Linear(self.encoder.out_dim, cfg.code_dim)  # e(x) = to_code(encoder(x))
        if cfg.query_noise > 0 and likelihood != "bernoulli":
            raise ConfigError(
                f"bad value for 'model.query_noise': {cfg.query_noise} (must be 0 unless the data are binary)"
            )
        if cfg.query_feedback == "threshold" and likelihood != "bernoulli":
            raise ConfigError(
                "bad value for 'model.query_feedback': threshold (must be mean unless the data are binary)"
            )

    # ---- pieces --------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C, H, W) -> z = e(x): (B, T, C_z)."""
        return self.to_code(self.encode_images(x))

    def _write(self, z: torch.Tensor) -> tuple[MemoryState, torch.Tensor, torch.Tensor | None]:
        """q(M | X) from codes z (B, T, C), KL(q(M | X) || p(M)) (B,), and the sum of the per-step KLs (B,)
        when memory_kl is 'steps' (else None)."""
        w = self.memory.address(self.memory.R0.expand(z.shape[0], *self.memory.R0.shape), z)  # (B, T, K) on R_0
        if self.cfg.memory_kl == "steps":
            post, kl_M, kl_steps = self.memory.write_online_with_kls(w, z)
            return post, kl_M, kl_steps.sum(-1)
        return *self.memory.write_with_kl(w, z, mode=self.cfg.write_mode), None

    # ---- EpisodeModel interface -----------------------------------------------------------
    def episode_elbo(self, x: torch.Tensor, targets: int = 0) -> EpisodeOutput:
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)  # written items, scored items
        T = x.shape[1]
        z = self.embed(x)  # (B, T, C)
        post, kl_M, kl_steps = self._write(z[:, ctx])  # q(M | X_ctx): R (B, K, C), U (B, K, K); KL (B,)
        z, x = z[:, tgt], x[:, tgt]  # the scored items
        sample = self.cfg.sample or not self.training
        M = self.memory.sample(post) if sample else post.R  # (B, K, C)
        z_query = z
        if self.training and self.cfg.query_noise > 0:  # x~_t: a fraction query_noise of the pixels flipped
            flip = torch.rand_like(x) < self.cfg.query_noise
            z_query = self.embed(torch.where(flip, 1 - x, x))
        mu_w = self.memory.address(M, z_query)  # (B, T, K) mean of q(w | e(x~), M); x~ = x unless query_noise
        w = self.memory.sample_w(mu_w) if sample else mu_w
        read = self.decode_codes(w @ M)  # decoder params of the read
        recon = -self.log_px(read, x).mean(1)  # (B,)
        parts = {"kl_w": self.memory.kl_w(mu_w).mean(1)}  # (B,)
        unrolled = self._unrolled_reads(read, M, x, sample) if self.training else None  # (B,) or None
        if not targets:  # the held-out targets do not pay for the memory (it is the context's)
            parts["kl_M"] = kl_M / T
        kl = sum(parts.values())
        neg_elbo = recon + kl
        ae = -self.log_px(self.decode_codes(z), x).mean(1)  # (B,) autoencoder term, training only
        loss = neg_elbo + self.cfg.ae_weight * ae
        if unrolled is not None:  # the mean of every read's recon + KL(w) (KL(M) is shared)
            loss = loss + (unrolled - (recon + parts["kl_w"])) * (self.cfg.query_reads - 1) / self.cfg.query_reads
        if kl_steps is not None and not targets:
            loss = loss + (kl_steps - kl_M) / T
        return EpisodeOutput(
            loss=loss.mean(), neg_elbo=neg_elbo, recon=recon, kl=kl, parts=parts, extras={"ae_recon": ae}
        )

    def _unrolled_reads(
        self, read: torch.Tensor, M: torch.Tensor, x: torch.Tensor, sample: bool
    ) -> torch.Tensor | None:
        """Mean over reads 2..query_reads of recon + KL(w) (B,), each read addressed with the previous read's mean
        image, or that image thresholded at 0.5 (query_feedback; the attractor dynamics, unrolled in training);
        None with one read."""
        if self.cfg.query_reads <= 1:
            return None
        terms = []
        for _ in range(self.cfg.query_reads - 1):
            query = self.mean_image(read)  # (B, T, C, H, W)
            if self.cfg.query_feedback == "threshold":
                query = (query > 0.5).to(query.dtype)  # piecewise constant: no gradient flows through it
            mu_w = self.memory.address(M, self.embed(query))
            w = self.memory.sample_w(mu_w) if sample else mu_w
            read = self.decode_codes(w @ M)
            terms.append(-self.log_px(read, x).mean(1) + self.memory.kl_w(mu_w).mean(1))
        return torch.stack(terms).mean(0)

    def write(self, x: torch.Tensor) -> MemoryState:
        """q(M | X) from the episode x (B, T, C, H, W)."""
        return self._write(self.embed(x))[0]

    def addressing(self, x: torch.Tensor) -> torch.Tensor:
        """Reading addresses mu_w (B, T, K) of x on the memory written from x."""
        z = self.embed(x)
        return self.memory.address(self._write(z)[0].R, z)

    def read(self, x: torch.Tensor, memory: MemoryState | None = None) -> torch.Tensor:
        """One attractor step: decoder params (B, T, ...) of mu_w^T R, mu_w = solve(R, e(x))."""
        if memory is None:
            memory = self.memory.prior(x.shape[0])
        return self.decode_codes(self.memory.address(memory.R, self.embed(x)) @ memory.R)

    def energy(self, x: torch.Tensor, memory: MemoryState) -> torch.Tensor:
        """Per-image negative ELBO (B, T) of queries x at the means (w = mu_w, M = R), in nats."""
        mu_w = self.memory.address(memory.R, self.embed(x))
        return -self.log_px(self.decode_codes(mu_w @ memory.R), x) + self.memory.kl_w(mu_w)

    def generate(self, memory: MemoryState | None, n: int, batch: int = 1) -> torch.Tensor:
        """Samples (B, n, C, H, W): w ~ p(w), M ~ memory (the prior if None), decode w^T M."""
        if memory is None:
            memory = self.memory.prior(batch)
        B, K = memory.R.shape[:2]
        w = torch.randn(B, n, K, device=memory.R.device, dtype=memory.R.dtype) * self.memory.sigma_w0
        return self.mean_image(self.decode_codes(w @ self.memory.sample(memory)))

    @torch.no_grad()
    def log_likelihood_is(self, x: torch.Tensor, samples: int, targets: int = 0) -> torch.Tensor:
        """Importance-sampled ln p(X) / T per episode, proposal q(M | X) q(W | X, M) (joint over the episode).
        targets = n: ln p(x_targets | X_ctx) / n with M ~ q(M | X_ctx) and no M term in the weight."""
        ctx, tgt = self.check_episodes(x, self.image_shape, targets)
        B = x.shape[0]
        z = self.embed(x)
        post = self._write(z[:, ctx])[0]
        z, x = z[:, tgt], x[:, tgt]
        prior = self.memory.prior(B)
        log_sigma_w = self.memory.log_sigma_w
        log_w = []
        for _ in range(samples):
            M = self.memory.sample(post)
            mu_w = self.memory.address(M, z)
            w = self.memory.sample_w(mu_w)
            log_q_w = (-0.5 * ((w - mu_w) / log_sigma_w.exp()) ** 2 - log_sigma_w - 0.5 * LOG_2PI).sum(-1)
            log_p_w = (-0.5 * (w / self.memory.sigma_w0) ** 2 - math.log(self.memory.sigma_w0) - 0.5 * LOG_2PI).sum(-1)
            lw = (self.log_px(self.decode_codes(w @ M), x) + log_p_w - log_q_w).sum(1)  # (B,)
            if not targets:
                lw = lw + log_prob_matrix_normal(M, prior) - log_prob_matrix_normal(M, post)
            log_w.append(lw)
        return (torch.logsumexp(torch.stack(log_w), 0) - math.log(samples)) / x.shape[1]
