"""Stress cases of the memory write (issue #30, item 11), each against a float64 reference by dense Gaussian
conditioning with full covariances. The write picks its algebra by shape for speed and, where the chosen form's
factors lose digits (`km.memory.kanerva.LOSS_LIMIT`), by conditioning; these are the cases where the shape alone
chose the form that loses them."""

from __future__ import annotations

import pytest
import torch

from km.memory import MemoryState, write_batched, write_with_kl
from km.memory.product import weighted_write
from tests.test_memory_kanerva import dense_condition, vec_gaussian


def _dense_write(state: MemoryState, w: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, b: int):
    """Reference posterior mean (K, C) and row covariance (K, K) of batch element b, float64, from the dense
    (KC x KC) Gaussian of vec(M) conditioned on vec(Z) = kron(W, I_C) vec(M) + noise."""
    s64 = MemoryState(state.R.double(), state.U.double())
    mu, S = vec_gaussian(s64, b)
    C = state.R.shape[-1]
    H = torch.kron(w[b].double(), torch.eye(C, dtype=torch.float64))
    nv = noise[b].double().repeat_interleave(C)
    m, Sig = dense_condition(mu, S, H, z[b].double().reshape(-1), nv)
    K = state.R.shape[-2]
    return m.reshape(K, C), Sig.reshape(K, C, K, C)[:, 0, :, 0]


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_pkm_float32_weighted_write_with_machines_at_weight_zero(scale: float) -> None:
    # P = 4 machines of 16 slots, T = 32, top_k = 1 (each item in one machine, three at weight 0, noise
    # 1e8 sigma_xi^2 there), sigma_xi = 1, addresses of size `scale`. Bound: 1e-2 of R's largest entry, what the
    # write held before the speed work; the information form alone (T > K) lost 1.6e-2 to 3e-2 at scale 100.
    gen = torch.Generator().manual_seed(3)
    B, P, K, C, T = 2, 4, 16, 4, 32  # C = 4, not 100: columns are independent, the K x K algebra is the same
    R0 = torch.randn(B, P, K, C, generator=gen)
    U0 = torch.eye(K).expand(B, P, K, K).clone()
    w = scale * torch.randn(B, P, T, K, generator=gen)
    z = 3 * torch.randn(B, T, C, generator=gen)
    pi = torch.nn.functional.one_hot(torch.randint(0, P, (B, T), generator=gen), P).float()
    post = weighted_write(MemoryState(R0, U0), w, z, pi, 1.0, u_diag_clip=None)
    noise = 1.0 / pi.clamp_min(1e-8).transpose(-1, -2)  # (B, P, T), as weighted_write
    for b in range(B):
        for p in range(P):
            st = MemoryState(R0[:, p], U0[:, p])
            R_ref, U_ref = _dense_write(st, w[:, p], z, noise[:, p], b)
            assert (post.R[b, p].double() - R_ref).abs().max() <= 1e-2 * R_ref.abs().max(), (scale, b, p)
            assert (post.U[b, p].double() - U_ref).abs().max() <= 1e-3, (scale, b, p)


@pytest.mark.parametrize("cond", [1e8, 1e12])
def test_float64_exact_write_from_a_nearly_singular_prior(cond: float) -> None:
    # K = 8, C = 5, T = 20 (information form by shape), U0 non-isotropic with condition `cond`, clip off.
    # Bound: 1e-12 absolute on U, what the covariance-form update achieves (the information form's U0^{-1}
    # lost 2.9e-12 at 1e8 and 2.9e-8 at 1e12).
    gen = torch.Generator().manual_seed(5)
    B, K, C, T = 2, 8, 5, 20
    Q, _ = torch.linalg.qr(torch.randn(B, K, K, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), K, dtype=torch.float64)
    U0 = Q @ torch.diag_embed(eig.expand(B, K)) @ Q.mT
    U0 = 0.5 * (U0 + U0.mT)
    R0 = torch.randn(B, K, C, generator=gen, dtype=torch.float64)
    w = torch.randn(B, T, K, generator=gen, dtype=torch.float64)
    z = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    noise = torch.full((B, T), 0.5, dtype=torch.float64)
    post, kl = write_with_kl(MemoryState(R0, U0), w, z, noise, None)
    for b in range(B):
        R_ref, U_ref = _dense_write(MemoryState(R0, U0), w, z, noise, b)
        assert (post.U[b] - U_ref).abs().max() <= 1e-12, (cond, b, (post.U[b] - U_ref).abs().max().item())
        assert (post.R[b] - R_ref).abs().max() <= 1e-9 * R_ref.abs().max()
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("sigma_xi2", [1e-3, 10.0])
@pytest.mark.parametrize("T", [4, 256])
def test_float32_write_against_float64_small_and_large_noise(sigma_xi2: float, T: int) -> None:
    # K = 8, C = 16: T below K and T much larger than K, tight and loose noise. Bound: 1e-3 of U's largest
    # entry and of R's (float32 keeps ~7 digits; the conditioning of these problems costs at most ~3).
    gen = torch.Generator().manual_seed(7)
    B, K, C = 3, 8, 16
    R0 = torch.randn(B, K, C, generator=gen, dtype=torch.float64)
    U0 = torch.eye(K, dtype=torch.float64).expand(B, K, K).clone()
    w = torch.randn(B, T, K, generator=gen, dtype=torch.float64)
    z = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    ref = write_batched(MemoryState(R0, U0), w, z, sigma_xi2, None)
    f32 = write_batched(MemoryState(R0.float(), U0.float()), w.float(), z.float(), sigma_xi2, None)
    assert (f32.U.double() - ref.U).abs().max() <= 1e-3 * ref.U.abs().max()
    assert (f32.R.double() - ref.R).abs().max() <= 1e-3 * ref.R.abs().max()
