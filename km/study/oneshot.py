"""Study 5, one-shot generation: samples of a memory written from one class, against the prior's."""

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
    iterate_reads,
    md_table,
    one_data_set,
)


# ---------------------------------------------------------------------------------------------
# 5. one-shot generation
# ---------------------------------------------------------------------------------------------
def class_episodes(y: Tensor, T: int, episodes: int, seed: int = 0) -> list[tuple[int, Tensor]]:
    """`episodes` one-class episodes: (class, the indices of T of its items), classes drawn without
    replacement among those with more than T items (so at least one item of the class stays unwritten)."""
    counts = torch.bincount(y[y >= 0])
    eligible = (counts > T).nonzero().flatten()
    if len(eligible) == 0:
        raise StudyError(
            f"no class of the test split has more than T={T} items (largest: "
            f"{int(counts.max()) if len(counts) else 0}); lower --T"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = eligible[torch.randperm(len(eligible), generator=g)]
    chosen = chosen.repeat(math.ceil(episodes / len(chosen)))[:episodes]
    out = []
    for c in chosen.tolist():
        members = (y == c).nonzero().flatten()
        out.append((c, members[torch.randperm(len(members), generator=g)[:T]]))
    return out


def nearest_class_fractions(
    samples: Tensor, classes: Tensor, written: Tensor, x_test: Tensor, y_test: Tensor, chunk: int = 512
) -> dict[str, float]:
    """samples (E, n, ...), classes (E,), written (E, T) test indices written to each memory.
    in_class: fraction of samples whose nearest test image (L2 on pixels) has the episode's class;
    in_class_unwritten: the same with the episode's written items left out of the search (so only new
    drawings of the class can count)."""
    E, n = samples.shape[:2]
    flat_test = x_test.flatten(1).float()
    hits, hits_new = 0, 0
    for e in range(E):
        d = torch.cdist(samples[e].flatten(1).float(), flat_test)  # (n, N)
        hits += (y_test[d.argmin(-1)] == classes[e]).sum().item()
        d[:, written[e]] = float("inf")
        hits_new += (y_test[d.argmin(-1)] == classes[e]).sum().item()
    return {"in_class": hits / (E * n), "in_class_unwritten": hits_new / (E * n)}


@torch.no_grad()
def oneshot(
    runs: list[StudyRun],
    T: int = 15,
    episodes: int = 32,
    samples: int = 10,
    iters: int = 3,
    seed: int = 0,
    out: Path | None = None,
    columns: int = 10,
) -> StudyResult:
    """Write one-class episodes (T items of one class), draw samples from the memory and from the prior;
    the fraction whose nearest test image belongs to the conditioning class, and a labelled grid."""
    t0 = time.time()
    data = one_data_set(runs)
    if samples < 1 or episodes < 1:
        raise StudyError("--samples and --episodes must be >= 1")
    if iters < 0:
        raise StudyError(f"--iters {iters}: must be >= 0")
    x_all, y_all = runs[0].x_test, runs[0].y_test
    if bool((y_all < 0).all()):
        raise StudyError(f"oneshot: the {data} test split has no class labels")
    eps = class_episodes(y_all, T, episodes, seed)
    classes = torch.tensor([c for c, _ in eps])
    written = torch.stack([i for _, i in eps])  # (E, T)
    x = x_all[written]  # (E, T, C, H, W)
    counts = torch.bincount(y_all[y_all >= 0])
    chance = (counts[classes].float() / (y_all >= 0).sum()).mean().item()
    rows: list[dict[str, Any]] = []
    grids = []
    for r in runs:
        torch.manual_seed(seed)
        memory = r.model.write(x)
        mem_s = r.model.generate(memory, samples, batch=len(eps)) if memory is not None else None
        torch.manual_seed(seed + 1)
        prior_s = r.model.generate(None, samples, batch=len(eps))
        read_s = iterate_reads(r.model, mem_s, memory, iters)[-1] if (mem_s is not None and iters) else None
        row: dict[str, Any] = {"run": r.label, "memory_size": r.memory}
        for name, s in (("memory", mem_s), (f"memory+{iters} reads", read_s), ("prior", prior_s)):
            if s is None:
                row[name] = {"in_class": float("nan"), "in_class_unwritten": float("nan")}
                continue
            row[name] = nearest_class_fractions(s, classes, written, x_all, y_all)
        rows.append(row)
        grids.append(
            (
                r.label,
                x[0, :columns],
                None if mem_s is None else mem_s[0, :columns],
                None if read_s is None else read_s[0, :columns],
                prior_s[0, :columns],
            )
        )
    reads_key = f"memory+{iters} reads"
    header = (
        f"**one-shot generation** on {data}: {len(eps)} one-class test episodes of T={T} items each (classes with "
        f"more than T test items, drawn without replacement, seed {seed}); {samples} samples per episode from the "
        f"memory written from the episode (memory+{iters} reads: the same samples after {iters} iterative reads, "
        "as the KM paper shows them) and from the prior memory. in class: fraction of samples whose nearest test "
        "image (L2 on pixels, all test images) belongs to the episode's class; new drawing: the same with the "
        f"episode's {T} written items left out of the search. Chance (a random test image's class): {chance:.4f}. "
        "A model without a memory has no memory samples. Runs: " + _budget(runs) + "."
    )
    cols = [
        "run",
        "memory size",
        "memory: in class",
        "memory: new drawing",
        f"{reads_key}: in class",
        f"{reads_key}: new drawing",
        "prior: in class",
        "prior: new drawing",
    ]
    trows = []
    for w in rows:
        m, rd, p = w["memory"], w[reads_key], w["prior"]
        trows.append(
            [
                w["run"],
                w["memory_size"],
                m["in_class"],
                m["in_class_unwritten"],
                rd["in_class"],
                rd["in_class_unwritten"],
                p["in_class"],
                p["in_class_unwritten"],
            ]
        )
    res = StudyResult("oneshot", data, header, md_table(cols, trows), rows)
    if out is not None:
        plt = _plt()
        strips = [(f"written episode\n(one class, {columns} of T={T})", grids[0][1])]
        for label, _, ms, rs, ps in grids:
            strips += [
                (f"{label}\nfrom memory", ms),
                (f"{label}\nafter {iters} reads", rs),
                (f"{label}\nfrom prior", ps),
            ]
        strips = [(name, imgs) for name, imgs in strips if imgs is not None]
        fig, axes = plt.subplots(len(strips), 1, figsize=(columns * 0.9 + 2.5, len(strips) * 1.05 + 0.8), squeeze=False)
        for (name, imgs), a in zip(strips, axes[:, 0], strict=True):
            strip = torch.cat([torch.nn.functional.pad(im[0], (1, 1, 1, 1), value=0.5) for im in imgs.float()], 1)
            a.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            a.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(
            f"One-shot generation on {data}: the written episode (first test episode), then per model\n"
            f"samples from its memory, the same after {iters} iterative reads, and samples from the prior",
            fontsize=9,
        )
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        res.png = _savefig(fig, out / f"oneshot_{data}.png")
    res.seconds = time.time() - t0
    return res
