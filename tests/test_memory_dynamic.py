"""DKM addressing against brute-force references (float64, small sizes): both least-squares solvers,
the Bayesian meaning of the ridge solve, KL(w), gradients, and the per-step memory KL with DKM addresses."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from km.memory import DynamicMemory, MemoryState, kl_matrix_normal, solve_addresses, write_online

DT = torch.float64
B, K, C, T = 2, 4, 6, 3


def problem(seed: int = 0, k: int = K, c: int = C):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, k, c, generator=gen, dtype=DT), torch.randn(B, T, c, generator=gen, dtype=DT)


def lstsq_rows(A: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_w ||A w - b||^2 + lam ||w||^2 by plain least squares on the stacked system [A; sqrt(lam) I]."""
    n = A.shape[1]
    A_aug = torch.cat([A, math.sqrt(lam) * torch.eye(n, dtype=A.dtype)])
    b_aug = torch.cat([b, torch.zeros(n, dtype=A.dtype)])
    return torch.linalg.lstsq(A_aug, b_aug[:, None], driver="gelsd").solution[:, 0]


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_ridge_solver_equals_brute_force(lam: float) -> None:
    M, z = problem(1)
    mu = solve_addresses(M, z, lam, "ridge")
    for b in range(B):
        for t in range(T):  # z_t ~ M^T w: design matrix M^T (C x K)
            torch.testing.assert_close(mu[b, t], lstsq_rows(M[b].T, z[b, t], lam))


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_official_solver_equals_brute_force(lam: float) -> None:
    """TF matrix_solve_ls(A = M M^T, b = M z, l2=lam): argmin ||A w - b||^2 + lam ||w||^2."""
    M, z = problem(2)
    mu = solve_addresses(M, z, lam, "official")
    for b in range(B):
        A = M[b] @ M[b].T
        for t in range(T):
            torch.testing.assert_close(mu[b, t], lstsq_rows(A, M[b] @ z[b, t], lam))
    assert not torch.allclose(mu, solve_addresses(M, z, lam, "ridge"))  # a different estimator


def test_ridge_is_the_bayesian_posterior_mean_of_w_with_lambda_applied() -> None:
    """w ~ N(0, s_w0^2 I), z = M^T w + N(0, s_xi^2 I): E[w | z] = (M M^T + s_xi^2/s_w0^2 I)^{-1} M z."""
    mem = DynamicMemory(K, C, sigma_xi=0.7, sigma_w0=1.3).double()
    M, z = problem(3)
    mu = mem.address(M, z)
    s_xi2, s_w02 = 0.7**2, 1.3**2
    for b in range(B):
        cov_w = s_w02 * torch.eye(K, dtype=DT)
        cov_z = M[b].T @ cov_w @ M[b] + s_xi2 * torch.eye(C, dtype=DT)  # (C, C) marginal of z
        gain = cov_w @ M[b] @ torch.linalg.inv(cov_z)  # Cov(w, z) Cov(z)^{-1}
        torch.testing.assert_close(mu[b], z[b] @ gain.T)
    assert mem.lam.item() == pytest.approx(s_xi2 / s_w02)
    # more regularisation shrinks the addresses: lam really applies
    assert (solve_addresses(M, z, 10.0).norm(dim=-1) < solve_addresses(M, z, 0.01).norm(dim=-1)).all()


def test_learned_sigma_xi_moves_lambda() -> None:
    mem = DynamicMemory(K, C, sigma_xi=1.0, learn_sigma_xi=True, sigma_w0=2.0)
    assert mem.lam.item() == pytest.approx(0.25)
    with torch.no_grad():
        mem.log_sigma_xi.fill_(math.log(2.0))
    assert mem.lam.item() == pytest.approx(1.0)


def test_kl_w_equals_torch_distributions() -> None:
    mem = DynamicMemory(K, C, sigma_w0=1.5, sigma_w_init=0.3).double()
    mu = torch.randn(B, T, K, dtype=DT)
    ref = kl_divergence(Normal(mu, mem.log_sigma_w.exp()), Normal(torch.zeros_like(mu), 1.5)).sum(-1)
    torch.testing.assert_close(mem.kl_w(mu), ref)
    assert mem.log_sigma_w.exp().item() == pytest.approx(0.3) and mem.log_sigma_w.requires_grad


@pytest.mark.parametrize("solver", ["ridge", "official"])
def test_gradcheck_solver(solver: str) -> None:
    M, z = problem(4, k=3, c=4)
    lam = torch.tensor(0.5, dtype=DT)
    assert torch.autograd.gradcheck(
        lambda M, z, lam: solve_addresses(M, z, lam, solver),
        (M.requires_grad_(), z.requires_grad_(), lam.requires_grad_()),
    )


def test_gradcheck_dkm_memory_pipeline() -> None:
    """prior -> write at addresses solved on R_0 -> read addresses on the posterior mean -> KL(w) + KL(M)."""
    mem = DynamicMemory(3, 4, sigma_xi=0.8).double()
    R0, z = problem(5, k=3, c=4)
    U0 = torch.eye(3, dtype=DT).expand(B, 3, 3)

    def f(R0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        prior = MemoryState(R0, U0)
        post = mem.write(prior, mem.address(R0, z), z)
        mu = mem.address(post.R, z)
        return mem.kl_w(mu).sum(-1) + kl_matrix_normal(post, prior) + (mu @ post.R).sum((-2, -1))

    assert torch.autograd.gradcheck(f, (R0.requires_grad_(), z.requires_grad_()))


def test_step_kl_with_dkm_addresses_equals_dense_and_closed_form_for_one_item() -> None:
    """With least-squares addresses: one write's per-step KL equals the dense KL on vec(M) and the
    closed form (for T > 1 they agree only in expectation; see test_memory_kanerva)."""
    mem = DynamicMemory(K, C).double()
    R0, z = problem(6)
    prior = MemoryState(R0, torch.eye(K, dtype=DT).expand(B, K, K))
    z1 = z[:, :1]
    post, kl_steps = write_online(prior, mem.address(R0, z1), z1, mem.sigma_xi2, u_diag_clip=None)
    torch.testing.assert_close(kl_steps[:, 0], kl_matrix_normal(post, prior))
    for b in range(B):
        dense = kl_divergence(
            MultivariateNormal(post.R[b].reshape(-1), torch.kron(post.U[b], torch.eye(C, dtype=DT))),
            MultivariateNormal(prior.R[b].reshape(-1), torch.kron(prior.U[b], torch.eye(C, dtype=DT))),
        )
        torch.testing.assert_close(kl_steps[b, 0], dense)


def test_bad_solver_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="solver must be one of"):
        DynamicMemory(K, C, solver="lstsq")
    with pytest.raises(ValueError, match="solver must be one of"):
        solve_addresses(*problem(), 1.0, "qr")
