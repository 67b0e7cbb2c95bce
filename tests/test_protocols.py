"""The three test protocols (joint, memory-conditional, held-out), the training objectives (KL weights,
warm-up, optimiser) and checkpoint selection by protocol: in-process, tiny nets, random binary episodes.

References are independent of the code under test where it matters: KL(M) is recomputed from a memory
written by `model.write` (deterministic addresses), the held-out memory is captured at the write and
compared with the targets perturbed, and the IS estimates are checked against the bound statistically.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from km.config import compose_config
from km.models import MODELS, DKMConfig, KMConfig, KPPConfig, PKMConfig, VAEConfig
from km.models.base import KLWeights
from km.models.km import gaussian_kl
from km.nets import NetConfig
from tests.conftest import binary_episodes, tiny

SHAPE = (1, 28, 28)
NET = NetConfig(channels=[4, 8, 8], embed_dim=16)
CONFIGS = {
    "vae": VAEConfig(code_dim=6),
    "km": KMConfig(code_dim=6, memory_size=5, y_dim=3, addr_dim=4, hidden=16),
    "dkm": DKMConfig(code_dim=6, memory_size=5),
    "pkm": PKMConfig(code_dim=6, memory_size=6, machines=3, y_dim=3, addr_dim=4, hidden=16),
    "kpp": KPPConfig(code_dim=6, mem_channels=2, mem_size=8, window=4, read_steps=2, hidden=16),
}
MEMORY_MODELS = ["km", "dkm", "pkm", "kpp"]


def make(name: str, **kw):
    torch.manual_seed(0)
    cls, cfg_cls = MODELS[name]
    base = {k: v for k, v in vars(CONFIGS[name]).items() if k != "kl_weights"}
    if "kl_weights" in kw:
        kw["kl_weights"] = KLWeights(**kw["kl_weights"])
    return cls(cfg_cls(**{**base, **kw}), NET, SHAPE, "bernoulli").double().eval()


def episodes(b: int = 2, t: int = 6) -> torch.Tensor:
    return binary_episodes(b, t, seed_base=7).double()


def deterministic_addresses(model) -> None:
    """KM / PKM: q(y | x) with (almost) no spread, so the sampled addresses equal the mean addresses that
    `model.write` uses (log sigma is clamped at -8: a 3e-4 std)."""
    if hasattr(model, "q_y"):
        with torch.no_grad():
            model.q_y.weight.normal_(0, 0.3)
            model.q_y.bias[model.cfg.y_dim :] = -50.0


def memory_kl(model, x: torch.Tensor) -> torch.Tensor:
    """KL(q(M | X) || p(M)) (B,) of the memory written from the whole episode by the model's public `write`."""
    mem = model.write(x)
    if model.cfg.name == "kpp":
        mu, ls = (t.flatten(1) for t in mem)
        return gaussian_kl(mu, ls, torch.zeros_like(mu), torch.zeros_like(ls))
    return model.memory.kl(mem)


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_memory_conditional_is_the_joint_bound_less_the_memory_kl(name: str) -> None:
    model = make(name)
    deterministic_addresses(model)
    x = episodes()
    T = x.shape[1]
    with torch.no_grad():
        out = model.episode_elbo(x)
        kl_M = memory_kl(model, x)
    torch.testing.assert_close(out.parts["kl_M"], kl_M / T, rtol=1e-3, atol=1e-4)
    per_item = out.recon + sum(v for k, v in out.parts.items() if k != "kl_M")  # reconstruction + per-item KLs
    memory_conditional = model.protocol_values(out)["memory_conditional"]
    torch.testing.assert_close(memory_conditional, per_item)
    torch.testing.assert_close(memory_conditional, out.neg_elbo - kl_M / T, rtol=1e-3, atol=1e-3)
    assert (memory_conditional < out.neg_elbo).all()  # the memory is not free in the joint bound


