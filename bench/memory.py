"""Benchmarks for the Kanerva Machine memory (timings only, no asserts).

Run:  python bench/memory.py [--section NAME]... [--repeats N] [--threads N]
Each section is a ``bench_*`` function registered in ``SECTIONS``; add new sections there. Every table
title states the thread count and the machine's load (1-minute average) when it started.

The reference path (``reference_write``, ``reference_write_with_kl``, ``ReferenceMemory``) is the memory
algebra before issue #19, kept here and only here so the new one is measured against it side by side:
one T x T ``cholesky_solve`` write whatever the shape, then ``kl_matrix_normal`` (two more Cholesky factors
and a K x (K + C) triangular solve), and the per-step KL with ``log1p(-beta)``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial

import torch
from rich.console import Console
from rich.table import Table
from steps import median_times  # bench/steps.py, beside this script

from km.memory import (
    KanervaMemory,
    MemoryState,
    kl_matrix_normal,
    safe_cholesky,
    solve_addresses,
    write_batched,
    write_online,
    write_with_kl,
)
from km.memory.block import BlockMemoryWriter, key_to_theta, read_windows
from km.memory.kanerva import DEFAULT_U_DIAG_CLIP, _symmetrise_and_clip
from km.memory.product import weighted_write
from km.models import MODELS
from km.nets import NetConfig

console = Console(width=160)


def where() -> str:
    """'N threads, load L' for table titles."""
    return f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}"


# ---- the reference path: the library's memory algebra before issue #19 -------------------------------
def reference_write(state: MemoryState, w: torch.Tensor, z: torch.Tensor, sigma_xi2, u_diag_clip=DEFAULT_U_DIAG_CLIP):
    """The old ``write_batched``: the T x T predictive form with ``cholesky_solve``, whatever T and K."""
    R, U = state  # (B, K, C), (B, K, K)
    T = w.shape[-2]
    Delta = z - w @ R  # (B, T, C)
    Sigma_c = w @ U  # (B, T, K)
    noise = (
        torch.diag_embed(sigma_xi2)
        if isinstance(sigma_xi2, torch.Tensor) and sigma_xi2.dim() > 0
        else (sigma_xi2 * torch.eye(T, dtype=U.dtype, device=U.device))
    )
    Sigma_z = Sigma_c @ w.transpose(-1, -2) + noise  # (B, T, T)
    G = torch.cholesky_solve(Sigma_c, safe_cholesky(Sigma_z))  # (B, T, K)
    return MemoryState(
        R + G.transpose(-1, -2) @ Delta, _symmetrise_and_clip(U - Sigma_c.transpose(-1, -2) @ G, u_diag_clip)
    )


def reference_write_with_kl(prior: MemoryState, w, z, sigma_xi2):
    post = reference_write(prior, w, z, sigma_xi2)
    return post, kl_matrix_normal(post, prior)


def reference_step_kl(w_t, U, sigma_xi2, Delta, C):
    """The old per-step KL term: -1/2 [C beta - beta / s ||Delta||^2 + C log1p(-beta)]."""
    wUw = torch.einsum("...k,...kl,...l->...", w_t, U, w_t)
    s = wUw + sigma_xi2
    beta = wUw / s
    return -0.5 * (C * beta - beta / s * Delta.pow(2).sum(-1) + C * torch.log1p(-beta))


class ReferenceMemory(KanervaMemory):
    """A ``KanervaMemory`` whose ``write_with_kl`` is the reference path (swap ``model.memory.__class__``)."""

    def write_with_kl(self, w, z, mode="batched"):
        prior = self.prior(w.shape[0])
        return reference_write_with_kl(prior, w, z, self.sigma_xi2)


def bench_memory_write(repeats: int) -> None:
    """Batched vs on-line write (forward, no grad), float32, B = 16, C = 100, timed interleaved."""
    B, C, sigma_xi2 = 16, 100, 1.0
    table = Table(title=f"memory write: B={B}, C={C}, float32, {where()}, median of {repeats}")
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
    table = Table(title=f"DKM solve + write: B={B}, C={C}, float32, {where()}, median of {repeats}")
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
    table = Table(title=f"PKM write/read at total K={K}: B={B}, T={T}, C={C}, float32, {where()}, median of {repeats}")
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
            t = median_times(
                {
                    "write": partial(weighted_write, state, w, z, pi, 1.0),
                    "read": read,
                    "km": partial(write_batched, km_state, km_w, z, 1.0),
                },
                repeats,
            )
        table.add_row(
            str(P), str(Kp), f"{1e3 * t['write']:.2f}", f"{1e3 * t['read']:.3f}", f"{t['write'] / t['km']:.2f}"
        )
    console.print(table)


def bench_kpp_memory(repeats: int) -> None:
    """K++: the episode writer and the window reads (T keys per episode), kpp_cpu sizes and the authors'
    sizes; forward, no grad, float32, B = 16, T = 32, E = 256."""
    B, T, E = 16, 32, 256
    table = Table(title=f"K++ write/read: B={B}, T={T}, float32, {where()}, median of {repeats}")
    for col in ("memory (C_m x S x S)", "window", "write (ms)", "one read of T windows (ms)"):
        table.add_column(col, justify="right")
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(B, T, E, generator=gen)
    for C_m, S, w in ((8, 16, 8), (8, 32, 16), (8, 128, 32)):
        writer = BlockMemoryWriter(E, C_m, S)
        M = torch.randn(B, C_m, S, S, generator=gen)
        Y = torch.randn(B, T, 3, generator=gen)
        with torch.no_grad():
            t = median_times(
                {
                    "write": partial(writer, e),
                    "read": lambda M=M, Y=Y, w=w, S=S: read_windows(M, key_to_theta(Y, w, S), w),
                },
                repeats,
            )
        table.add_row(f"{C_m} x {S} x {S}", f"{w} x {w}", f"{1e3 * t['write']:.2f}", f"{1e3 * t['read']:.2f}")
    console.print(table)


def bench_model_step(repeats: int) -> None:
    """Training-step time of every registered model vs the VAE, B = 16 episodes of T = 32 MNIST-sized images."""
    from steps import step_times

    B, T = 16, 32
    names = ["vae"] + sorted(n for n in MODELS if n != "vae")
    t = step_times(names, B=B, T=T, repeats=repeats)
    table = Table(
        title=f"training step (fwd + bwd + Adam), default configs, B={B}, T={T}, 28x28, {where()}, median of {repeats}"
    )
    for col in ("model", "ms / step", "ms / episode", "x VAE"):
        table.add_column(col, justify="right")
    for n in names:
        table.add_row(n, f"{1e3 * t[n]:.1f}", f"{1e3 * t[n] / B:.2f}", f"{t[n] / t['vae']:.2f}")
    console.print(table)


def _write_kl_problem(B: int, T: int, K: int, C: int, seed: int = 0):
    """A prior MN(R_0, u I) with learnable R_0, s (u = e^s + 1e-6) and leaf w (unit rows), z."""
    gen = torch.Generator().manual_seed(seed)
    R0 = torch.randn(K, C, generator=gen).requires_grad_()
    s = torch.zeros((), requires_grad=True)
    w = torch.nn.functional.normalize(torch.randn(B, T, K, generator=gen), dim=-1).requires_grad_()
    z = torch.randn(B, T, C, generator=gen).requires_grad_()
    return R0, s, w, z


def bench_write_kl(repeats: int) -> None:
    """Write + KL(q(M | X) || p(M)), forward and backward, float32, against the reference path (target: >= 2x at
    the default B = 16, T = 64, K = 64, C = 100)."""
    table = Table(title=f"write + KL, forward + backward, float32, {where()}, median of {repeats}")
    for col in ("B", "T", "K", "C", "form", "reference (ms)", "new (ms)", "speed-up", "target"):
        table.add_column(col, justify="right")
    for B, T, K, C in (
        (16, 64, 64, 100),
        (16, 32, 64, 100),
        (16, 256, 64, 100),
        (16, 32, 256, 100),
        (16, 32, 512, 100),
    ):
        R0, s, w, z = _write_kl_problem(B, T, K, C)

        def prior(R0=R0, s=s, B=B, K=K, C=C):
            u = torch.exp(s) + 1e-6
            return MemoryState(R0.expand(B, K, C), (u * torch.eye(K)).expand(B, K, K)), u.expand(B)

        def run(new: bool, prior=prior, w=w, z=z) -> None:
            p, u = prior()
            q, kl = write_with_kl(p, w, z, 1.0, u0=u) if new else reference_write_with_kl(p, w, z, 1.0)
            (q.R.sum() + q.U.sum() + kl.sum()).backward()

        t = median_times({"ref": partial(run, False), "new": partial(run, True)}, repeats)
        default = (B, T, K, C) == (16, 64, 64, 100)
        ratio = t["ref"] / t["new"]
        table.add_row(
            str(B),
            str(T),
            str(K),
            str(C),
            "predictive" if T <= K else "information",
            f"{1e3 * t['ref']:.2f}",
            f"{1e3 * t['new']:.2f}",
            f"{ratio:.2f}x",
            (">= 2x: " + ("met" if ratio >= 2 else "MISSED")) if default else "",
        )
    console.print(table)


def bench_float32(repeats: int) -> None:
    """float32 against float64: U of the batched write (new vs reference) at T = 256, K = 8, and the per-step
    KL at small noise (target: U within 1e-4 relative at sigma_xi^2 = 1e-2)."""
    gen = torch.Generator().manual_seed(0)
    B, T, K, C = 4, 256, 8, 16
    R = torch.randn(B, K, C, generator=gen, dtype=torch.float64)
    w = torch.nn.functional.normalize(torch.randn(B, T, K, generator=gen, dtype=torch.float64), dim=-1)
    z = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    U = torch.eye(K, dtype=torch.float64).expand(B, K, K)
    table = Table(title=f"float32 accuracy, B={B}, T={T}, K={K}, C={C}: ||X32 - X64|| / ||X64|| ({where()})")
    for col in ("sigma_xi^2", "U: reference", "U: new", "KL: reference", "KL: new", "target"):
        table.add_column(col, justify="right")

    def rel(x, y) -> str:
        r = ((x.double() - y).norm() / y.norm()).item()
        return f"{r:.1e}" if r == r else "nan"

    for s2 in (1e-2, 1e-4):
        ref64, kl64 = write_with_kl(MemoryState(R, U), w, z, s2, None)
        args32 = (MemoryState(R.float(), U.float()), w.float(), z.float(), s2)
        old, old_kl = reference_write(*args32, None), None
        try:
            old_kl = kl_matrix_normal(old, args32[0])
        except ValueError:
            pass
        new, new_kl = write_with_kl(*args32, None)
        r_new = ((new.U.double() - ref64.U).norm() / ref64.U.norm()).item()
        table.add_row(
            f"{s2:g}",
            rel(old.U, ref64.U),
            rel(new.U, ref64.U),
            rel(old_kl, kl64) if old_kl is not None else "not PD",
            rel(new_kl, kl64),
            ("<= 1e-4: " + ("met" if r_new <= 1e-4 else "MISSED")) if s2 == 1e-2 else "",
        )
    console.print(table)
    table = Table(title=f"per-step KL of one rank-1 write in float32, K={K}, C={C}, U = I, |w| = 1 ({where()})")
    for col in ("sigma_xi^2", "float64", "reference float32 (log1p(-beta))", "new float32 (ln sigma^2 - ln s)"):
        table.add_column(col, justify="right")
    w1, z1 = w[:, :1], z[:, :1]
    for s2 in (1e-2, 1e-6, 1e-8):
        kl64 = write_online(MemoryState(R, U), w1, z1, s2, None)[1][0, 0].item()
        kl32 = write_online(MemoryState(R.float(), U.float()), w1.float(), z1.float(), s2, None)[1][0, 0].item()
        Delta = (z1[:, 0] - torch.einsum("bk,bkc->bc", w1[:, 0], R)).float()
        old = reference_step_kl(w1[:, 0].float(), U.float(), s2, Delta, C)[0].item()
        table.add_row(f"{s2:g}", f"{kl64:.6g}", f"{old:.6g}", f"{kl32:.6g}")
    console.print(table)


def _step_fn(model, x):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        model.episode_elbo(x).loss.backward()
        opt.step()

    return step


def bench_km_scaling(repeats: int) -> None:
    """KM training step / VAE's as K grows, the new memory algebra against the reference path, default
    configs otherwise, B = 16, T = 32, 28 x 28 (targets: <= 1.2 at K = 256, <= 1.5 at K = 512)."""
    B, T = 16, 32
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.2))
    table = Table(title=f"training step / VAE's vs memory size K, B={B}, T={T}, {where()}, median of {repeats}")
    for col in ("K", "VAE (ms)", "KM reference (ms)", "KM new (ms)", "reference / VAE", "new / VAE", "target"):
        table.add_column(col, justify="right")
    vae_cls, vae_cfg = MODELS["vae"]
    km_cls, km_cfg = MODELS["km"]
    for K, target in ((64, None), (256, 1.2), (512, 1.5)):
        steps = {"vae": _step_fn(vae_cls(vae_cfg(), NetConfig(), (1, 28, 28), "bernoulli"), x)}
        for name in ("ref", "new"):
            torch.manual_seed(0)
            model = km_cls(km_cfg(memory_size=K), NetConfig(), (1, 28, 28), "bernoulli")
            if name == "ref":
                model.memory.__class__ = ReferenceMemory
            steps[name] = _step_fn(model, x)
        t = median_times(steps, repeats)
        r_ref, r_new = t["ref"] / t["vae"], t["new"] / t["vae"]
        table.add_row(
            str(K),
            f"{1e3 * t['vae']:.0f}",
            f"{1e3 * t['ref']:.0f}",
            f"{1e3 * t['new']:.0f}",
            f"{r_ref:.2f}",
            f"{r_new:.2f}",
            f"<= {target}: " + ("met" if r_new <= target else "MISSED") if target else "",
        )
    console.print(table)


def bench_memory_dtype(repeats: int) -> None:
    """Cost of model.memory_dtype=float64 (the K x K algebra in float64 inside a float32 model): write + KL
    forward and backward, and the KM / DKM training step, float32 algebra against float64."""
    table = Table(title=f"model.memory_dtype: float64 algebra / float32 algebra, {where()}, median of {repeats}")
    for col in ("what", "float32 (ms)", "float64 (ms)", "float64 / float32"):
        table.add_column(col, justify="right")
    for B, T, K, C in ((16, 64, 64, 100), (16, 32, 256, 100)):
        _, _, w, z = _write_kl_problem(B, T, K, C)

        def run(mem: KanervaMemory, w=w, z=z) -> None:
            (R, U), kl = mem.write_with_kl(w, z)
            (R.sum() + U.sum() + kl.sum()).backward()

        t = median_times(
            {str(dt): partial(run, KanervaMemory(K, C, algebra_dtype=dt)) for dt in (None, torch.float64)}, repeats
        )
        table.add_row(
            f"write + KL fwd + bwd, B={B}, T={T}, K={K}, C={C}",
            f"{1e3 * t['None']:.2f}",
            f"{1e3 * t['torch.float64']:.2f}",
            f"{t['torch.float64'] / t['None']:.2f}",
        )
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((16, 32, 1, 28, 28), 0.2))
    for name in ("km", "dkm"):
        cls, cfg = MODELS[name]
        steps = {
            dt: _step_fn(cls(cfg(memory_dtype=dt), NetConfig(), (1, 28, 28), "bernoulli"), x)
            for dt in ("float32", "float64")
        }
        t = median_times(steps, repeats)
        table.add_row(
            f"{name} training step, default config, B=16, T=32",
            f"{1e3 * t['float32']:.0f}",
            f"{1e3 * t['float64']:.0f}",
            f"{t['float64'] / t['float32']:.2f}",
        )
    console.print(table)


SECTIONS: dict[str, Callable[[int], None]] = {
    "write_kl": bench_write_kl,
    "float32": bench_float32,
    "km_scaling": bench_km_scaling,
    "memory_dtype": bench_memory_dtype,
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
