"""Timing helpers shared by the bench scripts: interleaved medians, model training-step times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from km.models import MODELS
from km.nets import NetConfig


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time (s) of each ``fn()``; the functions run interleaved, so load affects all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def step_times(names: list[str], B: int = 16, T: int = 32, repeats: int = 7,
               shape: tuple[int, int, int] = (1, 28, 28)) -> dict[str, float]:
    """Median seconds per optimiser step (forward + backward + Adam) of each model, default configs,
    timed interleaved so machine load affects every model alike."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((B, T, *shape), 0.2))
    steps = {}
    for name in names:
        cls, cfg_cls = MODELS[name]
        model = cls(cfg_cls(), NetConfig(), shape, "bernoulli")
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad()
            model.episode_elbo(x).loss.backward()
            opt.step()

        steps[name] = step
    return median_times(steps, repeats)