def _capture_writes(model, monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every memory the model writes (the posterior q(M | written items))."""
    seen: list = []
    if model.cfg.name == "kpp":  # the K++ writer is a module: a forward hook sees q(M | X)
        model.writer.register_forward_hook(lambda module, args, out: seen.append(out))
        return seen
    for attr in ("write_with_kl", "write_online_with_kls"):  # the models write through these (posterior, KL...)
        original = getattr(model.memory, attr)

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seen.append(out[0])
            return out

        monkeypatch.setattr(model.memory, attr, recording)
    return seen


def _tensors(memory) -> list[torch.Tensor]:
    return list(memory) if isinstance(memory, tuple) and not hasattr(memory, "R") else [memory.R, memory.U]


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_heldout_targets_never_enter_the_write(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make(name)
    x = episodes(t=6)
    n = 2
    y = x.clone()
    y[:, -n:] = 1 - y[:, -n:]  # perturb the targets only
    z = x.clone()
    z[:, 0] = 1 - z[:, 0]  # perturb one context item
    seen = _capture_writes(model, monkeypatch)
    bounds = []
    with torch.no_grad():
        for episode in (x, y, z):
            torch.manual_seed(5)
            bounds.append(model.episode_elbo(episode, targets=n).neg_elbo)
    (mx,), (my,), (mz,) = seen[:1], seen[1:2], seen[2:3]
    for a, b in zip(_tensors(mx), _tensors(my), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # q(M | context) unchanged by the targets
    assert any(not torch.equal(a, b) for a, b in zip(_tensors(mx), _tensors(mz), strict=True))  # the context counts
    assert not torch.allclose(bounds[0], bounds[1])  # and the targets are what is scored
    with torch.no_grad():  # the held-out bound has no KL(M): the memory belongs to the context
        assert "kl_M" not in model.episode_elbo(x, targets=n).parts


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_heldout_is_estimate_matches_the_bound_and_tightens_with_samples(name: str) -> None:
    model = make(name)
    x = episodes(b=2, t=4)
    n, reps = 2, 300
    torch.manual_seed(3)
    with torch.no_grad():
        xs = x.repeat(reps, 1, 1, 1, 1)
        elbo = -model.episode_elbo(xs, targets=n).neg_elbo.view(reps, -1)  # (reps, B) lower bounds
        is1 = model.log_likelihood_is(xs, 1, targets=n).view(reps, -1)
        se = (elbo.var(0) / reps + is1.var(0) / reps).sqrt()
        assert ((elbo.mean(0) - is1.mean(0)).abs() < 4 * se + 1e-3).all(), (elbo.mean(0), is1.mean(0), se)
        means = {}
        for S in (1, 8, 64):  # E[IS_S] does not fall as S grows (the NLL estimate does not rise)
            r = 16
            est = model.log_likelihood_is(x.repeat(r, 1, 1, 1, 1), S, targets=n).view(r, -1)
            means[S] = (est.mean(0), est.std(0) / r**0.5)
        for lo, hi in ((1, 8), (8, 64)):
            (m_lo, s_lo), (m_hi, s_hi) = means[lo], means[hi]
            assert (m_hi > m_lo - 4 * (s_lo**2 + s_hi**2).sqrt() - 1e-3).all(), (lo, hi, m_lo, m_hi)
        assert (means[64][0] > elbo.mean(0)).all()


def test_the_vaes_three_protocols_coincide() -> None:
    vae = make("vae")
    x = episodes(t=6)
    n = 2
    with torch.no_grad():
        torch.manual_seed(1)
        joint = vae.episode_elbo(x)
        values = vae.protocol_values(joint)
        torch.manual_seed(1)
        heldout = vae.episode_elbo(x, targets=n).neg_elbo
        torch.manual_seed(1)
        targets_alone = vae.episode_elbo(x[:, -n:]).neg_elbo
        torch.manual_seed(2)
        is_heldout = vae.log_likelihood_is(x, 7, targets=n)
        torch.manual_seed(2)
        is_alone = vae.log_likelihood_is(x[:, -n:], 7)
    torch.testing.assert_close(values["memory_conditional"], values["joint"], rtol=0, atol=0)
    torch.testing.assert_close(values["joint"], joint.neg_elbo, rtol=0, atol=0)
    torch.testing.assert_close(heldout, targets_alone, rtol=0, atol=0)
    torch.testing.assert_close(is_heldout, is_alone, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["km", "dkm", "pkm", "kpp"])
def test_kl_weights_change_the_training_loss_only(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make(name, kl_weights={"memory": 0.0, "z": 0.5, "addressing": 2.0, "warmup_steps": 4})
    x = episodes()
    step = {"s": 1}
    monkeypatch.setattr(type(model), "global_step", property(lambda self: step["s"]))
    torch.manual_seed(4)
    out = model.episode_elbo(x)
    torch.testing.assert_close(out.neg_elbo, out.recon + out.kl)  # every KL still in the reported bound
    torch.testing.assert_close(out.kl, sum(out.parts.values()))
    assert "kl_M" in out.parts
    weights = {"kl_M": 0.0, "kl_z": 0.5, "kl_y": 2.0, "kl_c": 2.0, "kl_w": 2.0, "kl_Y": 2.0}
    for s, ramp in ((1, 0.5), (3, 1.0), (10, 1.0)):  # linear warm-up over 4 steps: (s + 1) / 4
        step["s"] = s
        expected = out.loss - sum((1 - weights[k] * ramp) * v.mean() for k, v in out.parts.items())
        torch.testing.assert_close(model.training_loss(out), expected)


def test_optimiser_choice() -> None:
    assert type(make("km", optimizer="rmsprop").configure_optimizers()) is torch.optim.RMSprop
    assert type(make("km").configure_optimizers()) is torch.optim.Adam


@pytest.mark.parametrize(
    "protocol,monitor",
    [("joint", "val/neg_elbo"), ("memory_conditional", "val/memory_conditional"), ("heldout", "val/heldout")],
)
def test_checkpoint_selection_follows_the_protocol(tmp_path: Path, protocol: str, monitor: str) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from km.train import make_trainer

    cfg = compose_config(tiny(tmp_path, f"checkpoint.protocol={protocol}"))
    trainer, _ = make_trainer(cfg, tmp_path / "run", "id")
    best, last = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert best.monitor == monitor and last.monitor is None  # the best by the protocol; last.ckpt every epoch
