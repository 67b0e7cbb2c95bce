"""Kanerva++: window reads against direct crops, gradients to the keys, an order-invariant write,
every KL in the bound (against torch.distributions), IS consistency, and learning on real MNIST."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from km.cli import main
from km.config import compose_config
from km.memory.block import BlockMemoryWriter, key_to_theta, offset_theta, read_windows
from km.models import KanervaPlusPlus, KPPConfig
from km.nets import NetConfig
from km.train import train
from tests.conftest import assert_is_estimate_consistent_with_bound, binary_episodes, learning_run, needs_data

DT = torch.float64
SHAPE = (1, 28, 28)
NET = NetConfig(channels=[4, 8, 8], embed_dim=16)


@pytest.mark.parametrize("size,window", [(8, 3), (16, 8), (16, 16)])
def test_unit_scale_integer_window_equals_direct_crop(size: int, window: int) -> None:
    M = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size + window), dtype=DT)
    offsets = [(0, 0), (size - window, size - window), ((size - window) // 2, 1), (1, size - window)]
    offsets = [(ox, oy) for ox, oy in offsets if max(ox, oy) <= size - window]  # windows inside the memory
    theta = torch.stack([offset_theta(ox, oy, window, size) for ox, oy in offsets]).to(DT)  # (T, 2, 3)
    win = read_windows(M, theta.expand(2, *theta.shape), window)  # (B, T, C_m, w, w)
    for t, (ox, oy) in enumerate(offsets):
        torch.testing.assert_close(win[:, t], M[:, :, oy : oy + window, ox : ox + window])


def test_key_to_theta_unit_scale_and_bounds() -> None:
    th = key_to_theta(torch.zeros(1, 1, 3, dtype=DT), 8, 16)[0, 0]  # the centred window at unit scale
    torch.testing.assert_close(th, offset_theta(4, 4, 8, 16).to(DT))
    far = key_to_theta(torch.tensor([[[0.0, 50.0, -50.0]]], dtype=DT), 8, 16)[0, 0]  # translations saturate ...
    torch.testing.assert_close(far, offset_theta(8, 0, 8, 16).to(DT))  # ... at the memory's edge
    assert key_to_theta(torch.tensor([[[0.5, 0, 0]]], dtype=DT), 8, 16)[0, 0, 0, 0].item() == pytest.approx(
        0.5 * 1.6487, rel=1e-4
    )


def test_gradcheck_window_read_through_the_keys() -> None:
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(1, 2, 8, 8, generator=gen, dtype=DT, requires_grad=True)
    Y = (0.3 * torch.randn(1, 2, 3, generator=gen, dtype=DT)).requires_grad_()  # off the sampling grid
    assert torch.autograd.gradcheck(lambda M, Y: read_windows(M, key_to_theta(Y, 4, 8), 4), (M, Y))
    out = read_windows(M, key_to_theta(Y, 4, 8), 4).pow(2).sum()
    (gM, gY) = torch.autograd.grad(out, (M, Y))
    assert gY.abs().sum() > 0 and gM.abs().sum() > 0  # gradients reach the key parameters and the memory


def test_write_is_invariant_to_the_order_of_the_episode() -> None:
    torch.manual_seed(0)
    writer = BlockMemoryWriter(E=10, channels=3, size=8, hidden=16).double()
    e = torch.randn(2, 6, 10, dtype=DT)
    perm = torch.randperm(6)
    for a, b in zip(writer(e), writer(e[:, perm]), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(writer(e)[0], writer(e[:, :3])[0])  # but it does depend on the items
    with pytest.raises(ValueError, match="memory size must be"):
        BlockMemoryWriter(E=10, channels=3, size=12)


def small_kpp(**kw) -> KanervaPlusPlus:
    torch.manual_seed(0)
    cfg = KPPConfig(
        **{"code_dim": 6, "mem_channels": 2, "mem_size": 8, "window": 4, "read_steps": 2, "hidden": 16, **kw}
    )
    return KanervaPlusPlus(cfg, NET, SHAPE, "bernoulli")


episodes = partial(binary_episodes, seed_base=10)  # (b, t, 1, 28, 28) binary episodes


def test_bound_includes_every_kl_against_torch_distributions() -> None:
    kpp = small_kpp().double()
    x = episodes().double()
    torch.manual_seed(4)
    out = kpp.episode_elbo(x)
    torch.manual_seed(4)  # replay: M, Y, z in the model's order
    e = kpp.encode_images(x)
    mu_M, ls_M = kpp.writer(e)
    M = mu_M + torch.randn_like(mu_M) * ls_M.exp()
    mu_Y, ls_Y = kpp.posterior_keys(e, M)
    Y = mu_Y + torch.randn_like(mu_Y) * ls_Y.exp()
    mu_z, ls_z = kpp.posterior_z(e)
    mu_p, ls_p = kpp.prior_z(M, Y)
    z = mu_z + torch.randn_like(mu_z) * ls_z.exp()
    T = x.shape[1]
    kl_M = kl_divergence(Normal(mu_M, ls_M.exp()), Normal(0.0, 1.0)).flatten(1).sum(-1) / T
    kl_Y = kl_divergence(Normal(mu_Y, ls_Y.exp()), Normal(0.0, 1.0)).sum(-1).mean(1)
    kl_z = kl_divergence(Normal(mu_z, ls_z.exp()), Normal(mu_p, ls_p.exp())).sum(-1).mean(1)
    recon = -kpp.log_px(kpp.decode_codes(z), x).mean(1)
    for name, ref in (("kl_M", kl_M), ("kl_Y", kl_Y), ("kl_z", kl_z)):
        torch.testing.assert_close(out.parts[name], ref)
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.neg_elbo, recon + kl_M + kl_Y + kl_z)
    torch.testing.assert_close(out.loss, out.neg_elbo.mean())
    assert (kl_M > 0).all()


def test_one_sample_importance_weight_is_the_bound_in_expectation() -> None:
    assert_is_estimate_consistent_with_bound(small_kpp().double().eval(), episodes(b=2, t=3).double())


def test_keys_are_refined_by_reading_and_interface_shapes() -> None:
    kpp = small_kpp()
    x = episodes()
    mem = kpp.write(x)
    with torch.no_grad():
        kpp.refine[-1].bias.fill_(0.1)  # a non-zero refinement: each read step moves the keys
    e = kpp.encode_images(x)
    moved = kpp.posterior_keys(e, mem[0])[0] - kpp.q_key(e).chunk(2, dim=-1)[0]
    torch.testing.assert_close(moved, torch.full_like(moved, 0.2))  # 2 read steps x 0.1
    assert mem[0].shape == (2, 2, 8, 8) and kpp.read_keys(x, mem).shape == (2, 4, 3)
    assert kpp.generate(mem, 5, batch=2).shape == (2, 5, *SHAPE) and kpp.generate(None, 3).shape == (1, 3, *SHAPE)
    chain = kpp.denoise(x, mem, 2)
    assert len(chain) == 2 and chain[0].shape == x.shape
    with pytest.raises(ValueError, match=r"bad value for 'model.window': 9 \(must be in \[1, model.mem_size = 8\]\)"):
        small_kpp(window=9)


@needs_data
def test_kpp_learns_on_real_mnist_and_pictures(tmp_path: Path, capsys) -> None:
    from km.runs import epoch_metrics

    ov = learning_run(tmp_path, "kpp_cpu", "run_id=kpp")
    train(compose_config(ov))
    run = tmp_path / "runs" / "default" / "kpp"
    val = epoch_metrics(run, "val/neg_elbo")
    # untrained ~540 nats/image; at this budget K++ trails the VAE (190 on the same settings): its memory
    # sample enters the prior of z with unit noise at first, and the memory KL makes using it expensive
    assert min(val) < 222 and val[0] - min(val) > 15, val
    parts = {k: epoch_metrics(run, f"val/{k}")[2] for k in ("kl_z", "kl_Y", "kl_M", "recon")}
    assert parts["kl_M"] > 0 and val[2] == pytest.approx(sum(parts.values()), rel=1e-4)
    assert json.loads((run / "eval.json").read_text())["model"] == "kpp"
    main(["sample", str(run), "--iters", "1"])
    assert (run / "samples" / "windows.png").exists()


def test_authors_sized_config_composes_and_trains_one_step(tmp_path: Path) -> None:
    """configs/model/kpp.yaml (memory 8 x 128 x 128, window 32, 20 read steps, latent 256): one step on CPU."""
    from km.models import MODELS

    cfg = compose_config(
        ["model=kpp", "data=mnist", f"runs_dir={tmp_path}", "net.channels=[4,8,8]", "net.embed_dim=16"]
    )
    assert (cfg.model.mem_size, cfg.model.window, cfg.model.read_steps, cfg.model.code_dim) == (128, 32, 20, 256)
    cls, cfg_cls = MODELS["kpp"]
    model = cls(
        cfg_cls(**{k: v for k, v in cfg.model.items()}), NetConfig(channels=[4, 8, 8], embed_dim=16), SHAPE, "bernoulli"
    )
    loss = model.episode_elbo(episodes(b=1, t=3)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.writer.up[-1].weight.grad.abs().sum() > 0
