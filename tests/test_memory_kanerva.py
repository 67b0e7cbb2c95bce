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
    kl_isotropic,
    kl_matrix_normal,
    log_prob_matrix_normal,
    read,
    safe_cholesky,
    sample,
    write_batched,
    write_online,
    write_with_kl,
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
    """Reference Gaussian conditioning of x ~ N(mu, S) on y = H x + N(0, noise_var I) (explicit inverse);
    noise_var a float or a vector of per-coordinate variances."""
    S_y = H @ S @ H.T + torch.diag(torch.as_tensor(noise_var, dtype=S.dtype).expand(H.shape[0]))
    gain = S @ H.T @ torch.linalg.inv(S_y)
    return mu + gain @ (y - H @ mu), S - gain @ H @ S


def dense_kl(q: MemoryState, p: MemoryState, b: int) -> torch.Tensor:
    return kl_divergence(MultivariateNormal(*vec_gaussian(q, b)), MultivariateNormal(*vec_gaussian(p, b)))


# 1. write == Gaussian conditioning on vec(M), every form, T < K and T > K, one noise or one per item
def _noise(per_item: bool, t: int, seed: int = 17, dtype: torch.dtype = DT):
    gen = torch.Generator().manual_seed(seed)
    return 0.1 + torch.rand(B, t, generator=gen, dtype=dtype) if per_item else SIGMA_XI2


