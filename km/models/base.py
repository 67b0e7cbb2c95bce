"""`EpisodeModel`: the one interface every model implements, and the shared loop.

A batch is a set of episodes `x: (B, T, C, H, W)`. A model implements

- `episode_elbo(x) -> EpisodeOutput`: the training loss and the per-image bound terms;
- `write(x) -> memory` (None for the VAE), `read(x, memory) -> decoder params (B, T, ...)`;
- `generate(memory, n) -> (B, n, C, H, W)` samples, given a memory (or none);
- `denoise(x, memory, iters) -> list of (B, T, C, H, W)`, one per read iteration;
- `log_likelihood_is(x, S) -> (B,)` an importance-sampled estimate of log p per image.

Every model also scores an episode under the three test protocols (README, "Test protocols"):
`episode_elbo(x)` is the joint bound; `episode_elbo(x, targets=n)` writes the memory from the first
T - n items only and scores the n targets (held-out); the memory-conditional number is the joint one
with KL(M) left out. `log_likelihood_is(x, S, targets=n)` is the matching importance-sampled estimate.

Everything else (optimiser, KL weights of the training loss, metric names and units, NaN guard,
logging) lives here, once. Metrics are reported per image: the episode bound divided by T (KM paper
convention), in nats/image for binary data and bits/dim for 8-bit data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch

from km.likelihoods import make_likelihood
from km.memory.kanerva import NonPositiveDefiniteError
from km.nets import Decoder, Encoder
from km.runs import NonFiniteLossError
from km.schema import (  # noqa: F401 - re-exported
    KL_GROUPS,
    Choice,
    KLWeights,
    MemoryDtype,
    ModelConfig,
    NetConfig,
    Optimizer,
    WriteMode,
    need,
)


@dataclass
class EpisodeOutput:
    """The bound of an episode (joint: every item scored, KL(M) in `parts['kl_M']`) or of its held-out
    targets (`episode_elbo(x, targets=n)`: only the n targets scored, per target image, no KL(M))."""

    loss: torch.Tensor  # scalar minimised by the optimiser at KL weights 1 (may hold training-only terms)
    neg_elbo: torch.Tensor  # (B,) -ELBO per scored image, nats, every KL included
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
        self.heldout_targets: int | None = None  # n targets of the held-out protocol; None: T // 4
        self.km_config: dict[str, Any] | None = None  # full resolved run config, saved in checkpoints
        # trainer.compile: the compiled bound and IS estimate (km/compiling.py); None: eager
        self._elbo_step: Any = None
        self._is_step: Any = None
        self._backward_probed = False

    # ---- the interface --------------------------------------------------------------------
    def episode_elbo(self, x: torch.Tensor, targets: int = 0) -> EpisodeOutput:
        """targets = 0: the joint bound of the episode. targets = n: the memory is written from the first
        T - n items only and the last n are scored, each with every KL of its own (held-out)."""
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

    def describe_memory(self) -> str:
        """The size of the memory in words, for tables (the studies ask the model, not its name)."""
        if not self.episodic:
            return "none"
        K = getattr(self.cfg, "memory_size", None)
        return f"{K} slots x {self.cfg.code_dim}" if K is not None else "?"

    def log_likelihood_is(self, x: torch.Tensor, samples: int, targets: int = 0) -> torch.Tensor:
        """(B,) importance-sampled ln p(X) / T (targets = 0), or ln p(x_targets | X_context) / n with the
        memory written from the context only (targets = n)."""
        raise NotImplementedError

    # ---- trainer.compile ------------------------------------------------------------------
    def compile_steps(self, backend: str = "inductor") -> None:
        """Compile the training and evaluation step (`episode_elbo`, `log_likelihood_is`) with
        `torch.compile`; a compiler failure falls back to eager with one warning (km/compiling.py)."""
        from km.compiling import CompiledOrEager, disable_layout_optimization

        disable_layout_optimization()
        name = type(self).__name__
        self._elbo_step = CompiledOrEager(self.episode_elbo, backend, f"{name}.episode_elbo")
        self._is_step = CompiledOrEager(self.log_likelihood_is, backend, f"{name}.log_likelihood_is")

    def step_elbo(self, x: torch.Tensor, targets: int = 0) -> EpisodeOutput:
        """`episode_elbo` as the loop runs it: compiled under trainer.compile, else eager."""
        return (self._elbo_step or self.episode_elbo)(x, targets=targets)

    def step_log_likelihood_is(self, x: torch.Tensor, samples: int, targets: int = 0) -> torch.Tensor:
        return (self._is_step or self.log_likelihood_is)(x, samples, targets=targets)

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
    def check_episodes(x: torch.Tensor, image_shape: tuple[int, ...], targets: int = 0) -> tuple[slice, slice]:
        """Check x: (B, T, C, H, W) and split the episode: (items written to memory, items scored).
        Joint (targets = 0): all T items both. Held-out: the first T - n written, the last n scored."""
        if x.dim() != 5 or tuple(x.shape[2:]) != tuple(image_shape):
            raise ValueError(
                f"expected episodes of shape (B, T, {', '.join(map(str, image_shape))}), got {tuple(x.shape)}"
            )
        T = x.shape[1]
        if not 0 <= targets < T:
            raise ValueError(f"held-out targets must be in [1, T - 1] = [1, {T - 1}], got {targets}")
        if targets == 0:
            return slice(0, T), slice(0, T)
        return slice(0, T - targets), slice(T - targets, T)

    def heldout_n(self, T: int) -> int:
        """Targets of the held-out protocol for episodes of length T (0: T too short to split)."""
        if T < 2:
            return 0
        return self.heldout_targets if self.heldout_targets is not None else max(1, T // 4)

    # ---- Lightning wiring -----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = {Optimizer.adam: torch.optim.Adam, Optimizer.rmsprop: torch.optim.RMSprop}[Optimizer(self.cfg.optimizer)]
        return cls(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def on_train_start(self) -> None:
        """The configured learning rate wins over the one restored with the optimiser state, so
        `resume=RUN model.lr=...` (the advice printed when a run diverges) takes effect. On a fresh run the two
        are equal; Adam's moment estimates are kept either way."""
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.cfg.lr

    def kl_weight(self, group: str) -> float:
        """Effective training-loss weight of a KL group ('memory', 'z', 'addressing') at this step."""
        w = self.cfg.kl_weights
        ramp = min(1.0, (self.global_step + 1) / w.warmup_steps) if w.warmup_steps > 0 else 1.0
        return getattr(w, group) * ramp

    def training_loss(self, out: EpisodeOutput) -> torch.Tensor:
        """out.loss (KL weights 1) with each KL part re-weighted by `model.kl_weights`."""
        loss = out.loss
        for k, v in out.parts.items():
            w = self.kl_weight(KL_GROUPS[k])
            if w != 1.0:
                loss = loss - (1.0 - w) * v.mean()
        return loss

    def _log_terms(self, split: str, out: EpisodeOutput, batch_size: int, prefix: str = "") -> None:
        """`{split}/neg_elbo`, `/recon`, `/kl`, `/kl_*` (joint); with prefix 'heldout': `{split}/heldout`,
        `/heldout_recon`, ... (the held-out targets)."""
        terms = {"neg_elbo": out.neg_elbo, "recon": out.recon, "kl": out.kl, **out.parts, **out.extras}
        for k, v in terms.items():
            name = k if not prefix else (prefix if k == "neg_elbo" else f"{prefix}_{k}")
            self.log(
                f"{split}/{name}",
                self.report(v.detach().mean()),
                batch_size=batch_size,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                prog_bar=(name == "neg_elbo"),
            )

    def _log_value(self, name: str, nats: torch.Tensor, batch_size: int) -> None:
        self.log(
            name, self.report(nats.detach().mean()), batch_size=batch_size, on_step=False, on_epoch=True, sync_dist=True
        )

    @staticmethod
    def protocol_values(out: EpisodeOutput) -> dict[str, torch.Tensor]:
        """(B,) per image, from one joint pass: `joint` (every KL) and `memory_conditional` (each item's
        reconstruction and its own KLs: the memory, written from the whole episode, is free)."""
        per_item = out.recon + sum((v for k, v in out.parts.items() if k != "kl_M"), torch.zeros_like(out.recon))
        return {"joint": out.neg_elbo, "memory_conditional": per_item}

    def _log_protocols(self, split: str, x: torch.Tensor, is_samples: int = 0) -> None:
        """The three protocols on one batch of episodes: joint (every item, every KL), memory-conditional
        (the same pass, KL(M) left out) and held-out (memory from the context, the n targets scored)."""
        B, T = x.shape[:2]
        out = self.step_elbo(x)
        self._log_terms(split, out, B)
        self._log_value(f"{split}/memory_conditional", self.protocol_values(out)["memory_conditional"], B)
        n = self.heldout_n(T)
        if n:
            self._log_terms(split, self.step_elbo(x, targets=n), B, prefix="heldout")
        if is_samples > 0:
            self._log_value(f"{split}/nll_is{is_samples}", -self.step_log_likelihood_is(x, is_samples), B)
            if n:
                nll = -self.step_log_likelihood_is(x, is_samples, n)
                self._log_value(f"{split}/heldout_nll_is{is_samples}", nll, B)

    def _diverged(self, what: str) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{what} at epoch {self.current_epoch + 1} (counting from 1), step {self.global_step}"
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["x"]
        try:
            if self._elbo_step is not None and not self._backward_probed:  # a compiled backward that fails: eager
                from km.compiling import probe_backward

                self._backward_probed = True
                probe_backward(self._elbo_step, lambda: self.training_loss(self.step_elbo(x)), list(self.parameters()))
            out = self.step_elbo(x)
            loss = self.training_loss(out)
            if self.cfg.heldout_loss > 0 and self.episodic:  # the few-shot objective, trained directly
                held = self.step_elbo(x, targets=self.heldout_n(x.shape[1]))
                loss = loss + self.cfg.heldout_loss * self.training_loss(held)
                self._log_terms("train", held, x.shape[0], prefix="heldout")
        except NonPositiveDefiniteError as e:  # the memory algebra diverged: the same clean stop as a NaN loss
            raise self._diverged(f"non-finite or non-positive-definite memory ({e})") from None
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at epoch {self.current_epoch + 1} (counting from 1), step {self.global_step}"
            )
        self.log("train/loss", loss.detach(), batch_size=x.shape[0], on_step=True, on_epoch=True)
        self._log_terms("train", out, x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        try:
            self._log_protocols("val", batch["x"])
        except NonPositiveDefiniteError as e:
            raise self._diverged(f"non-finite or non-positive-definite memory in validation ({e})") from None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._log_protocols("test", batch["x"], self.is_samples)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["km_config"] = self.km_config
