"""Kanerva Machine memory math against brute-force dense references (float64, small sizes).

vec convention for every reference: row-major vec(M)[k * C + c] = M[k, c] = M.reshape(K * C), so
MN(R, U, I_C) is N(vec R, U ⊗ I_C) = N(R.reshape(-1), kron(U, I_C)) and Z = W M reads
vec(Z) = kron(W, I_C) vec(M).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from km.memory import (
    KanervaMemory,
    MemoryState,
    kl_matrix_normal,
    log_prob_matrix_normal,
    read,
    safe_cholesky,
    sample,
    write_batched,
    write_online,
)

DT = torch.float64
B, K, C, T = 2, 4, 3, 5
SIGMA_XI2 = 0.7


def random_spd(*shape: int, n: int, gen: torch.Generator, dtype: torch.dtype = DT) -> torch.Tensor:
    A = torch.randn(*shape, n, n, generator=gen, dtype=dtype)
    return A @ A.transpose(-1, -2) / n + 0.5 * torch.eye(n, dtype=dtype)


def random_problem(seed: int = 0, b: int = B, k: int = K, c: int = C, t: int = T):
    gen = torch.Generator().manual_seed(seed)
    state = MemoryState(torch.randn(b, k, c, generator=gen, dtype=DT), random_spd(b, n=k, gen=gen))
    w = torch.randn(b, t, k, generator=gen, dtype=DT)
    z = torch.randn(b, t, c, generator=gen, dtype=DT)
    return state, w, z


def vec_gaussian(state: MemoryState, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (KC,) and dense covariance kron(U, I_C) (KC, KC) of vec(M) for batch element b."""
    c = state.R.shape[-1]
    return state.R[b].reshape(-1), torch.kron(state.U[b], torch.eye(c, dtype=state.U.dtype))


def dense_condition(mu, S, H, y, noise_var):
    """Reference Gaussian conditioning of x ~ N(mu, S) on y = H x + N(0, noise_var I) (explicit inverse)."""
    S_y = H @ S @ H.T + noise_var * torch.eye(H.shape[0], dtype=S.dtype)
    gain = S @ H.T @ torch.linalg.inv(S_y)
    return mu + gain @ (y - H @ mu), S - gain @ H @ S


def dense_kl(q: MemoryState, p: MemoryState, b: int) -> torch.Tensor:
    return kl_divergence(MultivariateNormal(*vec_gaussian(q, b)), MultivariateNormal(*vec_gaussian(p, b)))


