"""Product Kanerva Machine: the weighted write against per-machine Bayesian updates and brute-force
conditioning, P = 1 equals the Kanerva Machine, the machine-weight KL, gradients, and learning on MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, MultivariateNormal, kl_divergence

from km.config import compose_config
from km.memory import MemoryState, write_batched, write_online
from km.memory.product import ProductMemory, kl_machine_weights, machine_weights, weighted_write
from km.models import KanervaMachine, KMConfig, PKMConfig, ProductKanervaMachine
from km.nets import NetConfig
from km.train import train
from tests.conftest import learning_run, needs_data

DT = torch.float64
SHAPE = (1, 28, 28)
NET = NetConfig(channels=[4, 8, 8], embed_dim=16)


def problem(seed: int = 0, B: int = 2, P: int = 3, T: int = 4, K: int = 3, C: int = 2):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(B, P, K, K, generator=gen, dtype=DT)
    state = MemoryState(
        torch.randn(B, P, K, C, generator=gen, dtype=DT), A @ A.transpose(-1, -2) / K + 0.5 * torch.eye(K, dtype=DT)
    )
    w = torch.randn(B, P, T, K, generator=gen, dtype=DT)
    z = torch.randn(B, T, C, generator=gen, dtype=DT)
    pi = torch.randn(B, T, P, generator=gen, dtype=DT).softmax(-1)
    return state, w, z, pi


@pytest.mark.parametrize("mode", ["batched", "online"])
def test_weighted_write_equals_per_machine_updates_and_dense_tempered_conditioning(mode: str) -> None:
    state, w, z, pi = problem(1)
    s2 = 0.6
    post = weighted_write(state, w, z, pi, s2, mode=mode, u_diag_clip=None)
    B, P, K, C = state.R.shape
    for b in range(B):
        for p in range(P):
            # the per-machine KM update, item t observed with noise s2 / pi_tp ...
            one = MemoryState(state.R[b, p][None], state.U[b, p][None])
            R_ref, U_ref = one
            for t in range(w.shape[2]):  # ... as T single-item KM writes
                R_ref, U_ref = write_batched(
                    MemoryState(R_ref, U_ref),
                    w[b, p, t][None, None],
                    z[b, t][None, None],
                    s2 / pi[b, t, p].item(),
                    u_diag_clip=None,
                )
            torch.testing.assert_close(post.R[b, p], R_ref[0])
            torch.testing.assert_close(post.U[b, p], U_ref[0])
            # ... and dense Gaussian conditioning on vec(M_p) with noise covariance diag(s2 / pi_p) (x) I_C
            mu, S = state.R[b, p].reshape(-1), torch.kron(state.U[b, p], torch.eye(C, dtype=DT))
            H = torch.kron(w[b, p], torch.eye(C, dtype=DT))  # (T C, K C)
            N = torch.kron(torch.diag(s2 / pi[b, :, p]), torch.eye(C, dtype=DT))
            gain = S @ H.T @ torch.linalg.inv(H @ S @ H.T + N)
            torch.testing.assert_close(post.R[b, p].reshape(-1), mu + gain @ (z[b].reshape(-1) - H @ mu))
            torch.testing.assert_close(torch.kron(post.U[b, p], torch.eye(C, dtype=DT)), S - gain @ H @ S)


def test_unit_weight_is_a_full_write_and_zero_weight_no_write() -> None:
    state, w, z, _ = problem(2, P=2)
    pi = torch.zeros(2, 4, 2, dtype=DT)
    pi[..., 0] = 1.0
    post = weighted_write(state, w, z, pi, 0.5, u_diag_clip=None)
    full = write_batched(MemoryState(state.R[:, 0], state.U[:, 0]), w[:, 0], z, 0.5, u_diag_clip=None)
    torch.testing.assert_close(post.R[:, 0], full.R)
    torch.testing.assert_close(post.R[:, 1], state.R[:, 1], atol=1e-5, rtol=0)  # weight 0 (counted as 1e-8): untouched


def test_per_item_noise_online_equals_batched() -> None:
    state, w, z, pi = problem(3)
    noise = 0.4 / pi.transpose(-1, -2)  # (B, P, T)
    zp = z[:, None].expand(-1, 3, -1, -1)
    a = write_batched(state, w, zp, noise, u_diag_clip=None)
    b = write_online(state, w, zp, noise, u_diag_clip=None)[0]
    torch.testing.assert_close(a.R, b.R)
    torch.testing.assert_close(a.U, b.U)


def test_machine_weights_and_kl() -> None:
    logits = torch.randn(5, 4, dtype=DT)
    pi = machine_weights(logits)
    ref = kl_divergence(Categorical(probs=pi), Categorical(probs=torch.full((4,), 0.25, dtype=DT)))
    torch.testing.assert_close(kl_machine_weights(pi), ref)
    sparse = machine_weights(logits, top_k=2)
    assert ((sparse > 0).sum(-1) == 2).all() and torch.allclose(sparse.sum(-1), torch.ones(5, dtype=DT))
    assert (sparse.argmax(-1) == logits.argmax(-1)).all()
    assert torch.isfinite(kl_machine_weights(sparse)).all()
    assert (kl_machine_weights(machine_weights(logits[:, :1])) == 0).all()  # P = 1: no KL


def test_gradcheck_weighted_write_and_kl() -> None:
    state, w, z, pi = problem(4, P=2, T=3, K=2, C=2)
    mem = ProductMemory(2, 2, 2).double()

    def f(R0, w, z, logits):
        st = MemoryState(R0, state.U)
        post = weighted_write(st, w, z, logits.softmax(-1), 0.7)
        from km.memory import kl_matrix_normal

        return kl_matrix_normal(post, st).sum(-1) + post.R.sum((-3, -2, -1))

    logits = torch.randn(2, 3, 2, dtype=DT)
    assert torch.autograd.gradcheck(
        f, (state.R.requires_grad_(), w.requires_grad_(), z.requires_grad_(), logits.requires_grad_())
    )
    assert mem.kl(mem.prior(2)).abs().max() < 1e-9


def _km_and_pkm_p1(**kw):
    torch.manual_seed(0)
    km = KanervaMachine(
        KMConfig(code_dim=6, memory_size=5, y_dim=3, addr_dim=4, hidden=16, **kw), NET, SHAPE, "bernoulli"
    )
    pkm = ProductKanervaMachine(
        PKMConfig(code_dim=6, memory_size=5, y_dim=3, addr_dim=4, hidden=16, machines=1, **kw), NET, SHAPE, "bernoulli"
    )
    sd = km.state_dict()
    sd["memory.R0"] = sd["memory.R0"][None]  # (K, C) -> (P=1, K, C)
    sd["memory.s"] = sd["memory.s"][None]
    missing, unexpected = pkm.load_state_dict(sd, strict=False)
    assert set(missing) == {"q_c.weight", "q_c.bias"} and not unexpected
    return km.double(), pkm.double()


@pytest.mark.parametrize("kw", [{}, {"sample_memory": True}, {"write_mode": "online"}])
def test_one_machine_is_exactly_the_kanerva_machine(kw) -> None:
    km, pkm = _km_and_pkm_p1(**kw)
    x = torch.bernoulli(torch.full((2, 4, *SHAPE), 0.3), generator=torch.Generator().manual_seed(1)).double()
    torch.manual_seed(7)
    a = km.episode_elbo(x)
    torch.manual_seed(7)
    b = pkm.episode_elbo(x)
    torch.testing.assert_close(b.neg_elbo, a.neg_elbo, atol=1e-6, rtol=0)
    for k in ("kl_y", "kl_z", "kl_M"):
        torch.testing.assert_close(b.parts[k], a.parts[k], atol=1e-6, rtol=0)
    assert b.parts["kl_c"].abs().max() == 0
    torch.manual_seed(8)
    is_km = km.log_likelihood_is(x, 3)
    torch.manual_seed(8)
    torch.testing.assert_close(pkm.log_likelihood_is(x, 3), is_km, atol=1e-6, rtol=0)


def test_importance_sampled_estimate_is_above_the_bound_and_shapes() -> None:
    torch.manual_seed(0)
    pkm = (
        ProductKanervaMachine(
            PKMConfig(code_dim=6, memory_size=6, machines=3, y_dim=3, addr_dim=4, hidden=16), NET, SHAPE, "bernoulli"
        )
        .double()
        .eval()
    )
    x = torch.bernoulli(torch.full((2, 4, *SHAPE), 0.3), generator=torch.Generator().manual_seed(2)).double()
    with torch.no_grad():
        elbo = -torch.stack([pkm.episode_elbo(x).neg_elbo for _ in range(200)]).mean(0)
        assert (pkm.log_likelihood_is(x, 200) > elbo).all()
        mem = pkm.write(x)
    assert mem.R.shape == (2, 3, 2, 6) and pkm.addressing(x).shape == (2, 4, 6)
    assert pkm.generate(mem, 5, batch=2).shape == (2, 5, *SHAPE) and pkm.item_machines(x).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="multiple of model.machines"):
        ProductKanervaMachine(PKMConfig(memory_size=10, machines=3), NET, SHAPE, "bernoulli")
    assert math.isfinite(pkm.episode_elbo(x).loss.item())
    _ = MultivariateNormal  # (dense references above use explicit inverses instead)


@needs_data
def test_pkm_learns_on_real_mnist_and_pictures(tmp_path: Path, capsys) -> None:
    from km.cli import main
    from km.runs import epoch_metrics

    ov = learning_run(tmp_path, "pkm", "model.memory_size=16", "model.machines=4", "run_id=pkm")
    train(compose_config(ov))
    run = tmp_path / "runs" / "default" / "pkm"
    val = epoch_metrics(run, "val/neg_elbo")
    assert val[2] < 215 and val[2] < val[0] - 15, val
    parts = {k: epoch_metrics(run, f"val/{k}")[2] for k in ("kl_y", "kl_c", "kl_z", "kl_M", "recon")}
    assert parts["kl_M"] > 0 and val[2] == pytest.approx(sum(parts.values()), rel=1e-4)
    assert json.loads((run / "eval.json").read_text())["model"] == "pkm"
    capsys.readouterr()
    main(["sample", str(run), "--iters", "1"])
    out = capsys.readouterr().out
    assert (run / "samples" / "machines.png").exists() and (run / "samples" / "machine_usage.png").exists(), out
