"""`EpisodeModel`: the one interface every model implements, and the shared loop.

A batch is a set of episodes `x: (B, T, C, H, W)`. A model implements

- `episode_elbo(x) -> EpisodeOutput`: the training loss and the per-image bound terms;
- `write(x) -> memory` (None for the VAE), `read(x, memory) -> decoder params (B, T, ...)`;
- `generate(memory, n) -> (B, n, C, H, W)` samples, given a memory (or none);
- `denoise(x, memory, iters) -> list of (B, T, C, H, W)`, one per read iteration;
- `log_likelihood_is(x, S) -> (B,)` an importance-sampled estimate of log p per image.

Everything else (optimiser, metric names and units, NaN guard, logging) lives here, once.
Metrics are reported per image: the episode bound divided by T (KM paper convention), in
nats/image for binary data and bits/dim for 8-bit data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch

from km.likelihoods import make_likelihood
from km.nets import Decoder, Encoder, NetConfig


@dataclass
class ModelConfig:
    """Fields every model has. Each model extends it with its own."""

    name: str = "?"
    lr: float = 1e-4
    weight_decay: float = 0.0
    code_dim: int = 64  # C: size of the latent code z that the decoder reads


class NonFiniteLossError(RuntimeError):
    """Raised by the training step when the loss is NaN or infinite."""


@dataclass
class EpisodeOutput:
    loss: torch.Tensor  # scalar minimised by the optimiser (may hold training-only terms)
    neg_elbo: torch.Tensor  # (B,) -ELBO of each episode / T, nats per image, every KL included
    recon: torch.Tensor  # (B,) -E[log p(x|z)] per image
    kl: torch.Tensor  # (B,) all KL terms per image (sum of the parts below)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named (B,) KL parts
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) training-only terms, not in the bound


class EpisodeModel(pl.LightningModule):
    # The bottom-up posterior head e(x) -> (mu, log sigma) of z, (E -> 2 C_z), that `init_from` carries
    # between models along with the encoder and decoder; None where a model has no such head.
    z_head: str | None = None
    # False for a model with no episode-level latent (the VAE): it trains on plain iid batches even when
    # data.episodes=class, since class-pure minibatches only slow its SGD (measured: 6-9 nats/image worse after 256 steps
    # with 4 one-digit episodes per batch).
    episodic: bool = True

    def __init__(self, cfg: ModelConfig, net: NetConfig, image_shape: tuple[int, int, int], likelihood: str):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.lik = make_likelihood(likelihood)
        self.dims = int(torch.tensor(self.image_shape).prod())
        self.encoder = Encoder(self.image_shape, net)
        self.decoder = Decoder(cfg.code_dim, self.image_shape, self.lik.param_channels(image_shape[0]), net)
        self.is_samples = 100  # set by the evaluation config
        self.km_config: dict[str, Any] | None = None  # full resolved run config, saved in checkpoints

    # ---- the interface --------------------------------------------------------------------
    def episode_elbo(self, x: torch.Tensor) -> EpisodeOutput:
        raise NotImplementedError

    def write(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def read(self, x: torch.Tensor, memory: Any) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, memory: Any, n: int, batch: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, memory: Any, iters: int) -> list[torch.Tensor]:
        """Iterative reading: feed the mean image of each read back in; the mean image after each of `iters`
        reads (KM's Algorithm 1, DKM's attractor dynamics, a VAE's reconstruct-again loop)."""
        chain = []
        for _ in range(iters):
            x = self.mean_image(self.read(x, memory))
            chain.append(x)
        return chain

    def log_likelihood_is(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        raise NotImplementedError

    # ---- helpers shared by models ---------------------------------------------------------
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C, H, W) -> e(x): (B, T, E)."""
        b, t = x.shape[:2]
        return self.encoder(x.flatten(0, 1)).view(b, t, -1)

    def decode_codes(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, T, C_z) -> decoder params (B, T, P, H, W)."""
        b, t = z.shape[:2]
        out = self.decoder(z.flatten(0, 1))
        return out.view(b, t, *out.shape[1:])

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder params (B, T, P, H, W) -> mean image (B, T, C, H, W)."""
        b, t = params.shape[:2]
        return self.lik.mean(params.flatten(0, 1)).view(b, t, *self.image_shape)

    def log_px(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params: (B, T, P, H, W), x: (B, T, C, H, W) -> (B, T) log p(x|z) in nats."""
        b, t = x.shape[:2]
        return self.lik.log_prob(params.flatten(0, 1), x.flatten(0, 1)).view(b, t)

    def report(self, nats: torch.Tensor) -> torch.Tensor:
        """Convert nats per image to the reporting unit (nats/image or bits/dim)."""
        return self.lik.to_report(nats, self.dims)

    @staticmethod
    def check_episodes(x: torch.Tensor, image_shape: tuple[int, ...]) -> None:
        if x.dim() != 5 or tuple(x.shape[2:]) != tuple(image_shape):
            raise ValueError(
                f"expected episodes of shape (B, T, {', '.join(map(str, image_shape))}), got {tuple(x.shape)}"
            )

    # ---- Lightning wiring -----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _log_terms(self, split: str, out: EpisodeOutput, batch_size: int) -> None:
        terms = {"neg_elbo": out.neg_elbo, "recon": out.recon, "kl": out.kl, **out.parts, **out.extras}
        for k, v in terms.items():
            self.log(
                f"{split}/{k}", self.report(v.detach().mean()), batch_size=batch_size,
                on_step=False, on_epoch=True, sync_dist=True, prog_bar=(k == "neg_elbo"),
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["x"]
        out = self.episode_elbo(x)
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"non-finite loss ({out.loss.item()}) at epoch {self.current_epoch}, step {self.global_step}"
            )
        self.log("train/loss", out.loss.detach(), batch_size=x.shape[0], on_step=True, on_epoch=True)
        self._log_terms("train", out, x.shape[0])
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._log_terms("val", self.episode_elbo(batch["x"]), batch["x"].shape[0])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x = batch["x"]
        self._log_terms("test", self.episode_elbo(x), x.shape[0])
        if self.is_samples > 0:
            nll = -self.log_likelihood_is(x, self.is_samples)
            self.log(f"test/nll_is{self.is_samples}", self.report(nll.mean()), batch_size=x.shape[0],
                     on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["km_config"] = self.km_config