# 1. write == Gaussian conditioning on vec(M)
@pytest.mark.parametrize("mode", ["batched", "online"])
def test_write_equals_dense_gaussian_conditioning(mode: str) -> None:
    state, w, z = random_problem()
    if mode == "batched":
        post = write_batched(state, w, z, SIGMA_XI2, u_diag_clip=None)
    else:
        post, _ = write_online(state, w, z, SIGMA_XI2, u_diag_clip=None)
    eye_C = torch.eye(C, dtype=DT)
    for b in range(B):
        mu, S = vec_gaussian(state, b)
        mu_ref, S_ref = dense_condition(mu, S, torch.kron(w[b], eye_C), z[b].reshape(-1), SIGMA_XI2)
        torch.testing.assert_close(post.R[b].reshape(-1), mu_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(torch.kron(post.U[b], eye_C), S_ref, atol=1e-10, rtol=0)


# 2. batched == T sequential on-line writes
@pytest.mark.parametrize("clip", [None, (1e-6, 1e10)], ids=["exact", "clipped"])
def test_batched_equals_online(clip) -> None:
    state, w, z = random_problem(seed=1, t=8)
    batched = write_batched(state, w, z, SIGMA_XI2, u_diag_clip=clip)
    online, _ = write_online(state, w, z, SIGMA_XI2, u_diag_clip=clip)
    torch.testing.assert_close(batched.R, online.R, atol=1e-10, rtol=0)
    torch.testing.assert_close(batched.U, online.U, atol=1e-10, rtol=0)


def test_writes_are_pure_and_clip_applies() -> None:
    state, w, z = random_problem(seed=16)
    R, U = state.R.clone(), state.U.clone()
    # unclipped diag(U') is < 0.5 after all T items and > 0.9 after the first one: both bounds bind
    for t, bound in ((T, 0.5), (1, 0.9)):
        for post in (
            write_batched(state, w[:, :t], z[:, :t], SIGMA_XI2, (0.5, 0.9)),
            write_online(state, w[:, :t], z[:, :t], SIGMA_XI2, (0.5, 0.9))[0],
        ):
            d = torch.diagonal(post.U, dim1=-2, dim2=-1)
            assert d.min().item() >= 0.5 and d.max().item() <= 0.9 and (d == bound).any()
    torch.testing.assert_close(state.R, R, atol=0, rtol=0)
    torch.testing.assert_close(state.U, U, atol=0, rtol=0)


# 3. matrix-normal KL == dense MultivariateNormal KL
def test_kl_matrix_normal_equals_dense() -> None:
    q, _, _ = random_problem(seed=2)
    p, _, _ = random_problem(seed=3)
    kl = kl_matrix_normal(q, p)
    assert kl.shape == (B,)
    for b in range(B):
        torch.testing.assert_close(kl[b], dense_kl(q, p, b), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(kl_matrix_normal(q, q), torch.zeros(B, dtype=DT), atol=1e-12, rtol=0)


def test_log_prob_matrix_normal_equals_dense() -> None:
    state, _, _ = random_problem(seed=12)
    M = torch.randn(B, K, C, generator=torch.Generator().manual_seed(13), dtype=DT)
    lp = log_prob_matrix_normal(M, state)
    for b in range(B):
        ref = MultivariateNormal(*vec_gaussian(state, b)).log_prob(M[b].reshape(-1))
        torch.testing.assert_close(lp[b], ref, atol=1e-10, rtol=1e-10)


# 4. per-step KL == dense KL between consecutive posteriors
def test_step_kl_equals_dense_consecutive_kl() -> None:
    state, w, z = random_problem(seed=4)
    _, kl_steps = write_online(state, w, z, SIGMA_XI2, u_diag_clip=None)
    assert kl_steps.shape == (B, T)
    prev = state
    for t in range(T):
        cur, _ = write_online(prev, w[:, t : t + 1], z[:, t : t + 1], SIGMA_XI2, u_diag_clip=None)
        for b in range(B):
            torch.testing.assert_close(kl_steps[b, t], dense_kl(cur, prev, b), atol=1e-10, rtol=1e-10)
        prev = cur


# 5. telescoping: counterexample, Monte Carlo equality in expectation, exact for T = 1
def test_step_kls_do_not_telescope_counterexample() -> None:
    """K = C = 1, U_0 = 1, sigma_xi^2 = 1, two opposite observations z = +3, -3 at w = 1."""
    prior = MemoryState(torch.zeros(1, 1, 1, dtype=DT), torch.ones(1, 1, 1, dtype=DT))
    w = torch.ones(1, 2, 1, dtype=DT)
    z = torch.tensor([3.0, -3.0], dtype=DT).reshape(1, 2, 1)
    post, kl_steps = write_online(prior, w, z, 1.0, u_diag_clip=None)
    closed = kl_matrix_normal(post, prior)
    # by hand: R_2 = 0, U_2 = 1/3, so KL(q_2 || q_0) = (1/3 - 1 + ln 3) / 2 whatever the magnitude of z
    torch.testing.assert_close(closed, torch.tensor([(1 / 3 - 1 + math.log(3)) / 2], dtype=DT))
    assert (kl_steps.sum(-1) - closed).abs().item() > 1e-3
    assert kl_steps.sum().item() > 5 * closed.item()


def test_step_kls_sum_equals_closed_form_for_one_step() -> None:
    state, w, z = random_problem(seed=5, t=1)
    post, kl_steps = write_online(state, w, z, SIGMA_XI2, u_diag_clip=None)
    torch.testing.assert_close(kl_steps[:, 0], kl_matrix_normal(post, state), atol=1e-12, rtol=1e-12)


def test_step_kls_telescope_in_expectation_under_model() -> None:
    """M ~ prior, z_t = w_t^T M + noise: E[sum_t KL_t] = E[KL(q_T||q_0)] = I(M; Z) = C/2 ln|I + W U0 W^T / s2|."""
    gen = torch.Generator().manual_seed(6)
    n, k, c, t, s2 = 20000, 3, 2, 4, 0.5
    R0 = torch.randn(k, c, generator=gen, dtype=DT)
    U0 = random_spd(n=k, gen=gen)
    W = torch.randn(t, k, generator=gen, dtype=DT)
    prior = MemoryState(R0.expand(n, k, c), U0.expand(n, k, k))
    M = R0 + torch.linalg.cholesky(U0) @ torch.randn(n, k, c, generator=gen, dtype=DT)
    z = W @ M + math.sqrt(s2) * torch.randn(n, t, c, generator=gen, dtype=DT)
    post, kl_steps = write_online(prior, W.expand(n, t, k), z, s2, u_diag_clip=None)
    step_sum, closed = kl_steps.sum(-1), kl_matrix_normal(post, prior)
    mutual_info = 0.5 * c * torch.logdet(torch.eye(t, dtype=DT) + W @ U0 @ W.T / s2)

    def within(x: torch.Tensor, target: torch.Tensor) -> bool:
        return (x.mean() - target).abs().item() < 4 * x.std().item() / math.sqrt(n)

    assert within(step_sum - closed, torch.zeros((), dtype=DT))  # paired difference
    assert within(step_sum, mutual_info)
    assert within(closed, mutual_info)
    assert (step_sum - closed).abs().max().item() > 1e-3  # yet they differ sample by sample


# 6. read against brute force
def test_read_equals_dense() -> None:
    state, w, _ = random_problem(seed=7)
    mean, var = read(state, w, SIGMA_XI2)
    assert mean.shape == (B, T, C) and var.shape == (B, T)
    eye_C = torch.eye(C, dtype=DT)
    for b in range(B):
        mu, S = vec_gaussian(state, b)
        H = torch.kron(w[b], eye_C)  # vec(w^T M) for all t
        cov_read = H @ S @ H.T  # (T C, T C)
        torch.testing.assert_close(mean[b].reshape(-1), H @ mu)
        coord_var = torch.diagonal(cov_read).reshape(T, C) + SIGMA_XI2
        torch.testing.assert_close(var[b, :, None].expand(T, C), coord_var)


def test_sample_moments() -> None:
    state, _, _ = random_problem(seed=8, b=1)
    n = 40000
    big = MemoryState(state.R.expand(n, K, C), state.U.expand(n, K, K))
    torch.manual_seed(8)
    M = sample(big)  # (n, K, C)
    torch.testing.assert_close(M.mean(0), state.R[0], atol=0.05, rtol=0)
    cov = torch.einsum("nkc,nlc->kl", M - state.R, M - state.R) / (n * C)  # columns share U
    torch.testing.assert_close(cov, state.U[0], atol=0.05, rtol=0)


# 7. gradcheck
def _spd(A: torch.Tensor) -> torch.Tensor:
    return A @ A.transpose(-1, -2) + torch.eye(A.shape[-1], dtype=A.dtype)


def _grad_inputs(seed: int = 9):
    gen = torch.Generator().manual_seed(seed)
    b, k, c, t = 2, 3, 2, 3

    def leaf(*shape: int) -> torch.Tensor:
        return (0.5 * torch.randn(*shape, generator=gen, dtype=DT)).requires_grad_()

    return leaf(b, k, c), leaf(b, k, k), leaf(b, t, k), leaf(b, t, c)


def test_gradcheck_write_batched() -> None:
    R, A, w, z = _grad_inputs()
    assert torch.autograd.gradcheck(lambda R, A, w, z: write_batched(MemoryState(R, _spd(A)), w, z, 0.5), (R, A, w, z))


def test_gradcheck_write_online() -> None:
    R, A, w, z = _grad_inputs()

    def fn(R, A, w, z):
        (R_new, U_new), kl_steps = write_online(MemoryState(R, _spd(A)), w, z, 0.5)
        return R_new, U_new, kl_steps

    assert torch.autograd.gradcheck(fn, (R, A, w, z))


def test_gradcheck_read() -> None:
    R, A, w, _ = _grad_inputs()
    assert torch.autograd.gradcheck(lambda R, A, w: read(MemoryState(R, _spd(A)), w, 0.5), (R, A, w))


def test_gradcheck_kl_matrix_normal() -> None:
    Rq, Aq, _, _ = _grad_inputs(seed=10)
    Rp, Ap, _, _ = _grad_inputs(seed=11)
    fn = lambda Rq, Aq, Rp, Ap: kl_matrix_normal(MemoryState(Rq, _spd(Aq)), MemoryState(Rp, _spd(Ap)))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (Rq, Aq, Rp, Ap))


def test_gradcheck_sample() -> None:
    R, A, _, _ = _grad_inputs()
    eps = torch.randn(R.shape, dtype=DT, generator=torch.Generator().manual_seed(12))
    assert torch.autograd.gradcheck(lambda R, A: sample(MemoryState(R, _spd(A)), eps), (R, A))


# 8. U stays symmetric positive definite over many writes
def _assert_spd(U: torch.Tensor) -> None:
    assert torch.isfinite(U).all()
    torch.testing.assert_close(U, U.transpose(-1, -2), atol=0, rtol=0)
    assert torch.linalg.eigvalsh(U.double()).min().item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["online", "batched"])
