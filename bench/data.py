"""Episodes/s: in-memory EpisodeLoader + get_batch vs a per-item torch DataLoader (same data, CPU).

Usage: .venv/bin/python bench/data.py [--datasets mnist cifar10] [--rounds 15] [--batches 40] [--threads 1]

Both sides produce the same float32 (B, T, C, H, W) episodes from the same uint8 split.
Baselines: ``DataLoader(batch_size=B*T, shuffle=True, num_workers=0)`` over
  * "per-item": a Dataset whose ``__getitem__`` returns (float image in [0, 1], label), the
    usual pattern (the ratio the project targets, >= 20x);
  * "TensorDataset": ``TensorDataset`` of the uint8 tensors, converted to float per batch
    (a stronger baseline: per-item work is only indexing + collate).
Runs of ``--batches`` batches of the three are interleaved for ``--rounds`` rounds and the best
of each is kept, so load from other processes on a shared machine affects all of them alike.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from datamodules import InMemoryDataModule, build_datamodule  # noqa: E402

B, T = 16, 32


class FloatItems(Dataset):
    """Per-item Dataset: image i as float32 (C, H, W) in [0, 1], and its label."""

    def __init__(self, x: Tensor, y: Tensor, scale: float):
        self.x, self.y, self.scale = x, y, scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i].float() * self.scale, self.y[i]


def timed(run: Callable[[], int]) -> float:
    """Episodes/s of one call of ``run`` (which returns the episodes it produced)."""
    start = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - start)


def in_memory(dm: InMemoryDataModule, n_batches: int) -> Callable[[], int]:
    loader = dm.train_dataloader()

    def run() -> int:
        n = 0
        for batch in itertools.islice(loader, n_batches):
            x = dm.get_batch(batch["split"], batch["idx"])["x"]  # (B, T, C, H, W)
            n += x.shape[0]
        return n

    return run


def torch_dataloader(dm: InMemoryDataModule, n_batches: int, per_item: bool) -> Callable[[], int]:
    scale = 1.0 if dm.likelihood == "bernoulli" else 1 / 255
    x, y = dm.x["train"], dm.y["train"]
    dataset = FloatItems(x, y, scale) if per_item else TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=B * T, shuffle=True, num_workers=0, drop_last=True)

    def run() -> int:
        n = 0
        for images, _ in itertools.islice(loader, n_batches):  # (B*T, C, H, W)
            images = images if per_item else images.float() * scale
            n += images.view(B, T, *dm.image_shape).shape[0]
        return n

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, default=40, help="batches of B episodes per timed run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least sensitive to other load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"B={B} T={T}, CPU, torch {torch.__version__}, {args.threads} thread(s), best of {args.rounds} runs of {args.batches} batches"
    )
    head = f"{'dataset':<9}{'EpisodeLoader':>15}{'per-item DL':>13}{'ratio':>8}{'TensorDataset DL':>18}{'ratio':>8}"
    print(head + "   (episodes/s)")
    for name in args.datasets:
        dm = build_datamodule(name, batch_size=B, episode_length=T)
        dm.setup("fit")
        runs = [
            in_memory(dm, args.batches),
            torch_dataloader(dm, args.batches, per_item=True),
            torch_dataloader(dm, args.batches, per_item=False),
        ]
        best = [0.0] * len(runs)
        for _ in range(args.rounds):
            best = [max(b, timed(run)) for b, run in zip(best, runs, strict=True)]
        ours, per_item, tensor_ds = best
        print(
            f"{name:<9}{ours:>15,.0f}{per_item:>13,.0f}{ours / per_item:>7.1f}x{tensor_ds:>18,.0f}{ours / tensor_ds:>7.1f}x"
        )
    from steps import step_times  # bench/steps.py, beside this script

    t = step_times(["vae"], B=B, T=T)["vae"]
    print(
        f"VAE training step on CPU (default config, B={B} episodes of T={T} MNIST images): "
        f"{1e3 * t:.0f} ms/step = {1e3 * t / B:.1f} ms/episode; the sampler's share: "
        f"{1e3 / ours:.3f} ms/episode ({name})"
    )


if __name__ == "__main__":
    main()
