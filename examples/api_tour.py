"""A tour of the Python API (km/api.py): train a small Kanerva Machine, load it back, write an episode to its
memory, read it back, sample from that memory and from the prior, save a labelled picture, and evaluate.

    python examples/api_tour.py                      # about a minute on one core (experiment=debug, KM)
    python examples/api_tour.py runs_dir=/tmp/tour   # any override of km train

The test suite runs this script on a tiny model (tests/test_api.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import km

overrides = ["experiment=debug", "model=km", *sys.argv[1:]]
run = km.fit(km.compose(*overrides), overrides)  # trains (or resumes) and loads the run
print(f"run {run.run_dir}: {run.config.model.name} on {run.config.data.name}, checkpoint {run.checkpoint.name}")

x = run.episodes(2)  # (2, T, C, H, W): the first two fixed test episodes
memory = run.write(x)  # q(M | X): mean R (B, K, C) and row covariance U (B, K, K)
print(f"memory: R {tuple(memory.R.shape)}, U {tuple(memory.U.shape)}")
recon = run.read(x, memory)  # one read of the stored items
err = (recon - x).abs().mean().item()
prior_err = (run.read(x, None) - x).abs().mean().item()  # the same read from the prior memory
print(f"L1 error of a read: {err:.4f} from the written memory, {prior_err:.4f} from the prior memory")
samples = run.sample(memory, 8)  # (2, 8, C, H, W) one-shot samples from each episode's memory
prior = run.sample(None, 8, batch=1)  # from the prior memory

from km.pictures import labelled_grid  # noqa: E402 - after the tour's own steps, for the picture

path = labelled_grid(
    [
        ("episode 1 (written)", x[0, :8]),
        ("read back from its memory", recon[0, :8]),
        ("samples from its memory", samples[0]),
        ("samples from the prior memory", prior[0]),
    ],
    f"api tour: {run.config.model.name}, run {run.run_dir.name}",
    Path(run.run_dir) / "api_tour.png",
)
print(f"picture: {path}")
metrics = run.evaluate(is_samples=0)["metrics"]
print(f"test/neg_elbo {metrics['test/neg_elbo']:.2f}, test/heldout {metrics['test/heldout']:.2f} nats/image")
