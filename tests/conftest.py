"""Shared fixtures: the real data directory and a tiny, fast run configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _data_dir() -> Path | None:
    if os.environ.get("KM_DATA_DIR"):
        return Path(os.environ["KM_DATA_DIR"])
    p = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return p if p.is_dir() else None


DATA_DIR = _data_dir()
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="real data not found: set KM_DATA_DIR (CI always does)")


def tiny(tmp_path: Path, *extra: str, model: str = "vae", data: str = "mnist") -> list[str]:
    """Overrides for a run that takes a few seconds on 2 CPU cores."""
    return [
        f"model={model}",
        f"data={data}",
        "logger=csv",
        f"runs_dir={tmp_path / 'runs'}",
        f"data.data_dir={DATA_DIR}",
        "data.episode_length=8",
        "data.batch_size=4",
        "data.train_episodes_per_epoch=32",
        "data.val_episodes=16",
        "data.test_episodes=16",
        "net.channels=[8,16,16]",
        "net.embed_dim=32",
        "model.code_dim=16",
        "trainer.max_epochs=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=2",
        "trainer.progress_bar=none",
        "eval.is_samples=4",
        "seed=3",
        *extra,
    ]


def learning_run(tmp_path: Path, model: str, *extra: str, epochs: int = 3) -> list[str]:
    """Overrides of the shared "does it learn on real MNIST" runs: nets, memory and data a little larger than
    `tiny`, T = 16, 8 episodes a batch, 32 steps an epoch, lr 2e-3 (`extra` goes last and wins)."""
    return tiny(
        tmp_path,
        "net.channels=[8,16,32]",
        "net.embed_dim=64",
        "model.code_dim=32",
        "data.episode_length=16",
        "data.train_episodes_per_epoch=256",
        "data.batch_size=8",
        f"trainer.max_epochs={epochs}",
        "model.lr=2e-3",
        "eval.is_samples=2",
        *extra,
        model=model,
    )


@pytest.fixture(autouse=True)
def _thread_count_kept():
    """A test that leaves torch's thread count changed fails here (and the count is put back): later in-process
    runs would compute with other threads than the subprocesses they are compared with, and the bit-exact
    resume tests then differ in the last bits (CI at stop 34: bench/context_oracle.py set 1 thread for good)."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test left torch's thread count at {after} (it was {before})")


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def train_in_parallel(jobs: dict[str, list[str]], at_once: int = 2) -> None:
    """Run `km train` for each {name: overrides}, `at_once` subprocesses at a time with one thread each:
    each run is then deterministic whatever the machine's core count, and 2 cores run two at once."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    names = list(jobs)
    for group in (names[i : i + at_once] for i in range(0, len(names), at_once)):
        procs = [
            (
                n,
                subprocess.Popen(
                    [sys.executable, "-m", "km.cli", "train", *jobs[n], "trainer.num_threads=1"],
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                ),
            )
            for n in group
        ]
        for n, proc in procs:
            out = proc.communicate()[0]
            assert proc.returncode == 0, f"training {n} failed:\n{out[-3000:]}"


def binary_episodes(b: int = 2, t: int = 4, seed_base: int = 100, shape=(1, 28, 28)):
    """(b, t, *shape) Bernoulli(0.3) episodes, the same for the same (b, t): seed b * seed_base + t."""
    import torch

    return torch.bernoulli(torch.full((b, t, *shape), 0.3), generator=torch.Generator().manual_seed(b * seed_base + t))


def assert_is_estimate_consistent_with_bound(model, x, n: int = 1000, seed: int = 2) -> None:
    """E_q[ln w] with one importance sample equals the ELBO (the IS weights use the bound's densities),
    and 100 samples give a tighter (higher) estimate than the bound's mean."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        xs = x.repeat(n, 1, 1, 1, 1)  # n independent draws of the same episodes
        elbo = -model.episode_elbo(xs).neg_elbo.view(n, -1)
        is1 = model.log_likelihood_is(xs, 1).view(n, -1)
        se = (elbo.var(0) / n + is1.var(0) / n).sqrt()
        assert ((elbo.mean(0) - is1.mean(0)).abs() < 4 * se + 1e-3).all(), (elbo.mean(0), is1.mean(0), se)
        assert (model.log_likelihood_is(x, 100) > elbo.mean(0)).all()


def png_text(path) -> dict[str, str]:
    """The text chunks (Title, Description, ...) of a PNG, the file closed again."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return dict(im.text)
