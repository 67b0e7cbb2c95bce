r"""The pseudo-inverse memory of the Generative Pseudo-Inverse Memory (GPM; Pham et al., ICLR 2022), plain torch.

Facts from its public code (phamtienkha/generative-pseudoinverse-memory, `memory.py`), read against here:

Ben-Israel-Cohen iteration (Ben-Israel & Cohen 1966), for A (m x n):
    X_0 = alpha A^T,   X_{k+1} = 2 X_k - X_k A X_k                  -> A^+ for 0 < alpha < 2 / sigma_max(A)^2
    Error: the singular values of X_k A are 1 - (1 - alpha s_i^2)^(2^k), so each step squares the residual
    (1 - alpha s_i^2): quadratic once alpha s_i^2 is not small, but a direction with alpha s_i^2 = 1e-4 needs
    about 13 steps to start converging.
    `init="official"`: alpha = 5e-4, the authors' constant (min(exp(p), 5e-4) with p = -5 init: exp(-5) =
    6.7e-3 > 5e-4, so the min is the constant and p gets no gradient). From it 3-7 steps give X ~ 2^k alpha A^T
    wherever alpha s_i^2 << 1: a scaled transpose, not a pseudo-inverse.
    `init="scaled"` (default here): alpha = 1 / (||A||_1 ||A||_inf) <= 1 / sigma_max^2, the classic choice that
    always converges (Pan & Schreiber 1991). Measured in tests/test_gpm.py on Gaussian 32 x 100 matrices: the
    relative error ||X - pinv(A)||_F / ||pinv(A)||_F after 3 / 7 / 30 steps is stated there and asserted.

Direct write (`DIRECT_WRITING = True` in their main.py), per episode, codes Z (T x C):
    Z' = Z + N(0, sigma_w^2)              write noise, sigma_w = 0.5 (theirs, fixed)
    W  = Z' pinv(M_0)                     (T x K) addresses of the codes against the prior mean M_0 (K x C)
    M  = pinv(W) Z'                       (K x C) the least-squares (T >= K) or minimum-norm (T < K) solution of
                                          W M = Z': with T < K slots the memory spans only the T written rows
    (ours, for a bound) U = u0 I - u0^2 W^T (u0 W W^T + sigma_w^2 I)^-1 W: the row covariance Gaussian conditioning
    on the write gives (`written_covariance`); the authors keep the prior's and read only the mean
Read, per query code z (1 x C):
    w_hat = (z + N(0, sigma_r^2)) pinv(M)     (1 x K)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

PinvInit = Literal["scaled", "official"]
OFFICIAL_ALPHA = 5e-4


def ben_israel_cohen(A: Tensor, steps: int, init: PinvInit = "scaled") -> Tensor:
    """Approximate pseudo-inverse of A (..., m, n) -> (..., n, m) by `steps` Ben-Israel-Cohen iterations."""
    if steps < 1:
        raise ValueError(f"pseudo-inverse steps must be >= 1, got {steps}")
    if init == "official":
        alpha: Tensor | float = OFFICIAL_ALPHA
    elif init == "scaled":  # 1 / (max column sum * max row sum) of |A|: below 1 / sigma_max(A)^2
        norm_1 = A.abs().sum(-2).amax(-1)  # (...,) max column sum
        norm_inf = A.abs().sum(-1).amax(-1)  # (...,) max row sum
        alpha = (1.0 / (norm_1 * norm_inf).clamp_min(torch.finfo(A.dtype).tiny))[..., None, None]
    else:
        raise ValueError(f"pseudo-inverse init must be 'scaled' or 'official', got {init!r}")
    X = alpha * A.transpose(-2, -1)  # (..., n, m)
    for _ in range(steps):
        X = 2 * X - X @ A @ X
    return X


def direct_write(
    Z: Tensor, M0: Tensor, steps: int, init: PinvInit = "scaled", noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """GPM's direct write. Z: (B, T, C) codes, M0: (B, K, C) prior mean, noise: (B, T, C) write noise (already
    scaled; None: none) -> M: (B, K, C) = pinv(W) Z' and the write addresses W = Z' pinv(M0): (B, T, K)."""
    Zn = Z if noise is None else Z + noise  # (B, T, C) Z'
    W = Zn @ ben_israel_cohen(M0, steps, init)  # (B, T, K)
    return ben_israel_cohen(W, steps, init) @ Zn, W  # (B, K, T) @ (B, T, C) -> (B, K, C)


def written_covariance(W: Tensor, u0: Tensor, noise_var: float) -> Tensor:
    """Row covariance (B, K, K) of M after observing Z' = W M + noise (noise_var) under the prior MN(., u0 I, I):
    U = u0 I - u0^2 W^T (u0 W W^T + noise_var I_T)^-1 W, the Gaussian-conditioning covariance of the write's
    addresses: the memory is certain only in the T directions it was written along."""
    B, T, K = W.shape
    eye_T = torch.eye(T, dtype=W.dtype, device=W.device)
    S = u0 * W @ W.transpose(-2, -1) + noise_var * eye_T  # (B, T, T)
    G = torch.linalg.solve(S, W)  # (B, T, K)  S^-1 W
    U = u0 * torch.eye(K, dtype=W.dtype, device=W.device) - u0**2 * W.transpose(-2, -1) @ G
    return 0.5 * (U + U.transpose(-2, -1))


def address(z: Tensor, M: Tensor, steps: int, init: PinvInit = "scaled") -> Tensor:
    """Addresses of query codes z (B, T, C) in memory M (B, K, C): w_hat = z pinv(M), (B, T, K)."""
    return z @ ben_israel_cohen(M, steps, init)
