"""How much can any Gaussian context prior save on one-character held-out targets? An oracle on a run's own codes.

    python bench/context_oracle.py RUN_DIR... [--episodes 128]

The one-character goal of issue #26 asks a memory model to beat the VAE by >= 3 nats/image on `test_class/heldout`
(targets x_t scored given a context X_c of the same character). The held-out -ELBO of a target is
recon + KL(q(z_t | x_t) || prior); a context can only change the prior. This script keeps a trained run's encoder
q(z | x) = N(mu, sigma^2) (the VAE's posterior, or a KM's bottom-up code, which is what the KM writes) and swaps
the N(0, I) prior for Gaussians built from the context with every free parameter fitted on the test targets
themselves (an oracle: optimistic by construction), on the run's own one-character test episodes
(`data.eval_episodes=class`, the T - n context / n target split of the held-out protocol):

    scalar           N(m, s^2 I),     m = mean of the context's mu, one s^2 for every dimension
    per-dim          N(m, diag s_c^2), one variance per code dimension
    per-dim, shrunk  N(lambda_c m, diag s_c^2), lambda_c the least-squares shrinkage of the context mean

Each column is the KL saved per target image (nats) against N(0, I); the reconstruction term is unchanged, so a
memory that reads such a prior (with nothing paid for writing it) scores at best the run's held-out bound minus
the saving. The KLs are exact (closed form), so the numbers carry no sampling noise beyond the episode draw.

It bounds what a Gaussian prior built from the context mean can give the codes this encoder makes; a model that
learns codes more predictable from their context is not bounded by it (that is what training a memory could
change). Measured numbers and commands: docs/results.md, "The one-character goal".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from km.cli import fail


def gaussian_kl(mu_q, var_q, mu_p, var_p) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) per dimension (broadcasting)."""
    return 0.5 * (var_q / var_p + (mu_q - mu_p) ** 2 / var_p - 1 + torch.log(var_p) - torch.log(var_q))


def oracle_savings(mu: torch.Tensor, var: torch.Tensor, n_targets: int) -> dict[str, float]:
    """mu, var: (E, T, C) codes of E one-character episodes -> KL per target image under each prior (nats).

    The first T - n items are the context, the last n the targets (the held-out protocol's split)."""
    mu, var = mu.double(), var.double()
    m = mu[:, :-n_targets].mean(1, keepdim=True)  # (E, 1, C) context mean
    mu_t, var_t = mu[:, -n_targets:], var[:, -n_targets:]  # (E, n, C) targets
    zero, one = torch.zeros_like(mu_t), torch.ones_like(var_t)
    kl_std = gaussian_kl(mu_t, var_t, zero, one).sum(-1).mean()
    resid2 = var_t + (mu_t - m) ** 2  # the optimal variance of a prior centred on m is the mean of this
    s2 = resid2.mean().expand_as(var_t)
    kl_scalar = gaussian_kl(mu_t, var_t, m, s2).sum(-1).mean()
    s2c = resid2.mean((0, 1), keepdim=True).expand_as(var_t)
    kl_dim = gaussian_kl(mu_t, var_t, m, s2c).sum(-1).mean()
    lam = (mu_t * m).mean((0, 1), keepdim=True) / (m**2).mean((0, 1), keepdim=True).clamp_min(1e-12)  # (1, 1, C)
    s2l = (var_t + (mu_t - lam * m) ** 2).mean((0, 1), keepdim=True).expand_as(var_t)
    kl_shrunk = gaussian_kl(mu_t, var_t, lam * m, s2l).sum(-1).mean()
    active = (gaussian_kl(mu_t, var_t, zero, one).mean((0, 1)) > 0.1).sum()  # dims carrying > 0.1 nats
    return {
        "kl_std": float(kl_std),
        "scalar": float(kl_std - kl_scalar),
        "per_dim": float(kl_std - kl_dim),
        "per_dim_shrunk": float(kl_std - kl_shrunk),
        "active_dims": int(active),
    }


@torch.no_grad()
def codes(target: str, episodes: int):
    """The run's codes (mu, var) on its first `episodes` one-character test episodes, n targets, the loaded Run."""
    import km

    try:
        run = km.load(target, "data.eval_episodes=class")
    except Exception as exc:  # RunError and friends: one line
        fail(f"{target}: {exc}")
    model = run.model
    x = run.episodes(episodes)  # (E, T, C, H, W)
    if hasattr(model, "posterior"):  # the VAE: q(z | x)
        mu, log_sigma = model.posterior(x)
    elif hasattr(model, "bottom_up"):  # KM: the bottom-up code it writes
        mu, log_sigma = model.bottom_up(model.encode_images(x))
    else:
        fail(f"{target}: a {run.config.model.name} run has no per-image Gaussian code this oracle can read")
    return mu, (2 * log_sigma).exp(), model.heldout_n(x.shape[1]), run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or checkpoints)")
    ap.add_argument("--episodes", type=int, default=128, help="one-character test episodes (default 128)")
    args = ap.parse_args(argv)
    if args.episodes < 1:
        fail(f"bad value for --episodes: {args.episodes} (must be >= 1)")
    for r in args.runs:
        if not Path(r).exists():
            fail(f"no run at {r}")
    from km.threads import torch_threads

    with torch_threads(1):  # the caller's count is put back (a test, a notebook)
        print(
            f"KL saved per target image (nats) by an oracle Gaussian context prior; threads 1, {args.episodes} episodes"
        )
        print("| run | model | steps | T | n | active dims | KL_z vs N(0,I) | scalar | per-dim | per-dim, shrunk |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in args.runs:
            from km.runs import read_meta

            mu, var, n, run = codes(r, args.episodes)
            s = oracle_savings(mu, var, n)
            steps, cfg = read_meta(run.run_dir).get("steps", "?"), run.config  # steps trained, as run.json records them
            print(
                f"| {r} | {cfg.model.name} | {steps} | {mu.shape[1]} | {n} | {s['active_dims']} | {s['kl_std']:.2f} "
                f"| {s['scalar']:.2f} | {s['per_dim']:.2f} | {s['per_dim_shrunk']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