@pytest.mark.parametrize("per_item", [False, True], ids=["scalar_noise", "per_item_noise"])
@pytest.mark.parametrize("t", [3, 7], ids=["T<K", "T>K"])
@pytest.mark.parametrize("mode", ["predictive", "information", "online"])
def test_write_equals_dense_gaussian_conditioning(mode: str, t: int, per_item: bool) -> None:
    state, w, z = random_problem(t=t)
    noise = _noise(per_item, t)
    if mode == "online":
        post, _ = write_online(state, w, z, noise, u_diag_clip=None)
    else:
        post = write_batched(state, w, z, noise, u_diag_clip=None, form=mode)
    eye_C = torch.eye(C, dtype=DT)
    for b in range(B):
        mu, S = vec_gaussian(state, b)
        noise_b = noise[b].repeat_interleave(C) if per_item else noise  # (T C,) vec order t * C + c
        mu_ref, S_ref = dense_condition(mu, S, torch.kron(w[b], eye_C), z[b].reshape(-1), noise_b)
        torch.testing.assert_close(post.R[b].reshape(-1), mu_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(torch.kron(post.U[b], eye_C), S_ref, atol=1e-10, rtol=0)


# 1b. the KL from the write's own factor == dense KL(q || the state written into), general U and isotropic u I
@pytest.mark.parametrize("isotropic", [False, True], ids=["general_U", "isotropic_U"])
@pytest.mark.parametrize("per_item", [False, True], ids=["scalar_noise", "per_item_noise"])
@pytest.mark.parametrize("t", [3, 7], ids=["T<K", "T>K"])
@pytest.mark.parametrize("form", ["predictive", "information"])
def test_write_with_kl_equals_dense_kl(form: str, t: int, per_item: bool, isotropic: bool) -> None:
    state, w, z = random_problem(seed=18, t=t)
    u0 = None
    if isotropic:
        u0 = 0.5 + torch.rand(B, generator=torch.Generator().manual_seed(19), dtype=DT)  # (B,)
        state = MemoryState(state.R, u0[:, None, None] * torch.eye(K, dtype=DT))
    post, kl = write_with_kl(state, w, z, _noise(per_item, t), u_diag_clip=None, form=form, u0=u0)
    assert kl.shape == (B,)
    torch.testing.assert_close(
        post.U, write_batched(state, w, z, _noise(per_item, t), None, "predictive").U, atol=1e-10, rtol=0
    )
    for b in range(B):
        torch.testing.assert_close(kl[b], dense_kl(post, state, b), atol=1e-10, rtol=1e-10)


def test_auto_form_follows_shape_and_bad_form_raises() -> None:
    for t in (3, 4, 5):  # K = 4: predictive for T <= K, information above; both exact, so compare to each
        state, w, z = random_problem(seed=20, t=t)
        auto = write_batched(state, w, z, SIGMA_XI2, None)
        form = "predictive" if t <= K else "information"
        torch.testing.assert_close(auto.U, write_batched(state, w, z, SIGMA_XI2, None, form).U, atol=0, rtol=0)
    with pytest.raises(ValueError, match="form must be one of"):
        write_batched(state, w, z, SIGMA_XI2, form="sideways")


# 1c. float32: the information form keeps U accurate when T >> K at small noise
@pytest.mark.parametrize("sigma_xi2", [1e-2, 1e-4])
def test_float32_write_accuracy_when_T_much_larger_than_K(sigma_xi2: float) -> None:
    """T = 256, K = 8: the T x T predictive form lost 1.1% (1e-2) and 126% (1e-4) of U in float32."""
    gen = torch.Generator().manual_seed(21)
    b, k, c, t = 2, 8, 16, 256
    R = torch.randn(b, k, c, generator=gen, dtype=DT)
    w = torch.nn.functional.normalize(torch.randn(b, t, k, generator=gen, dtype=DT), dim=-1)
    z = torch.randn(b, t, c, generator=gen, dtype=DT)
    u0 = torch.ones(b, dtype=DT)
    state = MemoryState(R, torch.eye(k, dtype=DT).expand(b, k, k))
    ref, kl_ref = write_with_kl(state, w, z, sigma_xi2, None, u0=u0)
    f32 = MemoryState(R.float(), state.U.float())
    for u in (None, u0.float()):  # general U and isotropic
        post, kl = write_with_kl(f32, w.float(), z.float(), sigma_xi2, None, u0=u)

        def rel(x: torch.Tensor, y: torch.Tensor) -> float:
            return ((x.double() - y).norm() / y.norm()).item()

        assert rel(post.U, ref.U) < 1e-4 and rel(post.R, ref.R) < 1e-4
        assert rel(kl, kl_ref) < 1e-4


@pytest.mark.parametrize("form", ["predictive", "information"])
def test_float32_write_and_kl_match_float64(form: str) -> None:
    """Default-like sizes (T = 16, K = 32, small addresses as at init) in float32 against float64."""
    gen = torch.Generator().manual_seed(22)
    b, k, c, t = 3, 32, 20, 16
    R = torch.randn(b, k, c, generator=gen, dtype=DT)
    w = 0.3 * torch.nn.functional.normalize(torch.randn(b, t, k, generator=gen, dtype=DT), dim=-1)
    z = torch.randn(b, t, c, generator=gen, dtype=DT)
    u0 = torch.full((b,), 1.5, dtype=DT)
    state = MemoryState(R, 1.5 * torch.eye(k, dtype=DT).expand(b, k, k))
    ref, kl_ref = write_with_kl(state, w, z, 0.5, None, form, u0)
    post, kl = write_with_kl(MemoryState(R.float(), state.U.float()), w.float(), z.float(), 0.5, None, form, u0.float())
    torch.testing.assert_close(post.U.double(), ref.U, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post.R.double(), ref.R, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref, atol=1e-4, rtol=1e-5)


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


@pytest.mark.parametrize("isotropic", [False, True], ids=["general_U", "isotropic_U"])
@pytest.mark.parametrize("form", ["predictive", "information"])
def test_gradcheck_write_with_kl(form: str, isotropic: bool) -> None:
    R, A, w, z = _grad_inputs()
    if form == "information":  # T > K
        gen = torch.Generator().manual_seed(23)
        w = (0.5 * torch.randn(2, 5, 3, generator=gen, dtype=DT)).requires_grad_()
        z = (0.5 * torch.randn(2, 5, 2, generator=gen, dtype=DT)).requires_grad_()
    if isotropic:
        log_u = torch.tensor([0.2, -0.3], dtype=DT, requires_grad=True)

        def fn(R, log_u, w, z):
            u = log_u.exp()
            state = MemoryState(R, u[:, None, None] * torch.eye(3, dtype=DT))
            (R_new, U_new), kl = write_with_kl(state, w, z, 0.5, form=form, u0=u)
            return R_new, U_new, kl

        assert torch.autograd.gradcheck(fn, (R, log_u, w, z))
    else:

        def fn(R, A, w, z):
            (R_new, U_new), kl = write_with_kl(MemoryState(R, _spd(A)), w, z, 0.5, form=form)
            return R_new, U_new, kl

        assert torch.autograd.gradcheck(fn, (R, A, w, z))


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
    post, kl = mem.write_with_kl(w, z)
    torch.testing.assert_close(post.U, batched.U)
    torch.testing.assert_close(kl, kl_matrix_normal(post, prior))
    torch.testing.assert_close(mem.kl(post), kl)  # kl_isotropic
    post_online, kl_online = mem.write_with_kl(w, z, "online")
    torch.testing.assert_close(kl_online, kl)
    torch.testing.assert_close(kl_isotropic(post, mem.R0, mem.u0), kl)
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


# 11. numerics: the per-step KL in float32 at any noise level; the algebra's dtype and autocast
@pytest.mark.parametrize("sigma_xi2", [1e-2, 1e-6, 1e-9])
def test_step_kl_finite_and_accurate_in_float32(sigma_xi2: float) -> None:
    """w^T U w / sigma_xi^2 up to 1e9: log1p(-beta) was -inf once beta rounded to 1 (about 1.7e7)."""
    gen = torch.Generator().manual_seed(24)
    b, k, c, t = 2, 8, 5, 4
    state = MemoryState(torch.randn(b, k, c, generator=gen, dtype=DT), torch.eye(k, dtype=DT).expand(b, k, k))
    w = torch.nn.functional.normalize(torch.randn(b, t, k, generator=gen, dtype=DT), dim=-1)
    z = torch.randn(b, t, c, generator=gen, dtype=DT)
    _, ref = write_online(state, w, z, sigma_xi2, u_diag_clip=None)
    _, kl32 = write_online(
        MemoryState(state.R.float(), state.U.float()), w.float(), z.float(), sigma_xi2, u_diag_clip=None
    )
    assert torch.isfinite(kl32).all()
    torch.testing.assert_close(kl32[:, 0].double(), ref[:, 0], rtol=1e-5, atol=0)  # first step: U = I exactly
    assert torch.isfinite(ref).all()


def test_float64_algebra_inside_float32_memory_and_no_autocast() -> None:
    torch.manual_seed(25)
    k, c, t = 8, 6, 64
    mem32 = KanervaMemory(K=k, C=c, sigma_xi=1e-2)
    mem64 = KanervaMemory(K=k, C=c, sigma_xi=1e-2, algebra_dtype=torch.float64)
    ref = KanervaMemory(K=k, C=c, sigma_xi=1e-2).double()
    for m in (mem64, ref):
        m.load_state_dict(mem32.state_dict())
    w = torch.nn.functional.normalize(torch.randn(2, t, k), dim=-1)
    z = torch.randn(2, t, c)
    post_ref, kl_ref = ref.write_with_kl(w.double(), z.double(), "online")  # a different algorithm, in float64
    post64, kl64 = mem64.write_with_kl(w, z)
    assert post64.U.dtype == kl64.dtype == torch.float32
    torch.testing.assert_close(post64.U.double(), post_ref.U, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(kl64.double(), kl_ref, atol=0, rtol=1e-6)
    kl64.sum().backward()
    assert mem64.R0.grad is not None and mem64.R0.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: the memory algebra stays in float32
        post_bf, kl_bf = mem32.write_with_kl(w, z)
        M = mem32.sample(post_bf)
    post32, kl32 = mem32.write_with_kl(w, z)
    assert post_bf.U.dtype == kl_bf.dtype == M.dtype == torch.float32
    torch.testing.assert_close(post_bf.U, post32.U, atol=0, rtol=0)
    torch.testing.assert_close(kl_bf, kl32, atol=0, rtol=0)
