"""Training-step time of registered models on the same synthetic episodes (shared by the bench scripts)."""

from __future__ import annotations

import statistics
import time

import torch

from km.models import MODELS
from km.nets import NetConfig


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
    for fn in steps.values():
        fn()
        fn()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(repeats):
        for n, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}