@pytest.mark.parametrize("sigma_xi2", [1.0, 0.01])
def test_U_stays_spd_over_1000_writes(dtype: torch.dtype, mode: str, sigma_xi2: float) -> None:
    gen = torch.Generator().manual_seed(13)
    b, k, c, n_items, t = 2, 16, 8, 1000, 10
    state = MemoryState(torch.zeros(b, k, c, dtype=dtype), torch.eye(k, dtype=dtype).expand(b, k, k))
    w = torch.nn.functional.normalize(torch.randn(b, n_items, k, generator=gen, dtype=dtype), dim=-1)
    z = torch.randn(b, n_items, c, generator=gen, dtype=dtype)
    if mode == "online":
        state, kl_steps = write_online(state, w, z, sigma_xi2)
        assert torch.isfinite(kl_steps).all() and (kl_steps >= 0).all()
    else:
        for i in range(0, n_items, t):
            state = write_batched(state, w[:, i : i + t], z[:, i : i + t], sigma_xi2)
            _assert_spd(state.U)
    assert torch.isfinite(state.R).all()
    _assert_spd(state.U)


# 9. safe_cholesky
def test_safe_cholesky_recovers_singular_psd_only_where_needed() -> None:
    gen = torch.Generator().manual_seed(14)
    v = torch.randn(4, 1, generator=gen, dtype=DT)
    singular = v @ v.T  # rank 1, PSD
    spd = random_spd(n=4, gen=gen)
    assert torch.linalg.cholesky_ex(singular).info.item() > 0
    L = safe_cholesky(torch.stack([spd, singular]))
    assert torch.isfinite(L).all()
    torch.testing.assert_close(L[0], torch.linalg.cholesky(spd), atol=0, rtol=0)  # untouched
    torch.testing.assert_close(L[1] @ L[1].T, singular, atol=1e-3 * singular.diagonal().mean().item(), rtol=0)


