"""Study 4, PKM allocation: the dominant machine of each item against its class (ARI, NMI, purity), sparsity."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from km.study.common import (
    StudyError,
    StudyResult,
    StudyRun,
    _budget,
    _plt,
    _savefig,
    md_table,
    one_data_set,
)


# ---------------------------------------------------------------------------------------------
# 4. PKM allocation
# ---------------------------------------------------------------------------------------------
def purity(assign: Any, labels: Any) -> float:
    import numpy as np

    assign, labels = np.asarray(assign), np.asarray(labels)
    return sum(np.bincount(labels[assign == m]).max() for m in np.unique(assign)) / len(labels)


def clustering_scores(assign: Any, labels: Any, shuffles: int = 20, seed: int = 0) -> dict[str, float]:
    """ARI, NMI and purity of an assignment against class labels, and the same for the assignment shuffled
    (the same cluster sizes at random; mean over `shuffles` draws): the chance level of each score."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    assign, labels = np.asarray(assign), np.asarray(labels)
    rng = np.random.default_rng(seed)
    sh = [
        (adjusted_rand_score(labels, s), normalized_mutual_info_score(labels, s), purity(s, labels))
        for s in (rng.permutation(assign) for _ in range(shuffles))
    ]
    c = np.mean(sh, axis=0)
    return {
        "ari": float(adjusted_rand_score(labels, assign)),
        "nmi": float(normalized_mutual_info_score(labels, assign)),
        "purity": float(purity(assign, labels)),
        "ari_shuffled": float(c[0]),
        "nmi_shuffled": float(c[1]),
        "purity_shuffled": float(c[2]),
    }


def weight_sparsity(pi: Tensor) -> dict[str, float]:
    """pi: (N, P) machine weights. max: mean largest weight (1/P: uniform, 1: one machine); entropy: mean
    entropy / ln P (1: uniform, 0: one-hot); one_hot: fraction of items with a weight > 0.9; used: machines
    that are some item's dominant one; usage entropy: entropy of the dominant-machine counts / ln P."""
    P = pi.shape[1]
    ent = -(pi * pi.clamp_min(1e-12).log()).sum(-1) / math.log(P) if P > 1 else torch.zeros(len(pi))
    counts = torch.bincount(pi.argmax(-1), minlength=P).float()
    q = counts / counts.sum()
    use_ent = -(q * q.clamp_min(1e-12).log()).sum() / math.log(P) if P > 1 else torch.tensor(0.0)
    return {
        "max": pi.max(-1).values.mean().item(),
        "entropy": ent.mean().item(),
        "one_hot": (pi.max(-1).values > 0.9).float().mean().item(),
        "used": int((counts > 0).sum()),
        "usage_entropy": use_ent.item(),
    }


@torch.no_grad()
def allocation(
    runs: list[StudyRun], items: int = 10000, shuffles: int = 20, seed: int = 0, out: Path | None = None
) -> StudyResult:
    """PKM: each labelled test item's machine weights pi (encoded one at a time), the dominant machine
    against the class (ARI, NMI, purity, each beside a shuffled baseline) and the sparsity of pi."""
    t0 = time.time()
    data = one_data_set(runs)
    for r in runs:
        if not hasattr(r.model, "item_machines"):
            raise StudyError(
                f"allocation: run '{r.label}' is a {r.model_name}, which has a single memory; give PKM runs"
            )
    x, y = runs[0].x_test, runs[0].y_test
    keep = (y >= 0).nonzero().flatten()
    if len(keep) == 0:
        raise StudyError(f"allocation: the {data} test split has no class labels")
    keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:items]]
    x, y = x[keep], y[keep]
    rows, pics = [], []
    for r in runs:
        pi = torch.cat([r.model.item_machines(chunk[None])[0] for chunk in x.split(500)]).float()  # (N, P)
        assign = pi.argmax(-1)
        row = {
            "run": r.label,
            "machines": pi.shape[1],
            "items": len(y),
            "classes": int(len(y.unique())),
            **clustering_scores(assign.numpy(), y.numpy(), shuffles, seed),
            **weight_sparsity(pi),
        }
        rows.append(row)
        pics.append((r.label, pi, assign))
    header = (
        f"**PKM allocation** on {data}: {len(y)} labelled test items (seed {seed}), each encoded alone; its "
        "machine weights pi and dominant machine argmax pi. ARI / NMI / purity of the dominant machine against the "
        f"class, each beside its shuffled baseline (the same machine counts assigned at random, mean of {shuffles}); "
        "sparsity: mean max pi (1/P uniform, 1 one-hot), mean entropy of pi / ln P (1 uniform, 0 one-hot), "
        "fraction of items with max pi > 0.9, machines used as some item's dominant one. Runs: " + _budget(runs) + "."
    )
    cols = [
        "run",
        "P",
        "classes",
        "ARI (shuffled)",
        "NMI (shuffled)",
        "purity (shuffled)",
        "mean max pi",
        "entropy / ln P",
        "max pi > 0.9",
        "machines used",
    ]
    trows = [
        [
            w["run"],
            w["machines"],
            w["classes"],
            f"{w['ari']:.4f} ({w['ari_shuffled']:.4f})",
            f"{w['nmi']:.4f} ({w['nmi_shuffled']:.4f})",
            f"{w['purity']:.4f} ({w['purity_shuffled']:.4f})",
            w["max"],
            w["entropy"],
            w["one_hot"],
            w["used"],
        ]
        for w in rows
    ]
    res = StudyResult("allocation", data, header, md_table(cols, trows), rows)
    if out is not None:
        plt = _plt()
        fig, axes = plt.subplots(len(pics), 2, figsize=(11, 3.8 * len(pics)), squeeze=False)
        for (label, pi, assign), a in zip(pics, axes, strict=True):
            P = pi.shape[1]
            ncls = int(y.max()) + 1
            if ncls <= 20:
                cont = torch.zeros(ncls, P)
                cont.index_put_((y, assign), torch.ones(len(y)), accumulate=True)
                cont = cont / cont.sum(1, keepdim=True).clamp_min(1)
                im = a[0].imshow(cont.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
                a[0].set(
                    xlabel="dominant machine",
                    ylabel="class",
                    title=f"{label}: P(dominant machine | class)",
                    xticks=range(P),
                    yticks=range(ncls),
                )
                fig.colorbar(im, ax=a[0])
            else:
                a[0].hist(pi.max(-1).values.numpy(), bins=20, range=(0, 1))
                a[0].set(xlabel="max machine weight of an item", ylabel="items", title=f"{label}: sparsity of pi")
            a[1].bar(range(P), torch.bincount(assign, minlength=P).numpy(), label="items (dominant)")
            a[1].set(
                xlabel="machine",
                ylabel="items whose dominant machine it is",
                title=f"{label}: machine usage",
                xticks=range(P),
            )
        fig.suptitle(f"PKM allocation on {data}", fontsize=9)
        fig.tight_layout()
        res.png = _savefig(fig, out / f"allocation_{data}.png")
    res.seconds = time.time() - t0
    return res
