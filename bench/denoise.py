"""Denoising with memory: iterative reading (KM) vs attractor dynamics (DKM), side by side.

Run:  python bench/denoise.py RUN_DIR [RUN_DIR ...] [--noise 0.15] [--iters 10] [--episodes 8]

Every run writes the same clean test episodes (its data config's test split, first batch), reads
queries corrupted with the same noise (seed 0), and iterates. Prints, per model, the error against
the clean pattern after 1, 2, 5, 10 iterations (pixel error = wrong pixels at threshold 0.5 for
binary data), the energy where the model has one (DKM), and the all-black image's pixel error as a
floor to read the table against: a chain that fades to black scores that, whatever it remembered.
PNG chains go to each run's denoise/ folder. Measurements only, no asserts.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from km.evaluate import load_run
from km.pictures import denoise_chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shown = [i for i in (0, 1, 2, 5, 10, 20) if i <= args.iters]
    table = Table(
        title=f"denoising: noise {args.noise:g}, {args.episodes} test episodes; "
        "pixel error (L1) [energy] after n iterations"
    )
    for col in ("run", "model", "black image", *[f"n={i}" for i in shown]):
        table.add_column(col, justify="right")
    for run in args.runs:
        cfg, run_dir, _, dm, model = load_run(run)
        dm.setup("test")
        x = dm.get_batch("test", next(iter(dm.test_dataloader()))["idx"][: args.episodes])["x"]
        binary = dm.likelihood == "bernoulli"
        rows = denoise_chain(
            model,
            x,
            args.noise,
            args.iters,
            binary,
            run_dir / "denoise" / f"bench_noise{args.noise:g}_iters{args.iters}.png",
        )
        key = "pixel_error" if binary else "l1"
        cells = []
        for i in shown:
            r = rows[i]
            cell = f"{r[key]:.4f}" + (f" ({r['l1']:.4f})" if binary else "")
            cells.append(cell + (f" [{r['energy']:.1f}]" if "energy" in r else ""))
        black = (x != 0).float().mean().item() if binary else x.abs().mean().item()
        table.add_row(str(run), cfg.model.name, f"{black:.4f}", *cells)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
