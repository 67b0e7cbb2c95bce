"""The Python API: compose a config, train it, load a run, evaluate it, write an episode to its memory, read
from that memory and sample from it, in a notebook or a script, with the same code the `km` commands run.

    import km
    cfg = km.compose("experiment=debug", "model=km")     # a typed config (Hydra overrides, as on the CLI)
    run = km.fit(cfg)                                   # trains (or resumes) and returns the loaded Run
    run = km.load("runs/debug/<id>")                    # or any run directory / checkpoint
    x = run.episodes(4)                                 # (4, T, C, H, W) fixed test episodes
    memory = run.write(x)                               # q(M | X) (None for the VAE: it has no memory)
    recon = run.read(x, memory)                         # mean images read back from that memory
    new = run.sample(memory, 16)                        # (4, 16, C, H, W) one-shot samples from it
    metrics = run.evaluate(is_samples=20)["metrics"]    # the three protocols (writes eval.json)

Decision: one small object (`Run`) over the pieces the commands already use (`km.evaluate.load_run`, the
model's `write / read / generate` interface, `km.train.train`), rather than a second model API: what a
notebook computes is what `km eval` and `km sample` compute. `examples/api_tour.py` runs it end to end and
the suite runs that script on a tiny model (tests/test_api.py). `fit`, not `train`: `km.train` is the module
that holds the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

__all__ = ["Run", "compose", "load", "fit"]


@dataclass
class Run:
    """A trained run: its directory, checkpoint, resolved config, model (weights loaded, eval mode) and data."""

    run_dir: Path
    checkpoint: Path
    config: DictConfig
    model: Any  # km.models.base.EpisodeModel
    data: Any  # the run's LightningDataModule (loaded)

    @property
    def has_memory(self) -> bool:
        return bool(self.model.episodic)

    def episodes(self, n: int = 4, split: str = "test") -> torch.Tensor:
        """The first n fixed episodes (n, T, C, H, W) of `split` (test or val), as `km sample` takes them."""
        self.data.setup("test" if split == "test" else "fit")
        loader = self.data.episodes(split)
        idx = torch.cat([b for b in loader.eval_batches()])[:n]  # (n, T)
        return self.data.get_batch(split, idx)["x"]

    @torch.no_grad()
    def write(self, x: torch.Tensor) -> Any:
        """q(M | X) after writing episodes x (B, T, C, H, W); None for a model without a memory."""
        return self.model.write(x)

    @torch.no_grad()
    def read(self, x: torch.Tensor, memory: Any = None) -> torch.Tensor:
        """Mean images (B, T, C, H, W) of one read of x from `memory` (None: the prior memory)."""
        return self.model.mean_image(self.model.read(x, memory))

    @torch.no_grad()
    def sample(self, memory: Any = None, n: int = 16, batch: int = 1) -> torch.Tensor:
        """One-shot samples (B, n, C, H, W) from `memory` (None: from the prior, `batch` episodes)."""
        return self.model.generate(memory, n, batch=batch)

    def evaluate(self, split: str = "test", is_samples: int | None = None) -> dict[str, Any]:
        """The three protocols on `split` (km eval; writes eval.json / eval_val.json): {'metrics': ...}."""
        from km.evaluate import evaluate

        return evaluate(self.run_dir, split=split, is_samples=is_samples, dm=self.data)


def compose(*overrides: str) -> DictConfig:
    """The typed config of configs/config.yaml with Hydra overrides, exactly as `km train` composes it."""
    from km.config import compose_config

    return compose_config(list(overrides))


def load(target: str | Path, *overrides: str, map_location: str = "cpu") -> Run:
    """A run directory or checkpoint (its best checkpoint, as km eval picks it) -> Run; `overrides` change
    evaluation-side values (eval.is_samples=..., data.data_dir=...)."""
    from km.evaluate import load_run

    cfg, run_dir, ckpt, dm, model = load_run(target, list(overrides), map_location=map_location)
    model.eval()
    return Run(Path(run_dir), Path(ckpt), cfg, model, dm)


def fit(cfg: DictConfig | list[str] | tuple[str, ...], overrides: list[str] | None = None) -> Run:
    """Train (or resume) a run from a composed config or a list of overrides, then load it. A paused run
    (KM_STOP_AT) loads its last checkpoint."""
    from km.train import train as run_training

    if not isinstance(cfg, DictConfig):
        overrides = list(cfg)
        cfg = compose(*overrides)
    summary = run_training(cfg, overrides)
    return load(summary["run_dir"])
