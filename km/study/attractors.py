"""Study 2, attractors: where iterated reads from corrupted cues end (own item, another, none), energy per step."""

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
    check_feedbacks,
    check_noise,
    corrupt_cues,
    episodes_of,
    iterate_reads,
    l1_distances,
    md_table,
    memory_runs,
    one_data_set,
)


# ---------------------------------------------------------------------------------------------
# 2. attractors
# ---------------------------------------------------------------------------------------------
def classify_end_points(points: Tensor, items: Tensor, binary: bool = True) -> dict[str, Any]:
    """Where does each chain end? points, items: (E, T, ...). Distances are the fraction of differing
    pixels after thresholding at 0.5 (binary) or L1 per pixel. Threshold tau (per episode): half the mean
    distance from a stored item to its nearest other stored item, so the balls of radius tau around the
    stored items barely overlap. own: the nearest stored item is the chain's own and within tau; other:
    another stored item, within tau; none: no stored item within tau. Also `nearest_own` (nearest is its
    own, no threshold) and the spread: mean pairwise distance of end points / of the stored items (below 1:
    the chains converged onto fewer points than were stored)."""
    p = (points > 0.5).float() if binary else points
    d = l1_distances(p, items)  # (E, T, T)
    dii = l1_distances(items, items)
    E, T = d.shape[:2]
    eye = torch.eye(T, dtype=torch.bool).expand(E, T, T)
    tau = 0.5 * dii.masked_fill(eye, float("inf")).min(-1).values.mean(-1) if T > 1 else torch.full((E,), 0.1)
    dmin, nearest = d.min(-1)
    own_is_nearest = nearest == torch.arange(T)
    within = dmin < tau[:, None]
    dpp = l1_distances(p, p)
    off = ~eye
    spread = (dpp[off].mean() / dii[off].mean()).item() if T > 1 else float("nan")
    return {
        "own": (own_is_nearest & within).float().mean().item(),
        "other": (~own_is_nearest & within).float().mean().item(),
        "none": (~within).float().mean().item(),
        "nearest_own": own_is_nearest.float().mean().item(),
        "dist_own": d.diagonal(dim1=1, dim2=2).mean().item(),
        "tau": tau.mean().item(),
        "spread": spread,
    }


def still_moving(before: Tensor, after: Tensor, binary: bool = True) -> Tensor:
    """(E, T) bool: did the chain's point change in its last read? Binary: any pixel differs after thresholding
    at 0.5 (a thresholded chain that did not move is an exact fixed point of the dynamics); 8-bit: the mean
    |change| per pixel is at least 1e-3."""
    if binary:
        return ((before > 0.5) != (after > 0.5)).flatten(2).any(-1)
    return (before - after).abs().flatten(2).mean(-1) >= 1e-3


@torch.no_grad()
def read_nll(model: Any, x: Tensor, memory: Any) -> float:
    """Energy proxy for models without an energy: -ln p(x | one read of x from the memory), nats/image."""
    return -model.log_px(model.read(x, memory), x).mean().item()


