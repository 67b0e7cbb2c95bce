"""Shared nets, likelihoods and the VAE's bound terms against torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Normal, kl_divergence

from km.likelihoods import Bernoulli, DiscretisedLogistic
from km.models import VAE, VAEConfig
from km.models.base import EpisodeModel
from km.nets import Decoder, Encoder, NetConfig


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 32, 32), (3, 32, 32)])
def test_encoder_decoder_shapes(shape: tuple[int, int, int]) -> None:
    net = NetConfig(channels=[8, 16, 16], embed_dim=20)
    enc, dec = Encoder(shape, net), Decoder(7, shape, 2 * shape[0], net)
    assert enc(torch.rand(5, *shape)).shape == (5, 20)
    assert dec(torch.randn(5, 7)).shape == (5, 2 * shape[0], *shape[1:])


def test_channels_last_nets_compute_the_same_function() -> None:
    torch.manual_seed(0)
    shape = (3, 32, 32)
    nets = {cl: NetConfig(channels=[8, 16, 16], embed_dim=20, channels_last=cl) for cl in (False, True)}
    enc = {cl: Encoder(shape, n) for cl, n in nets.items()}
    dec = {cl: Decoder(7, shape, 6, n) for cl, n in nets.items()}
    enc[True].load_state_dict(enc[False].state_dict())
    dec[True].load_state_dict(dec[False].state_dict())
    assert enc[True].conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, z = torch.rand(5, *shape), torch.randn(5, 7)
    torch.testing.assert_close(enc[True](x), enc[False](x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec[True](z), dec[False](z), atol=1e-5, rtol=1e-5)


def test_bernoulli_matches_torch() -> None:
    logits, x = torch.randn(4, 1, 6, 6), torch.bernoulli(torch.rand(4, 1, 6, 6))
    ref = TorchBernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli().log_prob(logits, x), ref)


def test_discretised_logistic_is_a_distribution_over_256_values() -> None:
    torch.manual_seed(0)
    for mu, log_s in [(0.3, -2.0), (-0.95, -4.0), (0.0, 1.0), (0.99, -6.0)]:
        p = torch.tensor([[math.atanh(mu)], [log_s]]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
        x = (torch.arange(256.0) / 255).view(256, 1, 1, 1)
        total = DiscretisedLogistic().log_prob(p, x).exp().sum()
        assert abs(total.item() - 1.0) < 1e-4, (mu, log_s, total)


def _bin_masses_float64(k: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """ln P(bin k) of a logistic(mu, s) on [-1, 1] in float64, written independently: the edge bins take the
    tails (ln sigmoid), a middle bin the CDF difference ln(sigmoid(b) - sigmoid(a)) evaluated as
    ln(e^b - e^a) - ln(1 + e^a) - ln(1 + e^b) with logaddexp / log1p, so nothing underflows."""
    x = 2 * k.double() / 255 - 1
    b, a = (x - mu.double() + 1 / 255) / s.double(), (x - mu.double() - 1 / 255) / s.double()
    zero = torch.zeros_like(a)
    mid = b + torch.log1p(-torch.exp(a - b)) - torch.logaddexp(zero, a) - torch.logaddexp(zero, b)
    return torch.where(k == 0, -torch.logaddexp(zero, -b), torch.where(k == 255, -torch.logaddexp(zero, a), mid))


@pytest.mark.parametrize(
    "case", ["random", "very small scales", "very large scales", "means outside [0, 255]", "every bin"]
)
def test_discretised_logistic_bin_masses_match_a_float64_computation(case: str) -> None:
    torch.manual_seed(0)
    k = torch.arange(256).repeat(100)  # every bin, edges included
    mu = torch.rand(k.shape) * 2 - 1
    log_s = {"very small scales": torch.full(k.shape, -7.0), "very large scales": torch.full(k.shape, 5.0)}.get(
        case, torch.rand(k.shape) * 4 - 5
    )
    if case == "means outside [0, 255]":
        mu = torch.rand(k.shape) * 6 - 3  # pixel means from -255 to 510
    got = DiscretisedLogistic.bin_log_prob(k.float() / 255, mu, log_s).double()
    torch.testing.assert_close(got, _bin_masses_float64(k, mu, log_s.exp()), rtol=1e-5, atol=5e-4)


def test_bits_per_dim_sanity_rows() -> None:
    """Uniform over the 256 values of each sub-pixel: exactly 8 bits/dim. A per-sub-pixel histogram of CIFAR-10
    training images scores (on those images) its mean entropy in bits, through the same conversion."""
    lik = DiscretisedLogistic()
    assert lik.to_report(torch.tensor(3072 * math.log(256.0), dtype=torch.float64), 3072).item() == pytest.approx(
        8.0, abs=1e-12
    )
    from datamodules import build_datamodule

    try:
        dm = build_datamodule("cifar10")
        dm.setup("fit")
    except Exception as e:  # noqa: BLE001 - the data are in ../shared/data on every project machine
        pytest.skip(f"CIFAR-10 not available: {e}")
    x = dm.x["train"][:4000].flatten(1).long()  # (N, 3072) values 0..255
    counts = torch.zeros(3072, 256, dtype=torch.float64).scatter_add_(1, x.T, torch.ones_like(x.T, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)  # (3072, 256) per sub-pixel histogram
    nats = -p.log().gather(1, x.T).sum(0)  # (N,) nats per image under the histogram
    entropy_bits = -(p * p.clamp_min(1e-300).log2()).sum(1).mean()  # mean entropy per sub-pixel
    bpd = lik.to_report(nats.mean(), 3072)
    assert bpd.item() == pytest.approx(entropy_bits.item(), rel=1e-9)
    assert 6.5 < bpd.item() < 8.0  # CIFAR-10 pixel marginals are near, not at, uniform


def test_bits_per_dim_conversion() -> None:
    assert DiscretisedLogistic().to_report(torch.tensor(3072 * math.log(2) * 4.0), 3072).item() == pytest.approx(4.0)
    assert Bernoulli().to_report(torch.tensor(80.0), 784).item() == 80.0


def test_vae_bound_terms_match_torch_distributions() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(code_dim=5), NetConfig(channels=[4, 8, 8], embed_dim=16), (1, 28, 28), "bernoulli")
    x = torch.bernoulli(torch.rand(2, 3, 1, 28, 28))
    torch.manual_seed(1)
    out = vae.episode_elbo(x)
    mu, log_sigma = vae.posterior(x)
    kl_ref = kl_divergence(Normal(mu, log_sigma.exp()), Normal(0.0, 1.0)).sum(-1).mean(1)
    torch.testing.assert_close(out.kl, kl_ref)
    torch.manual_seed(1)
    z = mu + torch.randn_like(mu) * log_sigma.exp()
    recon_ref = -TorchBernoulli(logits=vae.decode_codes(z)).log_prob(x).flatten(2).sum(-1).mean(1)
    torch.testing.assert_close(out.recon, recon_ref)
    torch.testing.assert_close(out.neg_elbo, out.recon + out.kl)


def test_importance_sampling_tightens_the_bound() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(code_dim=5), NetConfig(channels=[4, 8, 8], embed_dim=16), (1, 28, 28), "bernoulli")
    x = torch.bernoulli(torch.full((2, 4, 1, 28, 28), 0.2))
    with torch.no_grad():
        elbo = torch.stack([-vae.episode_elbo(x).neg_elbo for _ in range(50)]).mean(0)
        log_p_1 = torch.stack([vae.log_likelihood_is(x, 1) for _ in range(50)]).mean(0)
        log_p_200 = vae.log_likelihood_is(x, 200)
    torch.testing.assert_close(log_p_1, elbo, atol=1.0, rtol=0)  # S=1 is the ELBO in expectation
    assert (log_p_200 > elbo).all()


def test_wrong_episode_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expected episodes of shape \(B, T, 1, 28, 28\), got \(4, 1, 28, 28\)"):
        EpisodeModel.check_episodes(torch.zeros(4, 1, 28, 28), (1, 28, 28))
