"""Seconds per training step of every model on CIFAR-10 against the same model on Omniglot, side by side in one run
(one thread, the cpu_* net sizes, B episodes of T = 20, random data of each shape; best of 3 after a warm-up step).

    python bench/cifar_step.py [--threads 1]

Printed: thread count and load, then per model the Omniglot and CIFAR-10 step (B = 16 and 8) and the ratio. The
cpu_*_cifar configs are sized from it (B = 16: a CIFAR-10 step costs about what the Omniglot step costs).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from km.build import build_model
from km.config import compose_config

PAIRS = [("vae", "vae"), ("km", "km_cifar"), ("pkm", "pkm"), ("dkm", "dkm"), ("kpp_cpu", "kpp_cpu"), ("gpm", "gpm")]


def step_seconds(model: str, shape: tuple[int, int, int], lik: str, B: int, T: int = 20) -> float:
    cfg = compose_config([f"model={model}", "net.channels=[16,32,64]", "net.embed_dim=256"])
    m = build_model(cfg, shape, lik)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, T, *shape, generator=g)
    x = (x * 255).round() / 255 if lik == "logistic" else torch.bernoulli(torch.full_like(x, 0.3), generator=g)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        loss = m.episode_elbo(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':10s} {'omniglot B16':>12s} {'cifar B16':>10s} {'cifar B8':>9s} {'B16 ratio':>9s}")
    for om, cm in PAIRS:
        o = step_seconds(om, (1, 28, 28), "bernoulli", 16)
        c16 = step_seconds(cm, (3, 32, 32), "logistic", 16)
        c8 = step_seconds(cm, (3, 32, 32), "logistic", 8)
        print(f"{om:10s} {o:12.2f} {c16:10.2f} {c8:9.2f} {c16 / o:9.2f}")


if __name__ == "__main__":
    main()
