"""Study 3, addressing: KL_y per item, spread and effective rank of the addressing weights of an episode."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from km.study.common import (
    StudyError,
    StudyResult,
    StudyRun,
    _budget,
    _plt,
    _savefig,
    episodes_of,
    md_table,
    memory_runs,
    one_data_set,
)


# ---------------------------------------------------------------------------------------------
# 3. addressing
# ---------------------------------------------------------------------------------------------
def address_spread(w: Tensor) -> dict[str, float]:
    """w: (E, T, K) addressing weights of the items of E episodes. cosine: mean pairwise cosine similarity
    of two items' w in one episode (1: every item is written to and read from the same place); rel_spread:
    std of w across the items of an episode / RMS of w (0: identical rows); eff_rank: exp of the entropy of
    the normalised singular values of the episode's T x K matrix (1: one direction for all items)."""
    E, T, K = w.shape
    wn = torch.nn.functional.normalize(w, dim=-1)
    cos = wn @ wn.transpose(1, 2)
    off = ~torch.eye(T, dtype=torch.bool).expand(E, T, T)
    s = torch.linalg.svdvals(w.double())
    pnorm = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(pnorm * pnorm.clamp_min(1e-30).log()).sum(-1)
    return {
        "cosine": cos[off].mean().item() if T > 1 else float("nan"),
        "rel_spread": (w.std(1).pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp_min(1e-30)).item(),
        "eff_rank": ent.exp().mean().item(),
        "w_rms": w.pow(2).mean().sqrt().item(),
    }


@torch.no_grad()
def addressing(
    runs: list[StudyRun], T: int = 32, episodes: int = 16, seed: int = 0, out: Path | None = None
) -> StudyResult:
    """How much the addressing carries: KL(q(y|x) || p(y)) per item (KM, PKM) and the spread of w across
    the items of an episode; heatmaps of w."""
    t0 = time.time()
    data = one_data_set(runs)
    memory_runs(runs, "addressing")
    for r in runs:
        if not hasattr(r.model, "addressing"):
            raise StudyError(
                f"addressing: run '{r.label}' is a {r.model_name}, which has no addressing weights "
                "(KM, PKM and DKM have)"
            )
    x, _ = episodes_of(runs[0].x_test, T, episodes, seed)
    rows, heat = [], []
    for r in runs:
        m = r.model
        w = m.addressing(x).float()
        row = {"run": r.label, "memory": r.memory, **address_spread(w)}
        if hasattr(m, "posterior_y"):
            from km.models.km import gaussian_kl

            mu, ls = m.posterior_y(m.encode_images(x))
            kl = gaussian_kl(mu, ls, torch.zeros_like(mu), torch.zeros_like(ls))  # (E, T)
            row["kl_y"] = kl.mean().item()
            row["kl_y_dims_active"] = int(
                (
                    gaussian_kl(
                        mu[..., None], ls[..., None], torch.zeros_like(mu[..., None]), torch.zeros_like(ls[..., None])
                    ).mean((0, 1))
                    > 0.01
                ).sum()
            )
            row["y_dim"] = mu.shape[-1]
        else:
            row["kl_y"], row["kl_y_dims_active"], row["y_dim"] = float("nan"), "-", "-"
        rows.append(row)
        heat.append((r.label, w[0]))
    header = (
        f"**addressing** on {data}: {episodes} iid test episodes of T={T} (seed {seed}). KL_y: KL(q(y|x) || p(y)) "
        "per item, nats (KM, PKM; what the addressing latent carries about an item); active dims: dimensions of y "
        "with KL > 0.01 nats; w: the addressing weights at the means of q(y|x) (DKM: mu_w on the memory written "
        "from the episode); cosine: mean pairwise cosine similarity of two items' w (1: every item written to "
        "the same place); rel. spread: std of w across items / RMS of w (0: identical rows); eff. rank: exp "
        "entropy of the singular values of the T x K matrix of w (1: one direction). Runs: " + _budget(runs) + "."
    )
    cols = [
        "run",
        "memory",
        "KL_y (nats/item)",
        "active y dims",
        "cosine of w",
        "rel. spread of w",
        "eff. rank of w",
        "RMS of w",
    ]
    trows = [
        [
            w["run"],
            w["memory"],
            w["kl_y"],
            f"{w['kl_y_dims_active']} / {w['y_dim']}",
            w["cosine"],
            w["rel_spread"],
            w["eff_rank"],
            w["w_rms"],
        ]
        for w in rows
    ]
    res = StudyResult("addressing", data, header, md_table(cols, trows), rows)
    if out is not None:
        plt = _plt()
        fig, axes = plt.subplots(1, len(heat), figsize=(4.5 * len(heat), 4), squeeze=False)
        for a, (label, w) in zip(axes[0], heat, strict=True):
            v = w.abs().max().item() or 1.0
            im = a.imshow(w.numpy(), aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v)
            a.set(xlabel="memory slot k", ylabel="item t of episode 0", title=f"{label}: w (T={T} x K)")
            fig.colorbar(im, ax=a)
        fig.suptitle(
            f"Addressing weights w on {data}, one iid test episode\n(rows that differ: items stored in different places)",
            fontsize=9,
        )
        fig.tight_layout()
        res.png = _savefig(fig, out / f"addressing_{data}.png")
    res.seconds = time.time() - t0
    return res
