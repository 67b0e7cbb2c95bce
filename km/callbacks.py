"""Lightning callbacks and plugins shared by every run.

- `EpochSeed`: reseeds all RNGs at the start of each training epoch from (seed, epoch), so an
  epoch's randomness does not depend on how the run got there: a resumed run replays exactly.
- `SampleGrid`: after each validation epoch, a PNG of episodes, their reconstructions and
  samples from the episode's memory, saved under samples/ and logged to W&B.
- `AtomicCheckpointIO`: checkpoint written to a temp file in the same folder, fsynced, then
  renamed over the old one: a kill during the write leaves the previous checkpoint loadable.
- `EpochSummary`: one plain line per epoch when no progress bar is shown (CI logs, pipes).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torchvision.utils import make_grid, save_image


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**31 - 1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class EpochSeed(pl.Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_all(epoch_seed(self.seed + trainer.global_rank * 1_000_000, trainer.current_epoch))


class SampleGrid(pl.Callback):
    """Rows: episode, its reconstruction from memory, samples from that memory (per episode)."""

    def __init__(self, out_dir: Path, episodes: int = 2, columns: int = 16):
        self.out_dir = Path(out_dir)
        self.episodes, self.columns = episodes, columns
        self.batch: torch.Tensor | None = None
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self.batch is None:
            self.batch = batch["x"][: self.episodes].detach()

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.batch is None or not trainer.is_global_zero:
            return
        path = self.out_dir / f"epoch_{trainer.current_epoch:03d}.png"
        save_grid(pl_module, self.batch, path, self.columns)
        self.last_path = path
        from km.pictures import addressing_heatmap

        heat = addressing_heatmap(pl_module, self.batch, self.out_dir / f"addressing_{trainer.current_epoch:03d}.png")
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key="samples", images=[str(path)], caption=[
                    "per episode: data / reconstruction from memory / samples from memory"])
                if heat:
                    lg.log_image(key="addressing", images=[str(heat)], caption=["addressing weights (T x K)"])


@torch.no_grad()
def save_grid(model: Any, x: torch.Tensor, path: Path, columns: int = 16) -> Path:
    """x: (E, T, C, H, W) episodes -> PNG with 3 rows per episode (data, recon, samples)."""
    was_training = model.training
    model.eval()
    x = x[:, :columns]
    e, t = x.shape[:2]
    memory = model.write(x)
    recon = model.lik.mean(model.read(x, memory).flatten(0, 1)).view_as(x)
    samples = model.generate(memory, t, batch=e)  # (E, T, C, H, W)
    rows = torch.stack([x, recon, samples], dim=1).flatten(0, 2)  # (E*3*T, C, H, W)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(rows.float().cpu(), nrow=t, padding=2, pad_value=0.5), path)
    model.train(was_training)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        from km.runs import RunError, atomic_write, free_bytes

        try:
            atomic_write(Path(path), lambda f: torch.save(checkpoint, f), fsync=True)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            free = free_bytes(Path(path).parent)
            raise RunError(f"cannot write checkpoint {path}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:120]}"
                           f" ({free / 2**20:.0f} MiB free there); free space, then resume") from None


class EpochSummary(pl.Callback):
    KEYS = ("train/loss", "val/neg_elbo", "val/recon", "val/kl")

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"{k} {m[k].item():.3f}" for k in self.KEYS if k in m]
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} | " + " | ".join(parts)
              + f" | {time.time() - self.t0:.1f} s", file=sys.stderr, flush=True)
        self.t0 = time.time()
