"""Study 1, capacity: store T items, cue each with a corrupted copy, read; retrieval error and accuracy against T."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from km.study.common import (
    CORRUPTIONS,
    StudyError,
    StudyResult,
    StudyRun,
    _budget,
    _plt,
    _savefig,
    check_items,
    check_noise,
    corrupt_cues,
    episodes_of,
    iterate_reads,
    md_table,
    one_data_set,
    prior_read,
    retrieval_scores,
)


# ---------------------------------------------------------------------------------------------
# 1. capacity
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def capacity(
    runs: list[StudyRun],
    Ts: tuple[int, ...] = (8, 16, 32, 64, 128),
    episodes: int = 16,
    noise: float = 0.15,
    corruptions: tuple[str, ...] = ("flip", "blank", "none"),
    iters: int = 1,
    seed: int = 0,
    out: Path | None = None,
) -> StudyResult:
    """Store T items, cue each with a corrupted copy, read `iters` times; retrieval error and accuracy vs T.

    Models without a memory (the VAE) read the cue on their own (reconstruct again): the no-memory line.
    The 'query' row scores the corrupted cue itself (no model)."""
    t0 = time.time()
    data = one_data_set(runs)
    check_noise(noise)
    if not any(r.has_memory for r in runs):
        raise StudyError(
            "capacity: every run given is a model without a memory; give at least one KM, DKM, PKM "
            "or K++ run (a VAE run is the no-memory line beside them)"
        )
    for c in corruptions:
        if c not in CORRUPTIONS:
            raise StudyError(f"unknown corruption {c!r}; valid: {', '.join(CORRUPTIONS)}")
    if iters < 1:
        raise StudyError(f"--iters {iters}: the number of reads must be >= 1")
    x_all, binary = runs[0].x_test, runs[0].binary
    for T in Ts:
        check_items(T, episodes, len(x_all))
    rows: list[dict[str, Any]] = []
    for T in Ts:
        x, _ = episodes_of(x_all, T, episodes, seed)
        for c in corruptions:
            cues = corrupt_cues(x, c, noise, binary, seed + 1)
            rows.append(
                {
                    "model": "query (no read)",
                    "memory": "-",
                    "corruption": c,
                    "T": T,
                    **retrieval_scores(cues, x, binary),
                    "chance": 1 / T,
                }
            )
            for r in runs:
                torch.manual_seed(seed)
                memory = r.model.write(x)
                reads = iterate_reads(r.model, cues, memory, iters)[-1]
                rows.append(
                    {
                        "model": r.label + ("" if r.has_memory else " (no memory)"),
                        "memory": r.memory,
                        "corruption": c,
                        "T": T,
                        **retrieval_scores(reads, x, binary),
                        "chance": 1 / T,
                    }
                )
                if not r.has_memory:
                    continue
                empty = iterate_reads(r.model, cues, None, iters)[-1]  # the same model, its prior memory
                rows.append(
                    {
                        "model": r.label + ", prior memory",
                        "memory": r.memory,
                        "corruption": c,
                        "T": T,
                        **retrieval_scores(empty, x, binary),
                        "chance": 1 / T,
                    }
                )
                if iters == 1 and (pr := prior_read(r.model, cues, memory)) is not None:
                    rows.append(
                        {
                            "model": r.label + ", w^T M read",
                            "memory": r.memory,
                            "corruption": c,
                            "T": T,
                            **retrieval_scores(r.model.mean_image(pr), x, binary),
                            "chance": 1 / T,
                        }
                    )
    flip_text = (
        f"flip: {noise:g} of pixels flipped"
        if binary
        else f"noise: N(0, {noise:g}^2) added to every sub-pixel, clamped to [0, 1]"
    )
    error_text = (
        "pixel error: fraction of pixels wrong (read thresholded at 0.5)"
        if binary
        else "pixel error: mean |read - item| per sub-pixel (intensities in [0, 1]; colour data has no threshold)"
    )
    header = (
        f"**capacity** on {data} test images: {episodes} episodes of T distinct items per T (seed {seed}), "
        f"each written to a fresh memory; every item cued with a corrupted copy ("
        + ", ".join(
            {
                "flip": flip_text,
                "blank": "blank: bottom half set to 0",
                "none": "none: the clean item",
            }[c]
            for c in corruptions
        )
        + f"), read {iters}x. {error_text} against the "
        "item's own stored copy; accuracy: fraction of reads nearer (L1/pixel) to their own item than to any "
        "other item of the episode (chance 1/T). 'query (no read)': the corrupted cue itself. KM and PKM read "
        "through q(z | x, y, M), which also sees the cue bottom-up; their 'w^T M read' rows decode the memory's "
        "own read, the mean of p(z | y, M), instead. 'prior memory' rows: the same model reading the same cues from its "
        "prior memory, nothing written (the memory's gain is the difference). Runs: " + _budget(runs) + "."
    )
    models = list(dict.fromkeys(row["model"] for row in rows))
    cols = ["model", "memory", "corruption"] + [f"T={T} err / acc" for T in Ts]
    trows = []
    for c in corruptions:
        for m in models:
            sel = {row["T"]: row for row in rows if row["model"] == m and row["corruption"] == c}
            trows.append(
                [m, next(iter(sel.values()))["memory"], c]
                + [f"{sel[T]['pixel_error']:.3f} / {sel[T]['accuracy']:.3f}" for T in Ts]
            )
    trows.append(["chance accuracy", "-", "-"] + [f"- / {1 / T:.3f}" for T in Ts])
    res = StudyResult("capacity", data, header, md_table(cols, trows), rows)
    if out is not None:
        plt = _plt()
        fig, axes = plt.subplots(2, len(corruptions), figsize=(5.5 * len(corruptions), 8), squeeze=False)
        colours: dict[str, str] = {}
        for j, c in enumerate(corruptions):
            for m in models:
                sel = sorted(
                    (row for row in rows if row["model"] == m and row["corruption"] == c), key=lambda r: r["T"]
                )
                base = m.split(",")[0]
                colour = (
                    "grey"
                    if m.startswith("query") or "no memory" in m
                    else colours.setdefault(base, f"C{len(colours)}")
                )
                if m.startswith("query"):
                    style = {"linestyle": ":", "color": "grey"}
                elif "no memory" in m:
                    style = {"linestyle": "--", "color": "black"}
                elif m.endswith("prior memory"):
                    style = {"linestyle": "--", "color": colour, "lw": 1}
                elif m.endswith("w^T M read"):
                    style = {"linestyle": ":", "marker": "x", "color": colour}
                else:
                    style = {"marker": "o", "color": colour}
                for i, key in enumerate(("pixel_error", "accuracy")):
                    axes[i, j].plot([s["T"] for s in sel], [s[key] for s in sel], label=m, **style)
            axes[1, j].plot(Ts, [1 / T for T in Ts], color="black", linestyle="-.", lw=1, label="chance (1/T)")
            flips = f"{noise:g} pixel flips" if binary else f"Gaussian noise, std {noise:g}"
            what = {"flip": flips, "blank": "bottom half blanked", "none": "clean cue"}[c]
            err_label = "(fraction of pixels)" if binary else "(mean |read - item| per sub-pixel)"
            axes[0, j].set(title=f"cue: {what}", ylabel=f"retrieval pixel error {err_label}", xscale="log")
            axes[1, j].set(
                xlabel="items stored T (log scale)",
                ylabel="retrieval accuracy (fraction of items)",
                xscale="log",
                ylim=(-0.02, 1.02),
            )
            for i in range(2):
                axes[i, j].minorticks_off()
                axes[i, j].set_xticks(list(Ts), [str(T) for T in Ts])
                axes[i, j].grid(alpha=0.3)
        axes[1, -1].legend(fontsize=8, loc="best")
        fig.suptitle(
            f"Capacity on {data}: {episodes} episodes per T, {iters} read(s); lower error, higher accuracy is better"
        )
        fig.tight_layout()
        res.png = _savefig(fig, out / f"capacity_{data}.png")
    res.seconds = time.time() - t0
    return res
