r"""Dynamic Kanerva Machine memory: least-squares addressing on top of the KM Bayesian memory.

Wu, Wayne, Lillicrap, Graves, "Learning Attractor Dynamics for Generative Memory", NeurIPS 2018 (DKM),
and the official ``memory.py`` (google-deepmind/dynamic-kanerva-machines). The Bayesian write, read,
per-step KL and matrix-normal KL are the Kanerva Machine's (``km.memory.kanerva``): this module adds
only what DKM changes, the addressing.

Shapes::

    M: (B, K, C)  a memory matrix (the mean R, or a sample)    z: (B, T, C)  embeddings e(x_t)
    w: (B, T, K)  addressing weights                             lam: scalar  ridge regulariser

Addressing is a latent, inferred afresh for every item ("dynamic addressing"):
    p(w_t) = N(0, sigma_w0^2 I_K)
    q(w_t | z_t, M) = N(mu_t, sigma_w^2 I_K),   sigma_w = exp(theta), theta init ln 0.3, learned
    mu_t = the regularised least-squares fit of z_t ~ M^T w, with lam = sigma_xi^2 / sigma_w0^2
    (the MAP of w under z_t ~ N(M^T w, sigma_xi^2 I), w ~ N(0, sigma_w0^2 I)).

Two solvers (``solver``), both batched Cholesky solves over the K x K Gram matrix, never per sample:
    "ridge" (default):   mu = (M M^T + lam I_K)^{-1} M z
        argmin_w ||z - M^T w||^2 + lam ||w||^2, the exact MAP above.
    "official":          mu = ((M M^T)^2 + lam I_K)^{-1} (M M^T) M z
        what the official code computes: TF ``matrix_solve_ls(A, b, l2_regularizer=lam)`` with
        A = M M^T and b = M z, i.e. argmin_w ||A w - b||^2 + lam ||w||^2 (A symmetric, so A^T A = A^2).
        It solves the normal equations of the unregularised problem with a ridge on *those*; it is not
        the ridge solution. Kept for reproducing the official behaviour; tested against brute force.

Decisions (the papers are silent or the spec left them open):
    * Writing addresses are solved against the prior mean R_0 for every item of the episode, then all
      T codes are written at once with the exact batched update (equal to T on-line writes, see
      ``km.memory.kanerva``): the posterior q(M | X) is invariant to the order of the episode.
    * Reading addresses are solved against the memory being read (the posterior mean R, or a sample
      M ~ q(M | X)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from km.memory.kanerva import DEFAULT_U_DIAG_CLIP, DiagClip, KanervaMemory, safe_cholesky

__all__ = ["DynamicMemory", "SOLVERS", "solve_addresses"]

SOLVERS = ("ridge", "official")


def solve_addresses(M: Tensor, z: Tensor, lam: float | Tensor, solver: str = "ridge") -> Tensor:
    """Least-squares addresses mu (B, T, K) of codes z (B, T, C) on memory M (B, K, C); see module doc."""
    K = M.shape[-2]
    eye_K = torch.eye(K, dtype=M.dtype, device=M.device)
    A = M @ M.transpose(-1, -2)  # (B, K, K)  M M^T
    b = M @ z.transpose(-1, -2)  # (B, K, T)  M z
    if solver == "ridge":
        G, rhs = A + lam * eye_K, b
    elif solver == "official":
        G, rhs = A @ A + lam * eye_K, A @ b
    else:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return torch.cholesky_solve(rhs, safe_cholesky(G)).transpose(-1, -2)  # (B, T, K)


class DynamicMemory(KanervaMemory):
    """KM memory (learned prior, exact Bayesian write, KLs) plus DKM's addressing distribution.

    sigma_w0: prior std of w (fixed). sigma_w = exp(log_sigma_w): posterior std of w, learned, init 0.3.
    """

    def __init__(
        self,
        K: int,
        C: int,
        sigma_xi: float = 1.0,
        learn_sigma_xi: bool = False,
        sigma_w0: float = 1.0,
        sigma_w_init: float = 0.3,
        solver: str = "ridge",
        u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP,
        algebra_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            K, C, sigma_xi=sigma_xi, learn_sigma_xi=learn_sigma_xi, u_diag_clip=u_diag_clip, algebra_dtype=algebra_dtype
        )
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver = solver
        self.sigma_w0 = sigma_w0
        self.log_sigma_w = nn.Parameter(torch.tensor(math.log(sigma_w_init)))

    @property
    def lam(self) -> Tensor:
        """Ridge regulariser lam = sigma_xi^2 / sigma_w0^2 (scalar tensor, follows a learned sigma_xi)."""
        return self.sigma_xi2 / self.sigma_w0**2

    def address(self, M: Tensor, z: Tensor) -> Tensor:
        """Mean mu (B, T, K) of q(w | z, M) for codes z (B, T, C) on memory M (B, K, C), solved in the
        memory algebra's dtype (see ``KanervaMemory``)."""
        dt = self._dtype(M, z)
        with self._no_autocast():
            return solve_addresses(M.to(dt), z.to(dt), self.lam.to(dt), self.solver).to(M.dtype)

    def kl_w(self, mu: Tensor) -> Tensor:
        """KL(N(mu, sigma_w^2 I) || N(0, sigma_w0^2 I)) summed over K, shape mu.shape[:-1]."""
        K = mu.shape[-1]
        log_ratio = self.log_sigma_w - math.log(self.sigma_w0)  # ln sigma_w / sigma_w0
        return 0.5 * (K * torch.exp(2 * log_ratio) + mu.pow(2).sum(-1) / self.sigma_w0**2 - K - 2 * K * log_ratio)

    def sample_w(self, mu: Tensor) -> Tensor:
        """Reparameterised w ~ q(w | z, M) = N(mu, sigma_w^2 I)."""
        return mu + torch.randn_like(mu) * self.log_sigma_w.exp()
