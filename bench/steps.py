"""Timing helpers shared by the bench scripts: interleaved medians, model training-step times.

Run as a script, it measures the shared conv nets in NCHW against channels_last (NHWC), side by side:
    python bench/steps.py [--repeats N] [--threads N] [--models vae km ...]
"""

from __future__ import annotations

import argparse
import os
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


def step_times(
    names: list[str],
    B: int = 16,
    T: int = 32,
    repeats: int = 7,
    shape: tuple[int, int, int] = (1, 28, 28),
    nets: dict[str, NetConfig] | None = None,
) -> dict[str, float]:
    """Median seconds per optimiser step (forward + backward + Adam) of each model, default configs,
    timed interleaved so machine load affects every model alike. ``nets``: a NetConfig per name
    (default NetConfig()); a name may carry a suffix after '/' (e.g. 'vae/nchw') to time variants."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((B, T, *shape), 0.2))
    steps = {}
    for name in names:
        cls, cfg_cls = MODELS[name.split("/")[0]]
        model = cls(cfg_cls(), (nets or {}).get(name, NetConfig()), shape, "bernoulli")
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad()
            model.episode_elbo(x).loss.backward()
            opt.step()

        steps[name] = step
    return median_times(steps, repeats)


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--models", nargs="+", default=["vae", "km", "dkm"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = Table(
        title=f"training step, shared nets NCHW vs channels_last, B=16, T=32, {torch.get_num_threads()} "
        f"thread(s), median of {args.repeats}"
    )
    for col in ("model", "image", "load", "NCHW (ms)", "channels_last (ms)", "NCHW / channels_last"):
        table.add_column(col, justify="right")
    for shape in ((1, 28, 28), (3, 32, 32)):
        for name in args.models:
            load = os.getloadavg()[0]
            nets = {f"{name}/nchw": NetConfig(channels_last=False), f"{name}/nhwc": NetConfig(channels_last=True)}
            t = step_times(list(nets), repeats=args.repeats, shape=shape, nets=nets)
            a, b = t[f"{name}/nchw"], t[f"{name}/nhwc"]
            table.add_row(
                name, "x".join(map(str, shape)), f"{load:.2f}", f"{1e3 * a:.0f}", f"{1e3 * b:.0f}", f"{a / b:.2f}"
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
