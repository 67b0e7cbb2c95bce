r"""Product Kanerva Machine memory: P small Kanerva memories, items shared among them by weights.

Marblestone, Wu, Wayne, "Product Kanerva Machines" (2020, preprint). No public code exists and the
paper's combination rule was not at hand, so the rule below is this project's design, chosen so that
(a) every memory keeps KM's exact matrix-normal algebra (``km.memory.kanerva``: one Bayesian update in
the codebase), (b) P = 1 is exactly the Kanerva Machine, and (c) the bound stays a true ELBO.

Notation and shapes (the paper writes z_read = M w with slots as columns; here, as in the rest of the
code, slots are rows: M_p is K_p x C and z_read = w^T M_p)::

    R: (B, P, K_p, C)  memory means       U: (B, P, K_p, K_p)  row covariances
    w: (B, P, T, K_p)  per-machine addresses (KM addressing: y_t -> A f(y_t), A split into P blocks)
    pi: (B, T, P)      machine weights of each item, rows on the simplex
    z: (B, T, C)       codes written

Generative model (per episode):
    M_p ~ MN(R_0p, U_0p, I_C) independently, p = 1..P
    c_t ~ Uniform{1..P}                             the machine that holds item t
    z_t | y_t, c_t, M ~ N(w_{t,c_t}^T M_{c_t}, sigma_xi^2 I_C)
    so p(z_t | y_t, M) = 1/P sum_p N(z_t; w_tp^T M_p, sigma_xi^2 I), a mixture over machines.

Inference:
    q(c_t | x_t) = Cat(pi_t), pi_t = softmax of a linear map of e(x_t) (``top_k``: only the k largest
        logits kept, a sparse allocation);
    q(M_p | X) = the Bayesian posterior of M_p after observing every item with *weight* pi_tp, i.e. with
        noise variance sigma_xi^2 / pi_tp (the tempered likelihood N(z_t; w_tp^T M_p, sigma_xi^2)^{pi_tp}):
            R_p, U_p = write(R_0p, U_0p; w_p, Z, noise = sigma_xi^2 / pi_p)          (``weighted_write``)
        An item with pi_tp = 1 is a full KM write into machine p; pi_tp -> 0 leaves M_p untouched.
    reading: the combined read r_t = sum_p pi_tp w_tp^T R_p feeds q(z_t | x_t, y_t, M) (as KM's read does).

ELBO terms (c_t summed out exactly, P terms each):
    E_q(c) KL(q(z_t) || p(z_t | y_t, c_t, M)) = sum_p pi_tp KL(q(z_t) || N(w_tp^T M_p, sigma_xi^2))
    KL(q(c_t) || p(c_t)) = sum_p pi_tp ln(P pi_tp)
    KL(q(M) || p(M)) = sum_p KL(MN(R_p, U_p) || MN(R_0p, U_0p))
With P = 1: pi = 1, KL(c) = 0, the write is KM's, the read is KM's: the same ELBO.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from km.memory.kanerva import (
    DEFAULT_U_DIAG_CLIP,
    DiagClip,
    KanervaMemory,
    MemoryState,
    write_batched,
    write_online,
)

__all__ = ["ProductMemory", "machine_weights", "weighted_write"]

MIN_WEIGHT = 1e-8  # pi below this counts as 1e-8: noise variance <= 1e8 sigma_xi^2, a vanishing update


def weighted_write(
    state: MemoryState,
    w: Tensor,
    z: Tensor,
    pi: Tensor,
    sigma_xi2: float | Tensor,
    mode: str = "batched",
    u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP,
) -> MemoryState:
    """Every machine's posterior after writing z (B, T, C) at w (B, P, T, K_p) with weights pi (B, T, P)."""
    noise = sigma_xi2 / pi.clamp_min(MIN_WEIGHT).transpose(-1, -2)  # (B, P, T) per-item noise variance
    z_p = z.unsqueeze(1).expand(-1, w.shape[1], -1, -1)  # (B, P, T, C)
    if mode == "batched":
        return write_batched(state, w, z_p, noise, u_diag_clip)
    if mode == "online":
        return write_online(state, w, z_p, noise, u_diag_clip)[0]
    raise ValueError(f"mode must be 'batched' or 'online', got {mode!r}")


def machine_weights(logits: Tensor, top_k: int = 0) -> Tensor:
    """pi (..., P) = softmax(logits); with 0 < top_k < P only the k largest logits are kept (sparse)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


def kl_machine_weights(pi: Tensor) -> Tensor:
    """KL(Cat(pi) || Uniform(P)) = sum_p pi_p ln(P pi_p), summed over the last dim (0 ln 0 = 0)."""
    P = pi.shape[-1]
    return torch.where(pi > 0, pi * (pi.clamp_min(1e-30).log() + math.log(P)), torch.zeros_like(pi)).sum(-1)


class ProductMemory(KanervaMemory):
    """P Kanerva memories with learned priors MN(R_0p, U_0p, I_C), U_0p = (exp(s_p) + 1e-6) I (KM's init);
    R_0: (P, K, C), s: (P,), one sigma_xi shared by all machines."""

    def __init__(
        self,
        P: int,
        K: int,
        C: int,
        sigma_xi: float = 1.0,
        learn_sigma_xi: bool = False,
        u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP,
        algebra_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            K,
            C,
            sigma_xi=sigma_xi,
            learn_sigma_xi=learn_sigma_xi,
            u_diag_clip=u_diag_clip,
            machines=(P,),
            algebra_dtype=algebra_dtype,
        )
        self.P = P

    def write(self, state: MemoryState, w: Tensor, z: Tensor, pi: Tensor, mode: str = "batched") -> MemoryState:  # type: ignore[override]
        """Every machine's posterior after writing z (B, T, C) at w (B, P, T, K_p) with weights pi (B, T, P)."""
        return weighted_write(state, w, z, pi, self.sigma_xi2, mode, self.u_diag_clip)

    def write_with_kl(
        self,
        w: Tensor,
        z: Tensor,
        pi: Tensor,  # type: ignore[override]
        mode: str = "batched",
    ) -> tuple[MemoryState, Tensor]:
        """Every machine's q(M_p | X) after the weighted write into the prior (see ``weighted_write``), and
        sum_p KL(q(M_p | X) || p(M_p)) (B,) from the write's own factors."""
        noise = self.sigma_xi2 / pi.clamp_min(MIN_WEIGHT).transpose(-1, -2)  # (B, P, T) per-item noise variance
        z_p = z.unsqueeze(1).expand(-1, w.shape[1], -1, -1)  # (B, P, T, C)
        post, kl, _ = self._posterior(w, z_p, noise, mode)
        return post, kl.sum(-1)  # type: ignore[union-attr]

    def kl(self, state: MemoryState) -> Tensor:
        """sum_p KL(q(M_p) || p(M_p)) per episode, shape (B,)."""
        return super().kl(state).sum(-1)
