"""DKM in code space: does the memory store the written codes, and does a corrupted query's code find its own?

    python bench/dkm_codes.py RUN_DIR_OR_CKPT... [--noise 0.15] [--episodes 8]

The attractor study (`km study attractors`) measures DKM's dynamics in pixels; this script looks one level down,
at the codes z = e(x) that DKM writes and reads (docs/results.md, study 2). For 8 MNIST test episodes of the run's
T (the attractor study's: random test items, seed 0), memory written clean:

    |z|                  mean norm of an item's code
    read: posterior      relative error ||mu_w^T R - z|| / ||z|| of reading a stored item's own code
    read: prior          the same on the prior mean R_0 (no episode written): what the memory adds
    noisy code: acc      fraction of corrupted queries (a fraction --noise of pixels flipped) whose code e(x~) is
                         nearer its own stored code than any other stored code of the episode (chance 1/T)
    noisy code: err      ||e(x~) - z|| / ||z||
    its read: acc / err  the same for the read mu_w^T R of the corrupted query (one attractor step, in codes)
"""

from __future__ import annotations

import argparse

import torch

from km.cli import fail


def code_table(target: str, noise: float, episodes: int) -> dict[str, float]:
    from km.evaluate import load_run

    cfg, _, _, dm, model = load_run(target)
    if cfg.model.name != "dkm":
        fail(f"{target} is a {cfg.model.name} run; this script reads DKM's codes")
    model.eval()
    dm.setup("test")
    from km.study import episodes_of

    T = int(cfg.data.episode_length)
    n = len(dm.x["test"])
    x, _ = episodes_of(dm.get_batch("test", torch.arange(n)[None])["x"][0], T, episodes, seed=0)  # (E, T, C, H, W)
    mem = model.memory
    with torch.no_grad():
        z = model.embed(x)  # (E, T, C) stored codes
        R = model.write(x).R  # (E, K, C) posterior mean
        R0 = mem.R0.expand_as(R)

        def read(M: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            return mem.address(M, q) @ M

        flip = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < noise
        zn = model.embed(torch.where(flip, 1 - x, x))  # codes of the corrupted queries

        def err(q: torch.Tensor) -> float:
            return ((q - z).norm(dim=-1) / z.norm(dim=-1)).mean().item()

        def acc(q: torch.Tensor) -> float:
            return (torch.cdist(q, z).argmin(-1) == torch.arange(T)).float().mean().item()

        rn = read(R, zn)
        return {
            "|z|": z.norm(dim=-1).mean().item(),
            "read: posterior": err(read(R, z)),
            "read: prior": err(read(R0, z)),
            "noisy code: acc": acc(zn),
            "noisy code: err": err(zn),
            "its read: acc": acc(rn),
            "its read: err": err(rn),
            "chance": 1 / T,
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--noise", type=float, default=0.15, help="fraction of pixels flipped in the queries")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from km.runs import RunError
    from km.threads import torch_threads

    try:
        with torch_threads(args.threads):  # the caller's count is put back (a test, a notebook)
            rows = [(r, code_table(r, args.noise, args.episodes)) for r in args.runs]
    except RunError as e:  # a missing or unreadable run: one line
        fail(str(e))
    cols = list(rows[0][1])
    print(f"DKM codes: {args.episodes} MNIST test episodes, queries with {args.noise:.0%} of pixels flipped")
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for r, v in rows:
        print(f"| {r} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
