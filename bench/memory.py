"""Benchmarks for the Kanerva Machine memory (timings only, no asserts).

Run:  python bench/memory.py [--section NAME]... [--repeats N] [--threads N]
Each section is a ``bench_*`` function registered in ``SECTIONS``; add new sections there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from rich.console import Console
from rich.table import Table
from steps import median_times  # bench/steps.py, beside this script

from km.memory import MemoryState, solve_addresses, write_batched, write_online
from km.memory.block import BlockMemoryWriter, key_to_theta, read_windows
from km.memory.product import weighted_write
from km.models import MODELS

console = Console()


def bench_memory_write(repeats: int) -> None:
    """Batched vs on-line write (forward, no grad), float32, B = 16, C = 100, timed interleaved."""
    B, C, sigma_xi2 = 16, 100, 1.0
    table = Table(title=f"memory write: B={B}, C={C}, float32, {torch.get_num_threads()} threads, median of {repeats}")
    for col in ("T", "K", "batched (ms)", "online (ms)", "speed-up"):
        table.add_column(col, justify="right")
    gen = torch.Generator().manual_seed(0)
    for T in (8, 32, 64, 128):
        for K in (32, 64, 256):
            state = MemoryState(torch.randn(B, K, C, generator=gen), torch.eye(K).expand(B, K, K))
            w = torch.nn.functional.normalize(torch.randn(B, T, K, generator=gen), dim=-1)  # (B, T, K)
            z = torch.randn(B, T, C, generator=gen)  # (B, T, C)
            with torch.no_grad():
                t = median_times(
                    {
                        "batched": partial(write_batched, state, w, z, sigma_xi2),
                        "online": partial(write_online, state, w, z, sigma_xi2),
                    },
                    repeats,
                )
            table.add_row(
                str(T),
                str(K),
                f"{1e3 * t['batched']:.2f}",
                f"{1e3 * t['online']:.2f}",
                f"{t['online'] / t['batched']:.1f}x",
            )
    console.print(table)


def bench_dkm_memory(repeats: int) -> None:
    """DKM addressing: least-squares solve (ridge, official) and solve + batched write, against the KM
    write alone at the same sizes; forward, no grad, float32, B = 16, C = 100."""
    B, C, lam = 16, 100, 1.0
    table = Table(title=f"DKM solve + write: B={B}, C={C}, float32, {torch.get_num_threads()} threads, "
                        f"median of {repeats}")
    for col in ("T", "K", "ridge solve (ms)", "official solve (ms)", "solve + write (ms)", "KM write (ms)"):
        table.add_column(col, justify="right")
    gen = torch.Generator().manual_seed(0)
    for T, K in ((32, 32), (64, 32), (32, 64), (64, 64)):
        state = MemoryState(torch.randn(B, K, C, generator=gen), torch.eye(K).expand(B, K, K))
        z = torch.randn(B, T, C, generator=gen)  # (B, T, C)
        w = torch.nn.functional.normalize(torch.randn(B, T, K, generator=gen), dim=-1)

        def solve_write(state=state, z=z) -> None:
            write_batched(state, solve_addresses(state.R, z, lam), z, 1.0)

        with torch.no_grad():
            t = median_times(
                {
                    "ridge": partial(solve_addresses, state.R, z, lam, "ridge"),
                    "official": partial(solve_addresses, state.R, z, lam, "official"),
                    "solve_write": solve_write,
                    "km_write": partial(write_batched, state, w, z, 1.0),
                },
                repeats,
            )
        table.add_row(str(T), str(K), *(f"{1e3 * t[k]:.2f}" for k in ("ridge", "official", "solve_write", "km_write")))
    console.print(table)


def bench_pkm_memory(repeats: int) -> None:
    """PKM: weighted write and combined read of P machines at a fixed total K = 64 (K_p = K / P), against
    one KM memory of the same total size; forward, no grad, float32, B = 16, T = 32, C = 100."""
    B, T, K, C = 16, 32, 64, 100
    table = Table(title=f"PKM write/read at total K={K}: B={B}, T={T}, C={C}, float32, "
                        f"{torch.get_num_threads()} threads, median of {repeats}")
    for col in ("P", "K_p", "write (ms)", "read (ms)", "write / KM write"):
        table.add_column(col, justify="right")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, C, generator=gen)
    km_state = MemoryState(torch.randn(B, K, C, generator=gen), torch.eye(K).expand(B, K, K))
    km_w = torch.nn.functional.normalize(torch.randn(B, T, K, generator=gen), dim=-1)
    for P in (1, 2, 4, 8, 16):
        Kp = K // P
        state = MemoryState(torch.randn(B, P, Kp, C, generator=gen), torch.eye(Kp).expand(B, P, Kp, Kp))
        w = torch.nn.functional.normalize(torch.randn(B, P, T, Kp, generator=gen), dim=-1)
        pi = torch.randn(B, T, P, generator=gen).softmax(-1)

        def read(state=state, w=w, pi=pi) -> None:
            torch.einsum("btp,bptc->btc", pi, w @ state.R)

        with torch.no_grad():
            t = median_times({"write": partial(weighted_write, state, w, z, pi, 1.0), "read": read,
                              "km": partial(write_batched, km_state, km_w, z, 1.0)}, repeats)
        table.add_row(str(P), str(Kp), f"{1e3 * t['write']:.2f}", f"{1e3 * t['read']:.3f}", f"{t['write'] / t['km']:.2f}")
    console.print(table)


def bench_kpp_memory(repeats: int) -> None:
    """K++: the episode writer and the window reads (T keys per episode), kpp_cpu sizes and the authors'
    sizes; forward, no grad, float32, B = 16, T = 32, E = 256."""
    B, T, E = 16, 32, 256
    table = Table(title=f"K++ write/read: B={B}, T={T}, float32, {torch.get_num_threads()} threads, median of {repeats}")
    for col in ("memory (C_m x S x S)", "window", "write (ms)", "one read of T windows (ms)"):
        table.add_column(col, justify="right")
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(B, T, E, generator=gen)
    for C_m, S, w in ((8, 16, 8), (8, 32, 16), (8, 128, 32)):
        writer = BlockMemoryWriter(E, C_m, S)
        M = torch.randn(B, C_m, S, S, generator=gen)
        Y = torch.randn(B, T, 3, generator=gen)
        with torch.no_grad():
            t = median_times({"write": partial(writer, e),
                              "read": lambda M=M, Y=Y, w=w, S=S: read_windows(M, key_to_theta(Y, w, S), w)}, repeats)
        table.add_row(f"{C_m} x {S} x {S}", f"{w} x {w}", f"{1e3 * t['write']:.2f}", f"{1e3 * t['read']:.2f}")
    console.print(table)


def bench_model_step(repeats: int) -> None:
    """Training-step time of every registered model vs the VAE, B = 16 episodes of T = 32 MNIST-sized images."""
    from steps import step_times

    B, T = 16, 32
    names = ["vae"] + sorted(n for n in MODELS if n != "vae")
    t = step_times(names, B=B, T=T, repeats=repeats)
    table = Table(title=f"training step (fwd + bwd + Adam), default configs, B={B}, T={T}, 28x28, "
                        f"{torch.get_num_threads()} threads, median of {repeats}")
    for col in ("model", "ms / step", "ms / episode", "x VAE"):
        table.add_column(col, justify="right")
    for n in names:
        table.add_row(n, f"{1e3 * t[n]:.1f}", f"{1e3 * t[n] / B:.2f}", f"{t[n] / t['vae']:.2f}")
    console.print(table)


SECTIONS: dict[str, Callable[[int], None]] = {
    "memory_write": bench_memory_write,
    "dkm_memory": bench_dkm_memory,
    "pkm_memory": bench_pkm_memory,
    "kpp_memory": bench_kpp_memory,
    "model_step": bench_model_step,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append", help="repeatable; default: all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.section or list(SECTIONS):
        SECTIONS[name](args.repeats)


if __name__ == "__main__":
    main()
