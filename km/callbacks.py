"""Lightning callbacks and plugins shared by every run.

- `EpochSeed`: reseeds all RNGs at the start of each training epoch from (seed, epoch), so an
  epoch's randomness does not depend on how the run got there: a resumed run replays exactly.
- `SampleGrid`: after each validation epoch, a PNG of episodes, their reconstructions and
  samples from the episode's memory, saved under samples/ and logged to W&B.
- `AtomicCheckpointIO`: checkpoint written to a temp file in the same folder, fsynced, then
  renamed over the old one: a kill during the write leaves the previous checkpoint loadable.
- `MetricsCSV`: the run's metrics.csv as a Lightning logger, continued across resumes.
- `ProgressLines`: without a progress bar, a line every 30 s (step, loss, rate, ETA), training and test.
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
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from km.runs import append_metrics


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
        from km.memory import NonPositiveDefiniteError
        from km.pictures import addressing_heatmap
        from km.runs import NonFiniteLossError

        path = self.out_dir / f"epoch_{trainer.current_epoch:03d}.png"
        from km.pictures import picture_title

        when = f"epoch {trainer.current_epoch + 1}, step {trainer.global_step} (validation episodes)"
        title = picture_title(pl_module, self.out_dir.parent, when)
        try:  # the pictures write and sample memories too: a diverged memory is the same clean stop as a NaN loss
            save_grid(pl_module, self.batch, path, self.columns, title=title)
            heat = addressing_heatmap(
                pl_module, self.batch, self.out_dir / f"addressing_{trainer.current_epoch:03d}.png"
            )
        except NonPositiveDefiniteError as e:
            raise NonFiniteLossError(
                f"non-finite or non-positive-definite memory while drawing the samples of epoch "
                f"{trainer.current_epoch + 1} (counting from 1), step {trainer.global_step} ({e})"
            ) from None
        self.last_path = path
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(
                    key="samples",
                    images=[str(path)],
                    caption=["per episode: data / reconstruction from memory / samples from memory"],
                )
                if heat:
                    lg.log_image(key="addressing", images=[str(heat)], caption=["addressing weights (T x K)"])


@torch.no_grad()
def save_grid(model: Any, x: torch.Tensor, path: Path, columns: int = 16, title: str | None = None) -> Path:
    """x: (E, T, C, H, W) validation episodes -> a labelled PNG with 3 rows per episode: the data, its
    reconstruction (read from the memory the episode was written to), samples from that memory (a model
    without a memory, the VAE: plain reconstructions and samples from the prior)."""
    from km.pictures import labelled_grid

    was_training = model.training
    model.eval()
    x = x[:, :columns]
    e, t = x.shape[:2]
    memory = model.write(x)
    recon = model.lik.mean(model.read(x, memory).flatten(0, 1)).view_as(x)
    samples = model.generate(memory, t, batch=e)  # (E, T, C, H, W)
    has = memory is not None
    rows = []
    for i in range(e):
        rows += [
            (f"episode {i + 1}: data", x[i]),
            (f"episode {i + 1}: " + ("reconstruction from its memory" if has else "reconstruction"), recon[i]),
            (f"episode {i + 1}: " + ("samples from its memory" if has else "samples from the prior"), samples[i]),
        ]
    labelled_grid(rows, title or "validation episodes", path)
    model.train(was_training)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        from km.runs import RunError, atomic_write, free_bytes

        try:
            atomic_write(Path(path), lambda f: torch.save(checkpoint, f), fsync=True)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            free = free_bytes(Path(path).parent)
            raise RunError(
                f"cannot write checkpoint {path}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:120]}"
                f" ({free / 2**20:.0f} MiB free there); free space, then resume"
            ) from None


class MetricsCSV(Logger):
    """The run's metrics.csv through Lightning's public Logger interface (`km.runs.append_metrics` writes it):
    continued across resumes, where Lightning's CSVLogger would start the file anew."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self._rows: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "metrics.csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # config.yaml holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self._rows.append({**row, "step": step if step is not None else len(self._rows)})

    @rank_zero_only
    def save(self) -> None:
        rows, self._rows = self._rows, []
        append_metrics(self.run_dir, rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class RichEpochBar(RichProgressBar):
    """Lightning's rich bar with epochs numbered from 1, as every other line km prints them ("Epoch 1/10"
    where Lightning writes "Epoch 0/9"). Public hooks and attributes only: the training task's description is
    updated after Lightning sets its own."""

    def describe(self, trainer: pl.Trainer) -> str:
        text = f"Epoch {trainer.current_epoch + 1}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            text += f"/{trainer.max_epochs}"
        return f"[{self.theme.description}]{text}" if self.theme.description else text

    def _renumber(self, trainer: pl.Trainer) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self.describe(trainer))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._renumber(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kw: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kw)
        self._renumber(trainer)  # the bar is re-created after each validation with Lightning's description


