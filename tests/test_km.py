"""Kanerva Machine model: bound terms against references, write modes, the importance-sampled
estimate's consistency with the bound, pictures and CLI, and learning on real MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from km.cli import main
from km.config import compose_config
from km.memory import MemoryState
from km.models import KanervaMachine, KMConfig
from km.nets import NetConfig
from km.train import train
from tests.conftest import assert_is_estimate_consistent_with_bound, learning_run, needs_data, tiny, train_in_parallel
from tests.conftest import binary_episodes as episodes

SHAPE = (1, 28, 28)
NET = NetConfig(channels=[4, 8, 8], embed_dim=16)


def small_km(**kw) -> KanervaMachine:
    torch.manual_seed(0)
    cfg = KMConfig(code_dim=6, memory_size=5, y_dim=3, addr_dim=4, hidden=16, **kw)
    return KanervaMachine(cfg, NET, SHAPE, "bernoulli")


def test_bound_terms_match_references_sampled_memory() -> None:
    km = small_km(sample_memory=True).double()
    x = episodes().double()
    torch.manual_seed(5)
    out = km.episode_elbo(x)
    # Replay the same noise to rebuild each term independently.
    torch.manual_seed(5)
    e = km.encode_images(x)
    mu_y, ls_y = km.posterior_y(e)
    y = mu_y + torch.randn_like(mu_y) * ls_y.exp()
    w = km.address(y)
    post = km._write(e, w)[0]  # (q(M | X), its KL from the factor): the KL is checked below against kl_isotropic
    M = km.memory.sample(post)
    mu_z, ls_z, _ = km.read_z(e, w, M)
    T = x.shape[1]
    kl_y = kl_divergence(Normal(mu_y, ls_y.exp()), Normal(0.0, 1.0)).sum(-1).mean(1)
    kl_z = kl_divergence(Normal(mu_z, ls_z.exp()), Normal(w @ M, km.memory.log_sigma_xi.exp())).sum(-1).mean(1)
    torch.testing.assert_close(out.parts["kl_y"], kl_y)
    torch.testing.assert_close(out.parts["kl_z"], kl_z)
    # KL(q(M) || p(M)) from torch.distributions, column by column (each column of M is N(R[:, c], U)), not
    # from the memory module's own KL
    prior = km.memory.prior(x.shape[0])
    q = MultivariateNormal(post.R.transpose(1, 2), post.U.unsqueeze(1))  # batch (B, C), event K
    p = MultivariateNormal(prior.R.transpose(1, 2), prior.U.unsqueeze(1))
    kl_M = kl_divergence(q, p).sum(-1)  # (B,)
    torch.testing.assert_close(out.parts["kl_M"], kl_M / T)
    torch.testing.assert_close(out.neg_elbo, out.recon + kl_y + kl_z + kl_M / T)
    assert (out.parts["kl_M"] > 0).all()


def test_exact_memory_expectation_equals_monte_carlo_over_M() -> None:
    """Default mode: the z-KL is E_q(M)[KL(q(z) || N(w^T M, sigma^2))] in closed form."""
    km = small_km().double()
    x = episodes().double()
    torch.manual_seed(6)
    out = km.episode_elbo(x)
    torch.manual_seed(6)
    e = km.encode_images(x)
    mu_y, ls_y = km.posterior_y(e)
    w = km.address(mu_y + torch.randn_like(mu_y) * ls_y.exp())
    post = km._write(e, w)[0]
    mu_z, ls_z, _ = km.read_z(e, w, post.R)
    n = 20000
    with torch.no_grad():
        M = km.memory.sample(MemoryState(post.R.repeat(n, 1, 1), post.U.repeat(n, 1, 1)))  # (n*B, K, C)
        q_n = Normal(mu_z.repeat(n, 1, 1), ls_z.exp().repeat(n, 1, 1))
        mc = kl_divergence(q_n, Normal(w.repeat(n, 1, 1) @ M, km.memory.log_sigma_xi.exp())).sum(-1).mean(1)
        mc = mc.view(n, -1)  # (n, B)
    torch.testing.assert_close(
        out.parts["kl_z"].detach(), mc.mean(0), atol=4 * (mc.std(0) / n**0.5).max().item(), rtol=0
    )


def test_batched_and_online_write_give_the_same_bound() -> None:
    x = episodes().double()
    a, b = small_km(write_mode="batched").double(), small_km(write_mode="online").double()
    torch.manual_seed(1)
    out_a = a.episode_elbo(x)
    torch.manual_seed(1)
    out_b = b.episode_elbo(x)
    torch.testing.assert_close(out_a.neg_elbo, out_b.neg_elbo, atol=1e-8, rtol=1e-8)


def test_one_sample_importance_weight_is_the_bound_in_expectation() -> None:
    """E_q[ln w] with one sample = ELBO: checks that the IS weights use the same densities as the bound."""
    assert_is_estimate_consistent_with_bound(small_km().double(), episodes(b=2, t=3).double())


def test_free_bits_change_the_training_loss_not_the_reported_bound() -> None:
    x = episodes().double()
    plain, free = small_km().double(), small_km(kl_y_free_bits=5.0).double()
    torch.manual_seed(3)
    a = plain.episode_elbo(x)
    torch.manual_seed(3)
    b = free.episode_elbo(x)
    torch.testing.assert_close(a.neg_elbo, b.neg_elbo)  # every KL still in full
    torch.testing.assert_close(a.loss, a.neg_elbo.mean())
    assert b.loss > b.neg_elbo.mean()  # KL_y counted as at least 5 nats per dimension in training


def test_writing_moves_the_prior_of_z_towards_the_written_codes() -> None:
    """The read prior of z for a written item, N(w^T R, .), is nearer the item's code after the write than
    before it: Gaussian conditioning shrinks every residual (Z - W R' = sigma^2 Sigma_z^-1 (Z - W R_0), a
    contraction), and the posterior covariance is below the prior's (U_0 - U' positive semi-definite)."""
    km = small_km(start_as_vae=False).double()  # full-size addresses: the write moves M visibly
    x = episodes().double()
    mem = km.write(x)
    prior = km.memory.prior(x.shape[0])
    e = km.encode_images(x)
    w = km.address(km.posterior_y(e)[0])  # (B, T, K) the write's addresses
    z = km.bottom_up(e)[0]  # (B, T, C) the written codes
    before = (z - w @ prior.R).norm(dim=(1, 2))
    after = (z - w @ mem.R).norm(dim=(1, 2))
    assert isinstance(mem, MemoryState) and (after < 0.99 * before).all(), (before, after)
    assert (torch.linalg.eigvalsh(mem.U) > 0).all()
    assert (torch.linalg.eigvalsh(prior.U - mem.U) > -1e-10).all()
    assert km.generate(mem, 5, batch=2).shape == (2, 5, *SHAPE)
    assert km.generate(None, 3, batch=1).shape == (1, 3, *SHAPE)
    chain = km.denoise(x, mem, 3)
    assert len(chain) == 3 and all(c.shape == x.shape for c in chain)
    assert km.addressing(x).shape == (2, 4, 5)


def test_start_as_vae_init_makes_q_y_the_prior_and_the_addresses_ten_times_smaller() -> None:
    km, plain = small_km(), small_km(start_as_vae=False)  # the same seed: the same layers before the init
    x = episodes()
    mu_y, ls_y = km.posterior_y(km.encode_images(x))
    assert torch.equal(mu_y, torch.zeros_like(mu_y)) and torch.equal(ls_y, torch.zeros_like(ls_y))  # q(y|x) = p(y)
    y = torch.randn(2, 4, 3)
    torch.testing.assert_close(km.address(y), 0.1 * plain.address(y))
    a, b = km.episode_elbo(x), plain.episode_elbo(x)
    assert torch.equal(a.parts["kl_y"], torch.zeros(2)) and (b.parts["kl_y"] > 0).all()
    assert (a.parts["kl_M"] < b.parts["kl_M"]).all()  # small addresses: writing barely moves M


def test_wrong_shapes_and_options_are_clear_errors() -> None:
    km = small_km()
    with pytest.raises(ValueError, match="expected episodes of shape"):
        km.episode_elbo(torch.zeros(4, *SHAPE))
    with pytest.raises(ValueError, match="write_mode"):
        small_km(write_mode="sequential")


@needs_data
def test_km_learns_on_real_mnist_and_its_denoise_and_sample_commands_run(tmp_path: Path, capsys) -> None:
    ov = learning_run(tmp_path, "km", "model.memory_size=16", "run_id=km")
    summary = train(compose_config(ov))
    run = tmp_path / "runs" / "default" / "km"
    from km.runs import epoch_metrics

    val = epoch_metrics(run, "val/neg_elbo")
    assert val[2] < 215 and val[2] < val[0] - 15, val  # untrained: ~540 nats/image
    parts = {k: epoch_metrics(run, f"val/{k}")[2] for k in ("kl_y", "kl_z", "kl_M", "recon")}
    assert parts["kl_M"] > 0 and val[2] == pytest.approx(sum(parts.values()), rel=1e-4)
    assert summary["eval"]["metrics"]["test/nll_is2"] > 0
    assert (run / "samples" / "addressing_002.png").exists()

    capsys.readouterr()
    main(["denoise", str(run), "--noise", "0.15", "--iters", "3", "--episodes", "2"])
    out = capsys.readouterr().out
    assert (run / "denoise" / "noise0.15_iters3.png").exists()
    errs = [float(line.split()[2]) for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(errs) == 4 and errs[0] == pytest.approx(0.15, abs=0.03)  # iteration 0 = the corrupted query
    assert errs[-1] < errs[0]  # reading lowers the pixel error of the query; that is no claim that reading
    # denoises: at this budget the reads fade towards the all-black image, which also scores below 0.15
    # (km study attractors / bench/denoise.py measure trained runs against that reference)
    main(["sample", str(run), "--iters", "2"])
    assert (run / "samples" / "conditional_iters2.png").exists() and (run / "samples" / "addressing.png").exists()
    assert json.loads((run / "eval.json").read_text())["model"] == "km"


@needs_data
def test_km_beats_the_vae_on_conditional_likelihood_from_the_same_warm_start(tmp_path: Path) -> None:
    """Issue #3 acceptance: KM's test -ELBO/T is lower than the VAE's with the same nets and budget.
    Paired protocol (README, "KM vs the VAE"): a VAE pretrained for 256 steps, then the VAE and KM each
    continued from it for 512 steps (T=32, 4 episodes per batch; the VAE on iid batches, KM on iid
    episodes), scored on the same 128 one-digit test episodes. Seed 1 of the three measured, one thread
    per run (deterministic; about 2 minutes on 2 cores). Measured: VAE 112.38 / 111.13 / 112.12 and KM
    111.07 / 109.60 / 109.87 nats/image at seeds 1 / 2 / 3; the gap is smallest at seed 1."""
    common = tiny(
        tmp_path,
        "net.channels=[8,16,32]",
        "net.embed_dim=64",
        "model.code_dim=32",
        "model.lr=2e-3",
        "data.val_episodes=64",
        "eval.is_samples=0",
        "data.train_episodes_per_epoch=256",
        "trainer.max_epochs=8",
    )
    pre = common + ["run_id=pre", "data.episode_length=16", "data.batch_size=8", "data.test_episodes=256"]
    train_in_parallel({"pre": pre})
    cont = common + [
        f"init_from={tmp_path / 'runs' / 'default' / 'pre'}",
        "data.episode_length=32",
        "data.batch_size=4",
        "data.binarize=dynamic",
        "data.eval_episodes=class",
        "data.classes_per_episode=1",
        "data.test_episodes=128",
        "seed=1",
    ]
    train_in_parallel({m: [*cont, f"model={m}", f"run_id={m}"] for m in ("vae", "km")})

    def metrics(m: str) -> dict[str, float]:
        return json.loads((tmp_path / "runs" / "default" / m / "eval.json").read_text())["metrics"]

    vae, km = metrics("vae"), metrics("km")
    print(
        f"test -ELBO/T on one-digit episodes: VAE {vae['test/neg_elbo']:.2f}, KM {km['test/neg_elbo']:.2f}; "
        f"KM parts { {k: round(v, 2) for k, v in km.items()} }"
    )
    assert km["test/neg_elbo"] < vae["test/neg_elbo"], (km, vae)
    # the bound is every part in full, and KM's addresses carry information about x (q(y) has not collapsed)
    assert km["test/neg_elbo"] == pytest.approx(
        sum(km[f"test/{k}"] for k in ("recon", "kl_y", "kl_z", "kl_M")), rel=1e-4
    )
    assert km["test/kl_y"] > 0.5 and km["test/kl_M"] > 0


def test_heldout_loss_adds_the_weighted_heldout_bound_to_the_training_loss(monkeypatch) -> None:
    """model.heldout_loss = w: training loss = joint loss + w x the held-out loss of the same episodes (memory
    from the first T - n, n = T // 4 targets), same noise draws; the reported joint bound is unchanged."""
    x = episodes().double()  # (B, T, 1, 28, 28)
    n = max(1, x.shape[1] // 4)
    model = small_km(heldout_loss=0.5).double()
    logged: dict[str, float] = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(type(model), "global_step", property(lambda self: 0))
    torch.manual_seed(4)
    loss = model.training_step({"x": x}, 0)
    torch.manual_seed(4)
    joint, held = model.episode_elbo(x), model.episode_elbo(x, targets=n)
    torch.testing.assert_close(loss, joint.loss + 0.5 * held.loss)
    assert logged["train/heldout"] == pytest.approx(held.neg_elbo.mean().item())
    assert logged["train/neg_elbo"] == pytest.approx(joint.neg_elbo.mean().item())
    assert "kl_M" not in held.parts and held.loss != joint.loss  # the targets do not pay for the memory
    with pytest.raises(ValueError, match="heldout_loss"):
        small_km(heldout_loss=-1.0)
