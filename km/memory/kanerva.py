r"""Kanerva Machine memory: matrix-normal prior, exact Bayesian writes, reads and KLs.

Wu, Wayne, Graves, Lillicrap, "The Kanerva Machine", ICLR 2018 (KM), and the per-step KL of
Wu et al., "Learning Attractor Dynamics for Generative Memory", NeurIPS 2018 (DKM, official ``memory.py``).

Shapes (batch ``B``, ``K`` slots, code size ``C``, ``T`` items per episode)::

    R: (B, K, C)  memory mean          U: (B, K, K)  row covariance
    w: (B, T, K)  addressing weights   z: (B, T, C)  codes

Memory distribution
    p(M) = MN(R, U, I_C): each of the C columns M[:, c] ~ N(R[:, c], U) independently, so with the
    row-major vectorisation vec(M)[k * C + c] = M[k, c] (``M.reshape(K * C)``), Cov(vec M) = U ⊗ I_C.
    The prior (R_0, U_0) is learned (``KanervaMemory``): R_0 truncated-normal std 1, U_0 = (e^s + 1e-6) I_K.

Observation model (KM generative model)
    z_t = w_t^T M + xi_t,  xi_t ~ N(0, sigma_xi^2 I_C);  for the episode Z = W M + Xi  (W: T x K).

Writing = exact posterior q(M | Z) = MN(R', U', I_C) (KM Sec. 3, "writing inference")
    ``write_batched`` (all T items at once)::

        Delta   = Z - W R                            (T x C)  prediction error
        Sigma_c = W U                                (T x K)  cross-covariance
        Sigma_z = W U W^T + sigma_xi^2 I_T           (T x T)  predictive covariance
        R'      = R + Sigma_c^T Sigma_z^{-1} Delta
        U'      = U - Sigma_c^T Sigma_z^{-1} Sigma_c

    Code: G = Sigma_z^{-1} Sigma_c (T x K) by ``cholesky_solve`` with L = chol(Sigma_z), then
    R' = R + G^T Delta and U' = U - Sigma_c^T G (Sigma_z symmetric, so G^T = Sigma_c^T Sigma_z^{-1}).
    No explicit inverse. (Solving for G, K right-hand sides, was faster on CPU than a triangular solve
    of [Sigma_c | Delta], K + C right-hand sides.)

    ``write_online`` (the paper's form, one item per step, Sigma_z a scalar)::

        wU = w_t^T U;  s = wU w_t + sigma_xi^2;  Delta = z_t - w_t^T R
        R <- R + (wU)^T Delta / s;   U <- U - (wU)^T (wU) / s

    Both give the same posterior (Gaussian conditioning is order independent). After every update,
    U' <- (U' + U'^T) / 2 and diag(U') is clipped to ``u_diag_clip`` = [1e-6, 1e10] (official code's
    numerics); pass ``u_diag_clip=None`` to get the exact posterior.

Per-step KL (DKM, exact for the rank-1 update, beta = w^T U w / s)::

    KL(q_t || q_{t-1}) = -1/2 [C beta - (beta / s) ||Delta||^2 + C ln(1 - beta)]

    computed with log1p(-beta) from the *unclipped* update (the diagonal clip is a numerical guard, not
    part of the model; when it binds, the step KL is that of the unclipped posterior).

Matrix-normal KL (``kl_matrix_normal``, true log-determinants from Cholesky diagonals)::

    KL(MN(R_q, U_q, I_C) || MN(R_p, U_p, I_C))
      = 1/2 [C tr(U_p^{-1} U_q) + tr((R_q - R_p)^T U_p^{-1} (R_q - R_p)) - K C
             + C (ln|U_p| - ln|U_q|)]

KL does not telescope (math decision, tested)
    sum_t KL(q_t || q_{t-1}) != KL(q_T || q_0) pointwise: two opposite observations pull the mean out and
    back, paying KL twice, while the end posterior is close to the prior in mean. Equality holds in
    expectation when Z is drawn from the model's own predictive (chain rule of mutual information:
    E[KL(q_T || q_0)] = I(M; z_1..T) = sum_t E[KL(q_t || q_{t-1})] = C/2 ln|I_T + W U_0 W^T / sigma_xi^2|),
    and exactly for T = 1. The term in a valid ELBO is the closed form KL(q(M | X) || p(M)) =
    ``kl_matrix_normal(posterior, prior)`` (``KanervaMemory.write_with_kl``); the per-step sum is only an
    unbiased estimate of its expectation under the model, not a bound for a given episode.

Reading (KM reading inference): z_read = w^T M has mean w^T R and, per code coordinate, variance
    w^T U w; ``read`` returns that mean and the predictive variance w^T U w + sigma_xi^2.
Sampling: M = R + L eps with L = chol(U), eps ~ N(0, I) of shape (B, K, C) (reparameterised).

All functions are pure (no in-place updates of their inputs), batched, differentiable and dtype agnostic.
``sigma_xi2`` is the noise *variance* sigma_xi^2: a float or a scalar tensor, or, for the writes, a tensor
(B, T) of per-item variances (an item observed with noise sigma^2 / pi counts with weight pi: the
Product Kanerva Machine's weighted writes). Leading batch dimensions may be several, e.g. (B, P).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "KanervaMemory",
    "MemoryState",
    "kl_matrix_normal",
    "read",
    "safe_cholesky",
    "NonPositiveDefiniteError",
    "sample",
    "write_batched",
    "write_online",
]

DiagClip = tuple[float, float] | None
DEFAULT_U_DIAG_CLIP: DiagClip = (1e-6, 1e10)


class MemoryState(NamedTuple):
    """Matrix-normal memory MN(R, U, I_C)."""

    R: Tensor  # (B, K, C) memory mean
    U: Tensor  # (B, K, K) row covariance


class NonPositiveDefiniteError(ValueError):
    """A memory covariance that no jitter makes positive definite (a diverged model, or NaN / Inf in it)."""


def safe_cholesky(A: Tensor, jitter: float = 1e-6, max_tries: int = 5) -> Tensor:
    """Lower Cholesky factor of SPD ``A`` (..., K, K), adding diagonal jitter where it fails.

    Failing matrices get ``jitter * mean(diag) * 10**i`` added to the diagonal on try i = 0..max_tries-1
    (only those batch elements; the others keep their exact factor). Raises ``NonPositiveDefiniteError``
    (a ``ValueError``) if some matrix is still not positive definite after ``max_tries``.
    """
    L, info = torch.linalg.cholesky_ex(A)
    failed = info > 0  # (...)
    if not failed.any():
        return L
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1).detach()  # (...)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    for i in range(max_tries):
        eps = (jitter * 10.0**i) * scale  # (...)
        L_try, info_try = torch.linalg.cholesky_ex(A + eps[..., None, None] * eye)
        L = torch.where(failed[..., None, None], L_try, L)
        failed = failed & (info_try > 0)
        if not failed.any():
            return L
    finite = bool(torch.isfinite(A).all())
    raise NonPositiveDefiniteError(
        f"safe_cholesky: {int(failed.sum())} matrix/matrices of shape {tuple(A.shape[-2:])} not positive "
        f"definite after {max_tries} tries (largest jitter {jitter * 10.0 ** (max_tries - 1):g} x mean diag)"
        + ("" if finite else "; input contains NaN/Inf")
    )


def _symmetrise_and_clip(U: Tensor, u_diag_clip: DiagClip) -> Tensor:
    """(U + U^T) / 2 with diag clipped to ``u_diag_clip`` (official numerics); no clip if None."""
    U = 0.5 * (U + U.transpose(-1, -2))  # a fresh tensor: the in-place clip below leaves inputs untouched
    if u_diag_clip is not None:
        torch.diagonal(U, dim1=-2, dim2=-1).clamp_(*u_diag_clip)
    return U


def _per_item(sigma_xi2: float | Tensor) -> bool:
    """True when the noise variance is given per item, a tensor (..., T), rather than one scalar."""
    return isinstance(sigma_xi2, Tensor) and sigma_xi2.dim() > 0


def write_batched(
    state: MemoryState, w: Tensor, z: Tensor, sigma_xi2: float | Tensor, u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP
) -> MemoryState:
    """Posterior MN(R', U', I_C) after observing all T codes ``z`` at addresses ``w`` in one solve."""
    R, U = state  # R: (B, K, C), U: (B, K, K)
    T = w.shape[-2]
    eye_T = torch.eye(T, dtype=U.dtype, device=U.device)
    Delta = z - w @ R  # (B, T, C)
    Sigma_c = w @ U  # (B, T, K)
    if _per_item(sigma_xi2):  # (B, T) noise variance of each item: diagonal of the noise covariance
        Sigma_z = Sigma_c @ w.transpose(-1, -2) + torch.diag_embed(sigma_xi2)  # (B, T, T)
    else:
        Sigma_z = Sigma_c @ w.transpose(-1, -2) + sigma_xi2 * eye_T  # (B, T, T)
    G = torch.cholesky_solve(Sigma_c, safe_cholesky(Sigma_z))  # (B, T, K)  Sigma_z^{-1} Sigma_c
    R_new = R + G.transpose(-1, -2) @ Delta  # R + Sigma_c^T Sigma_z^{-1} Delta
    U_new = U - Sigma_c.transpose(-1, -2) @ G  # U - Sigma_c^T Sigma_z^{-1} Sigma_c
    return MemoryState(R_new, _symmetrise_and_clip(U_new, u_diag_clip))


def write_online(
    state: MemoryState, w: Tensor, z: Tensor, sigma_xi2: float | Tensor, u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP
) -> tuple[MemoryState, Tensor]:
    """Sequential rank-1 writes of z_1..z_T; returns the posterior and ``kl_steps`` (B, T) = KL(q_t||q_{t-1})."""
    R, U = state  # R: (B, K, C), U: (B, K, K)
    C = R.shape[-1]
    kl_steps = []
    per_item = _per_item(sigma_xi2)
    for t in range(w.shape[-2]):
        w_t, z_t = w[..., t, :], z[..., t, :]  # (B, K), (B, C)
        wU = torch.einsum("...k,...kl->...l", w_t, U)  # (B, K)  w^T U (= (U w)^T, U symmetric)
        wUw = (wU * w_t).sum(-1)  # (B,)
        s = wUw + (sigma_xi2[..., t] if per_item else sigma_xi2)  # (B,)  scalar Sigma_z
        Delta = z_t - torch.einsum("...k,...kc->...c", w_t, R)  # (B, C)
        R = R + wU[..., :, None] * (Delta / s[..., None])[..., None, :]
        U = _symmetrise_and_clip(U - wU[..., :, None] * (wU / s[..., None])[..., None, :], u_diag_clip)
        beta = wUw / s  # (B,)
        kl_steps.append(-0.5 * (C * beta - beta / s * Delta.pow(2).sum(-1) + C * torch.log1p(-beta)))
    return MemoryState(R, U), torch.stack(kl_steps, dim=-1)


def read(state: MemoryState, w: Tensor, sigma_xi2: float | Tensor) -> tuple[Tensor, Tensor]:
    """Predictive of z_t = w_t^T M + xi_t: mean (B, T, C) = w R, per-coordinate var (B, T) = w^T U w + sigma_xi^2."""
    R, U = state
    mean = w @ R  # (B, T, C)
    var = torch.einsum("btk,bkl,btl->bt", w, U, w) + sigma_xi2  # (B, T)
    return mean, var


def sample(state: MemoryState, eps: Tensor | None = None) -> Tensor:
    """Reparameterised M = R + chol(U) eps ~ MN(R, U, I_C); ``eps`` (B, K, C) defaults to N(0, I)."""
    R, U = state
    if eps is None:
        eps = torch.randn_like(R)
    return R + safe_cholesky(U) @ eps  # (B, K, C)


def kl_matrix_normal(q: MemoryState, p: MemoryState) -> Tensor:
    """KL(MN(R_q, U_q, I_C) || MN(R_p, U_p, I_C)) per batch element, shape (B,)."""
    K, C = q.R.shape[-2:]
    L_q = safe_cholesky(q.U)  # (B, K, K)
    L_p = safe_cholesky(p.U)  # (B, K, K)
    # L_p^{-1} [L_q | R_q - R_p]: ||L_p^{-1} L_q||_F^2 = tr(U_p^{-1} U_q), ||L_p^{-1} D||_F^2 = tr(D^T U_p^{-1} D)
    Y = torch.linalg.solve_triangular(L_p, torch.cat([L_q, q.R - p.R], dim=-1), upper=False)  # (B, K, K + C)
    Y_q, Y_D = Y.split([K, C], dim=-1)
    trace_term = Y_q.pow(2).sum((-2, -1))  # (B,)
    mahalanobis = Y_D.pow(2).sum((-2, -1))  # (B,)
    logdet_p = 2.0 * torch.diagonal(L_p, dim1=-2, dim2=-1).log().sum(-1)  # (B,)
    logdet_q = 2.0 * torch.diagonal(L_q, dim1=-2, dim2=-1).log().sum(-1)  # (B,)
    return 0.5 * (C * trace_term + mahalanobis - K * C + C * (logdet_p - logdet_q))


def log_prob_matrix_normal(M: Tensor, state: MemoryState) -> Tensor:
    """ln MN(M; R, U, I_C) per batch element (B,):
    -1/2 [K C ln 2 pi + C ln|U| + tr((M - R)^T U^{-1} (M - R))]."""
    R, U = state
    K, C = R.shape[-2:]
    L = safe_cholesky(U)  # (B, K, K)
    Y = torch.linalg.solve_triangular(L, M - R, upper=False)  # (B, K, C)  L^{-1} (M - R)
    logdet = 2.0 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)  # (B,)
    return -0.5 * (K * C * math.log(2 * math.pi) + C * logdet + Y.pow(2).sum((-2, -1)))


class KanervaMemory(nn.Module):
    """KM memory with a learned prior MN(R_0, U_0, I_C); a per-episode latent, never updated in place.

    R_0: (K, C) truncated-normal (std 1, cut at 2 std) init; U_0 = (exp(s) + 1e-6) I_K with scalar s init 0
    (official code; the 1e-6 is added on the diagonal only). sigma_xi is fixed unless ``learn_sigma_xi``,
    in which case ln sigma_xi is a parameter.
    """

    def __init__(
        self,
        K: int,
        C: int,
        sigma_xi: float = 1.0,
        learn_sigma_xi: bool = False,
        u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP,
        machines: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.K, self.C = K, C
        self.u_diag_clip = u_diag_clip
        # (*machines, K, C): several independent memories side by side (PKM), one by default
        self.R0 = nn.Parameter(nn.init.trunc_normal_(torch.empty(*machines, K, C), std=1.0, a=-2.0, b=2.0))
        self.s = nn.Parameter(torch.zeros(machines))  # ln prior variance scale (one per memory)
        log_sigma_xi = torch.tensor(math.log(sigma_xi))
        if learn_sigma_xi:
            self.log_sigma_xi = nn.Parameter(log_sigma_xi)
        else:
            self.register_buffer("log_sigma_xi", log_sigma_xi)

    @property
    def sigma_xi2(self) -> Tensor:
        """Observation noise variance sigma_xi^2 (scalar tensor)."""
        return torch.exp(2.0 * self.log_sigma_xi)

    def prior(self, B: int) -> MemoryState:
        """Prior MN(R_0, U_0, I_C) expanded to batch B (a view: differentiable w.r.t. R0 and s)."""
        eye_K = torch.eye(self.K, dtype=self.R0.dtype, device=self.R0.device)
        U0 = (torch.exp(self.s)[..., None, None] + 1e-6) * eye_K  # (*machines, K, K)
        return MemoryState(self.R0.expand(B, *self.R0.shape), U0.expand(B, *U0.shape))

    def write(self, state: MemoryState, w: Tensor, z: Tensor, mode: str = "batched") -> MemoryState:
        """Posterior after writing codes z (B, T, C) at w (B, T, K); ``mode`` is "batched" or "online"."""
        if mode == "batched":
            return write_batched(state, w, z, self.sigma_xi2, self.u_diag_clip)
        if mode == "online":
            return write_online(state, w, z, self.sigma_xi2, self.u_diag_clip)[0]
        raise ValueError(f"mode must be 'batched' or 'online', got {mode!r}")

    def write_with_kl(
        self, state: MemoryState, w: Tensor, z: Tensor, mode: str = "batched"
    ) -> tuple[MemoryState, Tensor]:
        """Posterior q(M | X) and the closed-form ELBO term KL(q(M | X) || p(M)) (B,) against the prior."""
        posterior = self.write(state, w, z, mode)
        return posterior, self.kl(posterior)

    def read(self, state: MemoryState, w: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (B, T, C) and per-coordinate variance (B, T) of z = w^T M + xi."""
        return read(state, w, self.sigma_xi2)

    def sample(self, state: MemoryState, eps: Tensor | None = None) -> Tensor:
        """Reparameterised sample M (B, K, C)."""
        return sample(state, eps)

    def kl(self, state: MemoryState) -> Tensor:
        """KL(state || prior) per episode, shape (B,)."""
        return kl_matrix_normal(state, self.prior(state.R.shape[0]))