class ProgressLines(pl.Callback):
    """Progress where no progress bar can be drawn (a log file, a batch job): a line every `interval` seconds
    with the step, the loss, the rate and the time left, in training and in test passes. Epochs are counted
    from 1 in every line a user reads (file names keep Lightning's 0-based `epochNNN`)."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._t0 = self._last = 0.0
        self._done0 = 0

    def _start(self, done: int) -> None:
        self._t0 = self._last = time.time()
        self._done0 = done

    def _line(self, done: int, total: int, what: str, extra: str = "") -> None:
        now = time.time()
        if now - self._last < self.interval or total <= 0:
            return
        self._last = now
        rate = (done - self._done0) / max(now - self._t0, 1e-9)
        eta = _duration((total - done) / rate) if rate > 0 else "?"
        print(f"{what} {done}/{total}{extra} | {rate:.2f}/s | ETA {eta}", file=sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.num_training_batches * trainer.max_epochs
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        extra = f" (epoch {trainer.current_epoch + 1}/{trainer.max_epochs})" + (
            f" | loss {float(loss):.3f}" if loss is not None else ""
        )
        self._line(trainer.global_step, int(total), "step", extra)

    def on_test_start(self, trainer, pl_module) -> None:
        self._start(0)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = trainer.num_test_batches[dataloader_idx] if trainer.num_test_batches else 0
        self._line(batch_idx + 1, int(total), "test batch")


class EpochSummary(pl.Callback):
    KEYS = ("train/loss", "val/neg_elbo", "val/recon", "val/kl")

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"{k} {m[k].item():.3f}" for k in self.KEYS if k in m]
        print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} | "
            + " | ".join(parts)
            + f" | {time.time() - self.t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        self.t0 = time.time()


STOP_AT_ENV = "KM_STOP_AT"


class StopAt(pl.Callback):
    """Stop training cleanly at an epoch end before a wall-clock deadline (`KM_STOP_AT`: unix seconds), so a
    time-sliced job (`km campaign`) ends its slice with a checkpoint of its last epoch and nothing half done.

    After each epoch (validation included) it predicts the next epoch's end from the longest epoch so far, with
    a `margin` (1.2: epochs vary by up to 15% on a loaded machine), and stops when that would pass the deadline.
    The stop happens before the epoch's checkpoints are written (Lightning runs checkpoint callbacks last), so
    `last.ckpt` holds the epoch just finished: resuming continues as after a kill at that epoch end, exactly.
    The deadline is an environment variable, not a config key: it belongs to one slice, and a run resumed by
    hand later must not inherit it from config.yaml."""

    def __init__(self, deadline: float | None, margin: float = 1.2, clock: Any = time.time) -> None:
        self.deadline = deadline
        self.margin = margin
        self.clock = clock
        self.longest = 0.0
        self.stopped_after_epoch: int | None = None  # 1-based epoch after which the slice stopped
        self._t0: float | None = None

    @classmethod
    def from_env(cls) -> StopAt:
        import os

        v = os.environ.get(STOP_AT_ENV)
        return cls(float(v) if v else None)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self.clock()

    def should_stop(self, now: float, epoch_s: float) -> bool:
        self.longest = max(self.longest, epoch_s)
        return self.deadline is not None and now + self.margin * self.longest > self.deadline

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is None:
            return
        now = self.clock()
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if self.should_stop(now, now - self._t0) and not last_epoch:
            trainer.should_stop = True
            self.stopped_after_epoch = trainer.current_epoch + 1


from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint  # noqa: E402


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint whose saved state follows a moved or copied run. Lightning keeps the
    checkpoint folder's absolute path in the state and, when a resumed run's folder differs, drops the best
    score and the top-k record with a warning ("The dirpath has changed"): the moved run would then forget
    which epoch was best. Here the saved paths are re-rooted to this run's folder (by file name) before
    Lightning loads them, through the public `load_state_dict` hook. The class keeps Lightning's name, so the
    callback's state key (made from the class name) reads the checkpoints of earlier runs."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:

            def here(p: Any) -> Any:
                return str(Path(self.dirpath) / Path(p).name) if p else p

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": here(state_dict.get("best_model_path")),
                "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                "last_model_path": here(state_dict.get("last_model_path")),
                "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)
