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
    ``write_batched`` / ``write_with_kl`` (all T items at once; S = diag(s_1..s_T) the noise variances,
    s_t = sigma_xi^2, or per item). Two exact forms, chosen by shape (``form="auto"``)::

        Delta = Z - W R                                         (T x C)  prediction error

        T <= K, predictive form (T x T):
        Sigma_z = W U W^T + S                                   (T x T)  predictive covariance, L = chol(Sigma_z)
        G       = Sigma_z^{-1} W U                              (T x K)
        R'      = R + G^T Delta,     U' = U - (W U)^T G

        T > K, information form (K x K):
        U'^{-1} = U^{-1} + W^T S^{-1} W                         (K x K)  L = chol(U'^{-1})
        U'      = (L L^T)^{-1},      R' = R + U' W^T S^{-1} Delta

    Both are the same Gaussian conditioning (Woodbury), tested against the dense reference in float64 and
    float32. Decision and measurement (``bench/memory.py --section write_kl``, 1 thread): the predictive form
    costs T^3, the information form K^3, so the shape picks the cheaper one, and the information form is
    also the accurate one in float32 when T >> K: Sigma_z is then rank K plus sigma_xi^2 I, and U' from it lost
    22% (sigma_xi^2 = 1e-2) to 2800x (1e-4) of U at T = 256, K = 8, where the information form keeps 3e-7.
    Shape alone is not enough (issue #30): where the chosen form's factors lose more digits than ``LOSS_LIMIT``
    (max_i A_ii / L_ii^2, the pivot fractions of the factorisation: blind to mere bad scaling, alive to near
    singularity), the other form is computed too and, per episode, the one that loses fewer is kept. Measured
    (tests/test_memory_stress.py): PKM's float32 weighted write with machines at weight 0 and addresses of size
    100 lost 1.6e-2 to 3e-2 of R in the information form, 6e-6 in the predictive one; a float64 write from a
    non-isotropic prior of condition 1e12 lost 3e-8 of U through the information form's U^{-1}, under 1e-12 in
    the predictive one. The check costs one host sync per write (safe_cholesky already makes one); the second form
    only runs where the first lost digits: KM's step / VAE's 1.05 at K = 256, 1.29 at K = 512 (1 thread, load 4).
    In the predictive form G comes from the explicit small inverse cholesky_inverse(L) and a matmul: with the
    backward pass that was faster on CPU than ``cholesky_solve`` (1.6 ms a call at T = 64). With an
    isotropic U = u I (the prior; ``u0=u``) W U = u W and U^{-1} = I / u cost no product and no inverse.

    ``write_online`` (the paper's form, one item per step, Sigma_z a scalar)::

        wU = w_t^T U;  s = wU w_t + sigma_xi^2;  Delta = z_t - w_t^T R
        R <- R + (wU)^T Delta / s;   U <- U - (wU)^T (wU) / s

    All give the same posterior (Gaussian conditioning is order independent). After every update,
    U' <- (U' + U'^T) / 2 and diag(U') is clipped to ``u_diag_clip`` = [1e-6, 1e10] (official code's
    numerics); pass ``u_diag_clip=None`` to get the exact posterior.

KL from the write's own factor (``write_with_kl``: KL(q || the state written into), of the unclipped posterior)
    KL = 1/2 [C (tr(U^{-1} U') - K) + tr(D^T U^{-1} D) + C (ln|U| - ln|U'|)],   D = R' - R
    with every term from what the write already has, no factor of U' and no inverse of U:
        predictive:   tr(U^{-1} U') - K = -tr(W^T G)                  ln|U| - ln|U'| = ln|Sigma_z| - ln|S|
                      (determinant lemma: |U'^{-1}| = |U^{-1}| |Sigma_z| / |S|; ln|Sigma_z| = 2 sum ln diag L)
        information:  tr(U^{-1} U') - K = -tr(W^T S^{-1} W U')        ln|U| - ln|U'| = ln|U| + 2 sum ln diag L
        Mahalanobis:  ||D||_F^2 / u for U = u I; otherwise tr(D^T W^T Sigma_z^{-1} Delta) (predictive, since
                      D = U W^T Sigma_z^{-1} Delta) or tr(D^T U^{-1} D) (information, U^{-1} at hand).
    Measured: the old write followed by ``kl_matrix_normal`` (two more Cholesky factors and a K x (K + C)
    triangular solve) cost as much again as the write; see ``bench/memory.py`` for the ratios.

Per-step KL (DKM, exact for the rank-1 update, beta = w^T U w / s)::

    KL(q_t || q_{t-1}) = -1/2 [C beta - (beta / s) ||Delta||^2 + C ln(1 - beta)],  ln(1 - beta) = ln sigma_xi^2 - ln s

    with ln(1 - beta) computed as ln sigma_xi^2 - ln s (exact: 1 - beta = sigma_xi^2 / s), which stays finite
    in float32 where log1p(-beta) was -inf once beta rounded to 1 (w^T U w / sigma_xi^2 above ~1.7e7). From
    the *unclipped* update (the diagonal clip is a numerical guard, not part of the model; when it binds, the
    step KL is that of the unclipped posterior).

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
    "kl_isotropic",
    "kl_matrix_normal",
    "read",
    "safe_cholesky",
    "NonPositiveDefiniteError",
    "sample",
    "write_batched",
    "write_online",
    "write_with_kl",
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


FORMS = ("auto", "predictive", "information")


def _item_noise(sigma_xi2: float | Tensor, w: Tensor) -> Tensor:
    """The noise variances as a tensor (..., T): per item as given, or the scalar broadcast to every item."""
    if _per_item(sigma_xi2):
        return sigma_xi2.to(w.dtype)  # type: ignore[union-attr]
    s = torch.as_tensor(sigma_xi2, dtype=w.dtype, device=w.device)
    return s.expand(w.shape[:-1])


def _as_batch(u0: float | Tensor, like: Tensor) -> Tensor:
    """The isotropic scale u of U = u I as a tensor of the batch shape (or a scalar tensor)."""
    return torch.as_tensor(u0, dtype=like.dtype, device=like.device)


def _logdet_from_factor(L: Tensor) -> Tensor:
    """ln|A| = 2 sum_k ln L_kk from A's Cholesky factor L (..., K, K) -> (...)."""
    return 2.0 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)


def write_with_kl(
    state: MemoryState,
    w: Tensor,
    z: Tensor,
    sigma_xi2: float | Tensor,
    u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP,
    form: str = "auto",
    u0: float | Tensor | None = None,
) -> tuple[MemoryState, Tensor]:
    """Posterior MN(R', U', I_C) after observing all T codes ``z`` at addresses ``w``, and KL(q || state) (...,)
    against the memory written into, from the write's own Cholesky factor (module doc, "Writing").

    ``form``: "predictive" (T x T), "information" (K x K) or "auto" (predictive iff T <= K). ``u0``: the scale u
    of an isotropic ``state.U = u I`` (a float or a tensor of the batch shape), or None for a general U; with it
    the information form needs no inverse of U and the KL's Mahalanobis term is ||R' - R||^2 / u.
    """
    return _write(state, w, z, sigma_xi2, u_diag_clip, form, u0, with_kl=True)  # type: ignore[return-value]


def write_batched(
    state: MemoryState,
    w: Tensor,
    z: Tensor,
    sigma_xi2: float | Tensor,
    u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP,
    form: str = "auto",
    u0: float | Tensor | None = None,
) -> MemoryState:
    """Posterior MN(R', U', I_C) after observing all T codes ``z`` at addresses ``w`` (``write_with_kl`` without
    the KL)."""
    return _write(state, w, z, sigma_xi2, u_diag_clip, form, u0, with_kl=False)[0]


# Digits a Cholesky factorisation loses, max_i A_ii / L_ii^2 (1: none; 10^d: about d digits): the pivot
# fraction of each step, invariant to a diagonal rescaling of A, so a matrix that is only badly scaled (per-item
# noise from 1 to 1e8, PKM's machines at weight 0) reads as harmless and a nearly singular one does not. A form
# whose factors lose more than LOSS_LIMIT is recomputed in the other form, element by element the better one kept.
LOSS_LIMIT = {torch.float16: 10.0, torch.bfloat16: 10.0, torch.float32: 1e3, torch.float64: 1e6}


def _digits_lost(A: Tensor, L: Tensor) -> Tensor:
    """max_i A_ii / L_ii^2 (...) of a factorisation A = L L^T (see LOSS_LIMIT)."""
    dA = torch.diagonal(A, dim1=-2, dim2=-1)
    dL = torch.diagonal(L, dim1=-2, dim2=-1)
    return (dA / dL.pow(2)).amax(-1).detach()


def _write(
    state: MemoryState,
    w: Tensor,
    z: Tensor,
    sigma_xi2: float | Tensor,
    u_diag_clip: DiagClip,
    form: str,
    u0: float | Tensor | None,
    with_kl: bool,
) -> tuple[MemoryState, Tensor | None]:
    """The write in the form asked for; "auto": the cheaper form by shape (predictive iff T <= K), and where
    that form's factors lose more digits than LOSS_LIMIT (measured: PKM's float32 weighted write with machines at
    weight 0 lost 2.5e-2 of R in the information form, a float64 write from a prior of condition 1e12 lost 3e-8
    of U), the other form too, keeping per episode the one that loses fewer."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    T, K = w.shape[-2:]
    chosen = form if form != "auto" else ("predictive" if T <= K else "information")
    R_new, U_new, kl, lost = _write_form(state, w, z, sigma_xi2, chosen, u0, with_kl)
    if form == "auto":
        limit = LOSS_LIMIT.get(R_new.dtype, 1e3)
        if bool((lost > limit).any()):
            other = "information" if chosen == "predictive" else "predictive"
            R2, U2, kl2, lost2 = _write_form(state, w, z, sigma_xi2, other, u0, with_kl)
            take = lost2 < lost  # (...) per episode (and machine)
            R_new = torch.where(take[..., None, None], R2, R_new)
            U_new = torch.where(take[..., None, None], U2, U_new)
            if kl is not None:
                kl = torch.where(take, kl2, kl)
    return MemoryState(R_new, _symmetrise_and_clip(U_new, u_diag_clip)), kl


def _write_form(
    state: MemoryState,
    w: Tensor,
    z: Tensor,
    sigma_xi2: float | Tensor,
    form: str,
    u0: float | Tensor | None,
    with_kl: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """R', U' (unclipped), the KL (or None) and the digits its factors lost (`_digits_lost`), in one form."""
    R, U = state  # R: (B, K, C), U: (B, K, K)
    T, K = w.shape[-2:]
    C = R.shape[-1]
    s = _item_noise(sigma_xi2, w)  # (B, T) noise variance of each item: diag of S
    Delta = z - w @ R  # (B, T, C)  prediction error
    kl = None
    if form == "predictive":
        Sigma_c = w @ U if u0 is None else _as_batch(u0, U)[..., None, None] * w  # (B, T, K)  W U
        Sigma_z = Sigma_c @ w.transpose(-1, -2) + torch.diag_embed(s)  # (B, T, T)  W U W^T + S
        L = safe_cholesky(Sigma_z)  # (B, T, T)
        lost = _digits_lost(Sigma_z, L)
        G = torch.cholesky_inverse(L) @ Sigma_c  # (B, T, K)  Sigma_z^{-1} W U (explicit T x T inverse: see doc)
        D = G.transpose(-1, -2) @ Delta  # (B, K, C)  R' - R = U W^T Sigma_z^{-1} Delta
        U_new = U - Sigma_c.transpose(-1, -2) @ G  # (B, K, K)  U - U W^T Sigma_z^{-1} W U
        if with_kl:
            tr_drop = (G * w).sum((-2, -1))  # (B,)  K - tr(U^{-1} U') = tr(W^T Sigma_z^{-1} W U)
            logdet = _logdet_from_factor(L) - s.log().sum(-1)  # (B,)  ln|U| - ln|U'| = ln|Sigma_z| - ln|S|
            if u0 is not None:
                mahalanobis = D.pow(2).sum((-2, -1)) / u0  # (B,)  tr(D^T D) / u
            else:  # D = U W^T A with A = Sigma_z^{-1} Delta, so tr(D^T U^{-1} D) = tr(D^T W^T A)
                A = torch.cholesky_solve(Delta, L)  # (B, T, C)
                mahalanobis = (D * (w.transpose(-1, -2) @ A)).sum((-2, -1))
            kl = 0.5 * (mahalanobis - C * tr_drop + C * logdet)
    else:  # information
        Ws = w / s[..., None]  # (B, T, K)  S^{-1} W
        P = Ws.transpose(-1, -2) @ w  # (B, K, K)  W^T S^{-1} W, the precision the items add
        H = Ws.transpose(-1, -2) @ Delta  # (B, K, C)  W^T S^{-1} Delta
        eye_K = torch.eye(K, dtype=U.dtype, device=U.device)
        if u0 is not None:
            u = _as_batch(u0, U)
            U_inv = eye_K / u[..., None, None]  # (B, K, K)  U^{-1} = I / u
            logdet_U = K * u.log()
            lost_U = torch.ones((), dtype=U.dtype, device=U.device)
        else:
            L_U = safe_cholesky(U)
            lost_U = _digits_lost(U, L_U)
            U_inv = torch.cholesky_inverse(L_U)  # (B, K, K)
            logdet_U = _logdet_from_factor(L_U)
        A_info = U_inv + P  # (B, K, K)  U'^{-1} = U^{-1} + W^T S^{-1} W
        L = safe_cholesky(A_info)  # (B, K, K)  chol(U'^{-1})
        lost = torch.maximum(_digits_lost(A_info, L), lost_U)
        U_new = torch.cholesky_inverse(L).mT  # (B, K, K)  U' (symmetric: .mT is its row-major view)
        D = U_new @ H  # (B, K, C)  R' - R = U' W^T S^{-1} Delta
        if with_kl:
            tr_drop = (P * U_new).sum((-2, -1))  # (B,)  K - tr(U^{-1} U') = tr(W^T S^{-1} W U')
            logdet = logdet_U + _logdet_from_factor(L)  # (B,)  ln|U| - ln|U'| = ln|U| + ln|U'^{-1}|
            if u0 is not None:
                mahalanobis = D.pow(2).sum((-2, -1)) / u  # (B,)
            else:
                mahalanobis = (D * (U_inv @ D)).sum((-2, -1))
            kl = 0.5 * (mahalanobis - C * tr_drop + C * logdet)
    return R + D, U_new, kl, lost


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
        noise = sigma_xi2[..., t] if per_item else torch.as_tensor(sigma_xi2, dtype=U.dtype, device=U.device)
        s = wUw + noise  # (B,)  scalar Sigma_z
        Delta = z_t - torch.einsum("...k,...kc->...c", w_t, R)  # (B, C)
        R = R + wU[..., :, None] * (Delta / s[..., None])[..., None, :]
        U = _symmetrise_and_clip(U - wU[..., :, None] * (wU / s[..., None])[..., None, :], u_diag_clip)
        beta = wUw / s  # (B,)
        log_1m_beta = noise.log() - s.log()  # (B,)  ln(1 - beta) = ln(sigma_xi^2 / s), exact, finite as beta -> 1
        kl_steps.append(-0.5 * (C * beta - beta / s * Delta.pow(2).sum(-1) + C * log_1m_beta))
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


def kl_isotropic(q: MemoryState, R0: Tensor, u0: Tensor) -> Tensor:
    """KL(MN(R_q, U_q, I_C) || MN(R_0, u I_K, I_C)) per batch element, against an isotropic prior::

        1/2 [C tr(U_q) / u + ||R_q - R_0||_F^2 / u - K C + C (K ln u - ln|U_q|)]

    One Cholesky factor (of U_q, for ln|U_q|) instead of ``kl_matrix_normal``'s two and a triangular solve.
    ``R0`` (..., K, C) and ``u0`` (...) broadcast against the batch."""
    K, C = q.R.shape[-2:]
    u = torch.as_tensor(u0, dtype=q.U.dtype, device=q.U.device)
    trace = torch.diagonal(q.U, dim1=-2, dim2=-1).sum(-1)  # (B,)  tr(U_q)
    mahalanobis = (q.R - R0).pow(2).sum((-2, -1))  # (B,)  ||R_q - R_0||^2
    logdet_q = _logdet_from_factor(safe_cholesky(q.U))  # (B,)
    return 0.5 * (C * trace / u + mahalanobis / u - K * C + C * (K * u.log() - logdet_q))


class KanervaMemory(nn.Module):
    """KM memory with a learned prior MN(R_0, U_0, I_C); a per-episode latent, never updated in place.

    R_0: (K, C) truncated-normal (std 1, cut at 2 std) init; U_0 = (exp(s) + 1e-6) I_K with scalar s init 0
    (official code; the 1e-6 is added on the diagonal only). sigma_xi is fixed unless ``learn_sigma_xi``,
    in which case ln sigma_xi is a parameter.

    Precision of the memory algebra (writes, KLs, the sampling factor): autocast is off inside it (a bf16-mixed
    model never runs a Cholesky or a K x K product in bf16) and it runs in the widest of float32, the inputs'
    dtype and ``algebra_dtype`` (``model.memory_dtype=float64``: float64 inside a float32 model); results come
    back in the parameters' dtype, so gradients flow through the casts.
    """

    def __init__(
        self,
        K: int,
        C: int,
        sigma_xi: float = 1.0,
        learn_sigma_xi: bool = False,
        u_diag_clip: DiagClip = DEFAULT_U_DIAG_CLIP,
        machines: tuple[int, ...] = (),
        algebra_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.K, self.C = K, C
        self.u_diag_clip = u_diag_clip
        self.algebra_dtype = algebra_dtype
        # (*machines, K, C): several independent memories side by side (PKM), one by default
        self.R0 = nn.Parameter(nn.init.trunc_normal_(torch.empty(*machines, K, C), std=1.0, a=-2.0, b=2.0))
        self.s = nn.Parameter(torch.zeros(machines))  # ln prior variance scale (one per memory)
        log_sigma_xi = torch.tensor(math.log(sigma_xi))
        if learn_sigma_xi:
            self.log_sigma_xi = nn.Parameter(log_sigma_xi)
        else:
            self.register_buffer("log_sigma_xi", log_sigma_xi)

    # ---- precision of the algebra ----------------------------------------------------------
    def _dtype(self, *xs: Tensor) -> torch.dtype:
        """The dtype the algebra runs in: the widest of float32, the inputs' and ``algebra_dtype``."""
        dtypes = [torch.float32, self.R0.dtype, *(x.dtype for x in xs)]
        if self.algebra_dtype is not None:
            dtypes.append(self.algebra_dtype)
        return max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)

    def _no_autocast(self):
        return torch.autocast(self.R0.device.type, enabled=False)

    def _out(self, state: MemoryState) -> MemoryState:
        return MemoryState(state.R.to(self.R0.dtype), state.U.to(self.R0.dtype))

    # ---- the prior and the algebra ----------------------------------------------------------
    @property
    def sigma_xi2(self) -> Tensor:
        """Observation noise variance sigma_xi^2 (scalar tensor)."""
        return torch.exp(2.0 * self.log_sigma_xi)

    @property
    def u0(self) -> Tensor:
        """Prior row-covariance scale u, U_0 = u I_K: shape (*machines,)."""
        return torch.exp(self.s) + 1e-6

    def prior(self, B: int, dtype: torch.dtype | None = None) -> MemoryState:
        """Prior MN(R_0, U_0, I_C) expanded to batch B (a view: differentiable w.r.t. R0 and s)."""
        dtype = dtype or self.R0.dtype
        eye_K = torch.eye(self.K, dtype=dtype, device=self.R0.device)
        U0 = self.u0.to(dtype)[..., None, None] * eye_K  # (*machines, K, K)
        R0 = self.R0.to(dtype)
        return MemoryState(R0.expand(B, *R0.shape), U0.expand(B, *U0.shape))

    def _posterior(
        self, w: Tensor, z: Tensor, sigma_xi2: Tensor, mode: str, with_kl: bool = True, steps: bool = False
    ) -> tuple[MemoryState, Tensor | None, Tensor | None]:
        """Write z (B, T, C) at w (B, T, K) with noise sigma_xi2 (scalar or per item) into the prior, in the
        algebra's dtype: (posterior, KL(posterior || prior) (B,) or None, per-step KLs (B, T) or None)."""
        dt = self._dtype(w, z)
        with self._no_autocast():
            B = w.shape[0]
            prior = self.prior(B, dt)
            u0 = self.u0.to(dt).expand(B, *self.u0.shape)  # (B, *machines)
            w, z, sigma_xi2 = w.to(dt), z.to(dt), sigma_xi2.to(dt)
            kl = kl_steps = None
            if mode == "batched":
                post, kl = _write(prior, w, z, sigma_xi2, self.u_diag_clip, "auto", u0, with_kl)
            elif mode == "online":
                post, kl_steps = write_online(prior, w, z, sigma_xi2, self.u_diag_clip)
                if with_kl:
                    kl = kl_isotropic(post, prior.R, u0)
            else:
                raise ValueError(f"mode must be 'batched' or 'online', got {mode!r}")
            out_dtype = self.R0.dtype
            return (
                self._out(post),
                None if kl is None else kl.to(out_dtype),
                kl_steps.to(out_dtype) if steps and kl_steps is not None else None,
            )

    def write(self, state: MemoryState, w: Tensor, z: Tensor, mode: str = "batched") -> MemoryState:
        """Posterior after writing codes z (B, T, C) at w (B, T, K) into ``state``; ``mode`` is "batched" or
        "online"."""
        dt = self._dtype(w, z, state.R)
        with self._no_autocast():
            state = MemoryState(state.R.to(dt), state.U.to(dt))
            w, z, sigma_xi2 = w.to(dt), z.to(dt), self.sigma_xi2.to(dt)
            if mode == "batched":
                return self._out(write_batched(state, w, z, sigma_xi2, self.u_diag_clip))
            if mode == "online":
                return self._out(write_online(state, w, z, sigma_xi2, self.u_diag_clip)[0])
        raise ValueError(f"mode must be 'batched' or 'online', got {mode!r}")

    def write_with_kl(self, w: Tensor, z: Tensor, mode: str = "batched") -> tuple[MemoryState, Tensor]:
        """q(M | X) after writing z (B, T, C) at w (B, T, K) into the prior, and the closed-form ELBO term
        KL(q(M | X) || p(M)) (B,) (batched: from the write's own factor; on-line: ``kl_isotropic``)."""
        post, kl, _ = self._posterior(w, z, self.sigma_xi2, mode)
        return post, kl  # type: ignore[return-value]

    def write_online_with_kls(self, w: Tensor, z: Tensor) -> tuple[MemoryState, Tensor, Tensor]:
        """The on-line write into the prior: q(M | X), its closed-form KL (B,) and the per-step KLs (B, T)."""
        return self._posterior(w, z, self.sigma_xi2, "online", steps=True)  # type: ignore[return-value]

    def read(self, state: MemoryState, w: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (B, T, C) and per-coordinate variance (B, T) of z = w^T M + xi."""
        return read(state, w, self.sigma_xi2)

    def sample(self, state: MemoryState, eps: Tensor | None = None) -> Tensor:
        """Reparameterised sample M (B, K, C)."""
        dt = self._dtype(state.R)
        if eps is None:
            eps = torch.randn_like(state.R)
        with self._no_autocast():
            M = sample(MemoryState(state.R.to(dt), state.U.to(dt)), eps.to(dt))
        return M.to(state.R.dtype)

    def kl(self, state: MemoryState) -> Tensor:
        """KL(state || prior) per episode, shape (B,) (``kl_isotropic``: U_0 = u I)."""
        dt = self._dtype(state.R)
        with self._no_autocast():
            q = MemoryState(state.R.to(dt), state.U.to(dt))
            return kl_isotropic(q, self.R0.to(dt), self.u0.to(dt)).to(self.R0.dtype)