@torch.no_grad()
def attractors(
    runs: list[StudyRun],
    T: int = 32,
    episodes: int = 8,
    noise: float = 0.15,
    iters: int = 20,
    feedbacks: tuple[str, ...] = ("mean", "threshold"),
    seed: int = 0,
    out: Path | None = None,
) -> StudyResult:
    """Write T clean items, start a chain at each item's corrupted copy, iterate the read `iters` times;
    classify the end points (own / other / none stored item) and track energy per step."""
    t0 = time.time()
    data = one_data_set(runs)
    memory_runs(runs, "attractors")
    check_noise(noise)
    if iters < 1:
        raise StudyError(f"--iters {iters}: the number of iterations must be >= 1")
    check_feedbacks(feedbacks)
    x_all, binary = runs[0].x_test, runs[0].binary
    x, _ = episodes_of(x_all, T, episodes, seed)
    cues = corrupt_cues(x, "flip", noise, binary, seed + 1)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    start = classify_end_points(cues, x, binary)
    black = classify_end_points(torch.zeros_like(x), x, binary)  # every chain ending on the all-black image
    for r in runs:
        torch.manual_seed(seed)
        memory = r.model.write(x)
        for fb in feedbacks:
            chain = iterate_reads(r.model, cues, memory, iters, fb)
            key = f"{r.label}, feedback={fb}"
            cur: dict[str, list[float]] = {"dist_own": [], "own": [], "energy": [], "read_nll": []}
            for _s, pt in enumerate(chain):
                c = classify_end_points(pt, x, binary)
                cur["dist_own"].append(c["dist_own"])
                cur["own"].append(c["own"])
                cur["read_nll"].append(read_nll(r.model, pt, memory))
                if hasattr(r.model, "energy"):
                    cur["energy"].append(r.model.energy(pt, memory).mean().item())
            end = classify_end_points(chain[-1], x, binary)
            clean_chain = iterate_reads(r.model, x, memory, iters, fb)
            clean = classify_end_points(clean_chain[-1], x, binary)
            empty = classify_end_points(iterate_reads(r.model, cues, None, iters, fb)[-1], x, binary)  # prior memory
            rows.append(
                {
                    "run": r.label,
                    "feedback": fb,
                    **{k: end[k] for k in ("own", "other", "none", "nearest_own", "dist_own", "spread", "tau")},
                    "converged": 1 - still_moving(chain[-2], chain[-1], binary).float().mean().item(),
                    "clean_start_own": clean["own"],
                    "clean_start_dist_own": clean["dist_own"],
                    "clean_start_dist_1": classify_end_points(clean_chain[1], x, binary)["dist_own"],
                    "prior_own": empty["own"],
                    "prior_nearest_own": empty["nearest_own"],
                    "prior_dist_own": empty["dist_own"],
                    "energy_first": cur["energy"][0] if cur["energy"] else float("nan"),
                    "energy_last": cur["energy"][-1] if cur["energy"] else float("nan"),
                    "energy_monotone": (
                        all(b <= a + 1e-6 for a, b in zip(cur["energy"], cur["energy"][1:], strict=False))
                        if cur["energy"]
                        else None
                    ),
                    "read_nll_first": cur["read_nll"][0],
                    "read_nll_last": cur["read_nll"][-1],
                    "dist_own_by_step": cur["dist_own"],
                }
            )
            curves[key] = cur
    header = (
        f"**attractors** on {data} test images: {episodes} episodes of T={T} items (seed {seed}) written clean; "
        f"each chain starts at its item with {noise:g} of pixels flipped and reads {iters} times (feedback=mean: "
        "the read's mean image is fed back, KM Algorithm 1 / DKM's dynamics; threshold: thresholded at 0.5 first; "
        "sample: a Bernoulli draw from it). "
        "End point classes (fractions of chains): own / other = nearest stored item is its own / another one and "
        "within tau; none = no stored item within tau; tau = half the mean distance between a stored item and its "
        "nearest other item of the episode (distances: fraction of differing pixels, end point thresholded at "
        "0.5). dist to own: mean distance of the chain's point to its own stored item after 1 read and at the end. "
        "spread: mean pairwise distance of the end points / of the stored items (< 1: chains merged). "
        "converged: fraction of chains whose point (thresholded at 0.5) did not change in the last read, i.e. that "
        "sit on a fixed point of the dynamics. "
        "clean start: the same chains started from the clean items (dist 1 read: how far one read puts a stored "
        "item from itself, about the nearest a fixed point can be). prior memory: the same noisy chains reading from the "
        "model's prior memory, nothing written (what the chains do without the stored items). energy: DKM's own (-ELBO of the query at the "
        "means, nats/image); read NLL: -ln p(x | read(x)), nats/image, the proxy for every model. "
        f"The corrupted queries themselves: own {start['own']:.3f}, none {start['none']:.3f}, distance to own "
        f"{start['dist_own']:.3f}, tau {start['tau']:.3f}. Every chain ending on the all-black image would score own "
        f"{black['own']:.3f}, other {black['other']:.3f}, none {black['none']:.3f}, distance to own "
        f"{black['dist_own']:.3f}. Runs: " + _budget(runs) + "."
    )
    cols = [
        "run",
        "feedback",
        "own",
        "other",
        "none",
        "nearest is own",
        "dist to own: 1 read",
        "dist to own",
        "spread",
        "converged",
        "clean start: own",
        "clean start: dist 1 read",
        "clean start: dist",
        "prior memory: own / nearest is own / dist",
        "energy step 0 -> n",
        "read NLL step 0 -> n",
    ]
    trows = [
        [
            w["run"],
            w["feedback"],
            w["own"],
            w["other"],
            w["none"],
            w["nearest_own"],
            w["dist_own_by_step"][1],
            w["dist_own"],
            w["spread"],
            w["converged"],
            w["clean_start_own"],
            w["clean_start_dist_1"],
            w["clean_start_dist_own"],
            f"{w['prior_own']:.3f} / {w['prior_nearest_own']:.3f} / {w['prior_dist_own']:.3f}",
            "-"
            if math.isnan(w["energy_first"])
            else f"{w['energy_first']:.1f} -> {w['energy_last']:.1f}"
            + ("" if w["energy_monotone"] else " (not monotone)"),
            f"{w['read_nll_first']:.1f} -> {w['read_nll_last']:.1f}",
        ]
        for w in rows
    ]
    res = StudyResult("attractors", data, header, md_table(cols, trows), rows)
    if out is not None:
        plt = _plt()
        fig, ax = plt.subplots(2, 2, figsize=(13, max(9.0, 0.8 * (len(curves) + 1))))  # room for two-line bar labels
        labels = [k.replace(", feedback=", "\nfeedback=") for k in curves] + [
            "reference: every chain on\nthe all-black image"
        ]
        own = [w["own"] for w in rows] + [black["own"]]
        other = [w["other"] for w in rows] + [black["other"]]
        none = [w["none"] for w in rows] + [black["none"]]
        ypos = range(len(labels))
        ax[0, 0].barh(ypos, own, color="tab:green", label="own stored item")
        ax[0, 0].barh(ypos, other, left=own, color="tab:orange", label="another stored item")
        ax[0, 0].barh(
            ypos, none, left=[a + b for a, b in zip(own, other, strict=True)], color="tab:grey", label="no stored item"
        )
        ax[0, 0].set_yticks(list(ypos), labels, fontsize=8)
        ax[0, 0].invert_yaxis()
        ax[0, 0].set(
            xlabel=f"fraction of chains (end point after {iters} reads, within tau)",
            xlim=(0, 1),
            title="where the chains end",
        )
        ax[0, 0].legend(fontsize=8, loc="lower right")
        steps = list(range(iters + 1))
        run_colour: dict[str, str] = {}
        for k, cur in curves.items():
            ls = {"mean": "-", "threshold": "--"}.get(k.rsplit("=", 1)[-1], ":")
            col = run_colour.setdefault(k.rsplit(", feedback=", 1)[0], f"C{len(run_colour)}")
            ax[0, 1].plot(steps, cur["dist_own"], ls, color=col, label=k)
            ax[1, 1].plot(steps, cur["read_nll"], ls, color=col, label=k)
            if cur["energy"]:
                ax[1, 0].plot(steps, cur["energy"], ls, color=col, label=k)
        ax[0, 1].axhline(black["dist_own"], color="grey", lw=1, linestyle="-.", label="all-black image")
        ax[0, 1].axhline(start["tau"], color="black", lw=1, linestyle=":", label="tau")
        ax[0, 1].set(
            xlabel="read iteration (0 = corrupted query)",
            ylabel="distance to own stored item (fraction of pixels)",
            title="distance to the item the chain started from",
        )
        ax[1, 0].set(
            xlabel="read iteration (0 = corrupted query)",
            ylabel="energy (nats/image)",
            title="DKM energy: -ELBO of the query at the means",
        )
        if not any(cur["energy"] for cur in curves.values()):
            ax[1, 0].text(0.5, 0.5, "no model with an energy", ha="center", transform=ax[1, 0].transAxes)
        ax[1, 1].set(
            xlabel="read iteration (0 = corrupted query)",
            ylabel="-ln p(x | read(x)) (nats/image)",
            title="energy proxy for every model",
            yscale="log",
        )
        for a in (ax[0, 1], ax[1, 0], ax[1, 1]):
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.suptitle(
            f"Attractors on {data}: {episodes} episodes of T={T}, queries with {noise:g} pixel flips, {iters} reads"
        )
        fig.tight_layout()
        res.png = _savefig(fig, out / f"attractors_{data}.png")
    res.seconds = time.time() - t0
    return res