def test_safe_cholesky_raises_for_indefinite() -> None:
    A = torch.diag(torch.tensor([1.0, 1.0, -10.0], dtype=DT))
    with pytest.raises(ValueError, match="not positive definite after 5 tries"):
        safe_cholesky(A)


# 10. KanervaMemory module
def test_kanerva_memory_module() -> None:
    torch.manual_seed(15)
    mem = KanervaMemory(K=5, C=3, sigma_xi=0.8, learn_sigma_xi=True).double()
    b, t = 2, 4
    prior = mem.prior(b)
    assert prior.R.shape == (b, 5, 3) and prior.U.shape == (b, 5, 5)
    torch.testing.assert_close(prior.U[0], (1 + 1e-6) * torch.eye(5, dtype=DT))
    torch.testing.assert_close(mem.sigma_xi2, torch.tensor(0.64, dtype=DT))
    w = torch.randn(b, t, 5, dtype=DT)
    z = torch.randn(b, t, 3, dtype=DT)
    batched, online = mem.write(prior, w, z, "batched"), mem.write(prior, w, z, "online")
    torch.testing.assert_close(batched.R, online.R)
    torch.testing.assert_close(batched.U, online.U)
    post, kl = mem.write_with_kl(prior, w, z)
    torch.testing.assert_close(kl, kl_matrix_normal(post, prior))
    mean, var = mem.read(post, w)
    loss = kl.sum() + mean.square().sum() + var.sum() + mem.sample(post).sum()
    loss.backward()
    for p in (mem.R0, mem.s, mem.log_sigma_xi):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        mem.write(prior, w, z, "sideways")


def test_kanerva_memory_fixed_sigma_is_buffer() -> None:
    mem = KanervaMemory(K=4, C=2, sigma_xi=0.5)
    assert "log_sigma_xi" in dict(mem.named_buffers())
    assert {n for n, _ in mem.named_parameters()} == {"R0", "s"}
    assert mem.R0.abs().max().item() <= 2.0  # truncated at 2 std
