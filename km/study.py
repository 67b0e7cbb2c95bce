r"""Studies of what each paper says its memory does, measured on trained run directories (issue #18).

    km study capacity   RUN_DIR... [--T 8,16,32,64,128] [--noise 0.15] [--episodes 16]
    km study attractors RUN_DIR... [--T 32] [--noise 0.15] [--iters 20] [--episodes 8]
    km study oneshot    RUN_DIR... [--T 15] [--episodes 32] [--samples 10] [--iters 3]
    km study addressing RUN_DIR... [--T 32] [--episodes 16]
    km study allocation RUN_DIR... [--items 10000] [--shuffles 20]

Each study takes run directories (or checkpoints) of one data set, prints a markdown table whose header
states the protocol, the units, T and the budget, and writes a labelled PNG (and the table as .md and
.json) to `--out` (default: `study/` in the first run directory). Every number is measured on the test
split of the runs' data set, on images drawn with a fixed seed, so every model sees the same items.

Distances are per pixel on [0, 1] images: the "pixel error" of a grey read against a binary item is the
fraction of pixels wrong after thresholding the read at 0.5; "nearest" uses the mean absolute
difference (L1 per pixel; for a Bernoulli mean against a binary item, the expected fraction of wrong
pixels) unless a study says otherwise.

Every study is a function `NAME(runs, ...) -> StudyResult` on `StudyRun`s (a model plus its test
images), so the tests run them on tiny in-process models and on constructed memories with known answers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CORRUPTIONS = ("flip", "blank", "none")


class StudyError(ValueError):
    """Bad input to a study: one line for the user (the CLI prints it and exits with code 2)."""


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
@dataclass
class StudyRun:
    """A trained model and the test split it is measured on."""

    label: str  # short name in tables and legends, e.g. "km", "dkm_sampled"
    model: Any  # an EpisodeModel (or any object with write / read / mean_image / generate)
    x_test: Tensor  # (N, C, H, W) float in [0, 1]
    y_test: Tensor  # (N,) int64 class labels, -1 where unknown
    data: str = "?"  # data set name
    binary: bool = True  # Bernoulli likelihood (binary pixels)
    memory: str = "?"  # memory size, in words
    train_T: int = 0  # episode length it was trained on
    steps: int = 0  # optimiser steps of the loaded checkpoint
    run_dir: Path | None = None

    @property
    def model_name(self) -> str:
        return getattr(getattr(self.model, "cfg", None), "name", self.label)

    @property
    def has_memory(self) -> bool:
        return self.model_name != "vae" and not getattr(self.model, "no_memory", False)


def memory_size(model: Any) -> str:
    """The size of a model's memory, in words."""
    cfg = getattr(model, "cfg", None)
    name = getattr(cfg, "name", "?")
    if name == "vae":
        return "none"
    if name == "kpp":
        return f"{cfg.mem_channels}x{cfg.mem_size}x{cfg.mem_size} (C_m x S x S)"
    if name == "pkm":
        return f"{cfg.machines} x {cfg.memory_size // cfg.machines} slots x {cfg.code_dim}"
    if hasattr(cfg, "memory_size"):
        return f"{cfg.memory_size} slots x {cfg.code_dim}"
    return "?"


def run_label(cfg: Any) -> str:
    """cpu_dkm_sampled_mnist -> dkm_sampled; + ' (class)' for runs trained on class episodes."""
    name = str(cfg.name)
    data = str(cfg.data.name)
    if name.startswith("cpu_") or name.startswith("paper_"):
        name = name.split("_", 1)[1]
    if name.endswith("_" + data):
        name = name[: -len(data) - 1]
    if name in ("default", "demo", "?"):
        name = str(cfg.model.name)
    if cfg.model.name == "vae":
        return name
    return name + (" (class)" if str(cfg.data.episodes) == "class" else "")


_DATA_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def load_runs(targets: list[str]) -> list[StudyRun]:
    """Run dirs / checkpoints -> StudyRuns (the test split of each data set loaded once)."""
    from km.evaluate import load_run

    runs = []
    for t in targets:
        cfg, run_dir, _, dm, model = load_run(t)
        model.eval()
        key = (cfg.data.name, getattr(cfg.data, "image_size", None), str(dm.data_dir))
        if key not in _DATA_CACHE:
            dm.setup("test")
            n = len(dm.x["test"])
            batch = dm.get_batch("test", torch.arange(n)[None])
            _DATA_CACHE[key] = (batch["x"][0], batch["y"][0])
        x, y = _DATA_CACHE[key]
        runs.append(
            StudyRun(
                label=run_label(cfg),
                model=model,
                x_test=x,
                y_test=y,
                data=str(cfg.data.name),
                binary=dm.likelihood == "bernoulli",
                memory=memory_size(model),
                train_T=int(cfg.data.episode_length),
                steps=int(getattr(model, "checkpoint_step", 0)),
                run_dir=run_dir,
            )
        )
    return distinct_labels(runs)


def distinct_labels(runs: list[StudyRun]) -> list[StudyRun]:
    """Runs of one config are told apart by their run id ('dkm [dkm_mnist_qn15]'), checkpoints of one run by
    their step ('... @ step 920')."""
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1 and r.run_dir is not None:
            r.label = f"{r.label} [{r.run_dir.name}]"
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} @ step {r.steps}"
    return runs


def one_data_set(runs: list[StudyRun]) -> str:
    if not runs:
        raise StudyError("no runs given")
    data = sorted({r.data for r in runs})
    if len(data) > 1:
        raise StudyError(f"the runs are on {' and '.join(data)}: run the study once per data set")
    return data[0]


def memory_runs(runs: list[StudyRun], study: str) -> list[StudyRun]:
    """The runs that have a memory; a one-line error naming the first that has none."""
    for r in runs:
        if not r.has_memory:
            raise StudyError(
                f"{study}: run '{r.label}' ({r.run_dir or 'in-process'}) is a {r.model_name}, "
                "a model without a memory; this study measures memories (give KM, DKM, PKM or K++ runs)"
            )
    return runs


def check_noise(noise: float) -> None:
    if not 0 <= noise <= 1:
        raise StudyError(f"--noise {noise}: a corruption level (pixel flip probability) must be in [0, 1]")


def check_feedbacks(feedbacks: tuple[str, ...]) -> None:
    bad = [f for f in feedbacks if f not in FEEDBACKS]
    if bad or not feedbacks:
        raise StudyError(f"--feedback {','.join(feedbacks)}: each must be one of {', '.join(FEEDBACKS)}")


def check_items(T: int, episodes: int, n: int) -> None:
    if T < 1 or episodes < 1:
        raise StudyError(f"T={T} and episodes={episodes} must both be >= 1")
    if T * episodes > n:
        raise StudyError(
            f"T={T} x {episodes} episodes needs {T * episodes} distinct test images; the test split "
            f"has {n} (lower --T or --episodes)"
        )


def episodes_of(x: Tensor, T: int, episodes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`episodes` episodes of T distinct test images (B, T, C, H, W) and their indices (B, T); the first
    k * T indices of the permutation for every T, so the episodes of a smaller T are drawn from a subset."""
    check_items(T, episodes, len(x))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    idx = perm[: T * episodes].view(episodes, T)
    return x[idx], idx


# ---------------------------------------------------------------------------------------------
# shared measurements
# ---------------------------------------------------------------------------------------------
def corrupt_cues(x: Tensor, kind: str, noise: float, binary: bool, seed: int = 0) -> Tensor:
    """flip: each pixel flipped with probability `noise` (binary) or N(0, noise^2) added (8-bit);
    blank: the bottom half set to 0; none: the clean items."""
    from km.pictures import corrupt

    if kind == "flip":
        return corrupt(x, noise, binary, torch.Generator().manual_seed(seed))
    if kind == "blank":
        out = x.clone()
        out[..., x.shape[-2] // 2 :, :] = 0
        return out
    if kind == "none":
        return x.clone()
    raise StudyError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")


def l1_distances(a: Tensor, b: Tensor) -> Tensor:
    """a: (E, n, C, H, W), b: (E, m, C, H, W) -> (E, n, m) mean |a_i - b_j| per pixel."""
    return torch.cdist(a.flatten(2).double(), b.flatten(2).double(), p=1).float() / a[0, 0].numel()


def pixel_error(reads: Tensor, items: Tensor, binary: bool) -> Tensor:
    """(E, T) per item: fraction of pixels wrong at threshold 0.5 (binary) or mean |read - item|."""
    if binary:
        return ((reads > 0.5).float() != items).float().flatten(2).mean(-1)
    return (reads - items).abs().flatten(2).mean(-1)


def retrieval_scores(reads: Tensor, items: Tensor, binary: bool = True) -> dict[str, float]:
    """Reads (E, T, ...) of the stored items (E, T, ...): the mean pixel error against the item's own stored
    copy, and the retrieval accuracy: the fraction of reads nearer (L1 per pixel) to their own stored item
    than to any other item of the episode (ties count as misses). Chance is 1 / T."""
    d = l1_distances(reads, items)  # (E, T, T)
    own = d.diagonal(dim1=1, dim2=2)  # (E, T)
    others = d + torch.diag_embed(torch.full_like(own, float("inf")))
    hit = own < others.min(-1).values if items.shape[1] > 1 else torch.ones_like(own, dtype=torch.bool)
    return {
        "pixel_error": pixel_error(reads, items, binary).mean().item(),
        "l1": own.mean().item(),
        "accuracy": hit.float().mean().item(),
    }


FEEDBACKS = ("mean", "threshold", "sample")


@torch.no_grad()
def iterate_reads(
    model: Any, cues: Tensor, memory: Any, iters: int, feedback: str = "mean", seed: int = 0
) -> list[Tensor]:
    """[cues, read 1, ..., read n]: each read's mean image is fed back (`feedback='threshold'`: thresholded
    at 0.5 first, a clean-up nonlinearity as in a Hopfield net; 'sample': a Bernoulli draw from it, seeded, the
    kind of noisy binary query `model.query_noise` trains DKM on); the chain's reported points stay the means."""
    chain, x = [cues], cues
    gen = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        mean = model.mean_image(model.read(x, memory))
        chain.append(mean)
        if feedback == "threshold":
            x = (mean > 0.5).float()
        elif feedback == "sample":
            x = torch.bernoulli(mean.clamp(0, 1), generator=gen)
        else:
            x = mean
    return chain


@torch.no_grad()
def prior_read(model: Any, x: Tensor, memory: Any) -> Tensor | None:
    """KM and PKM: decoder params of the memory's own read, the mean of p(z | y, M) = w^T R at the addresses
    of x (PKM: sum_p pi_p w_p^T R_p), with no bottom-up correction. None for the other models, whose `read`
    is already the memory's (DKM: mu_w^T R; K++: the mean of p(z | M, Y))."""
    name = getattr(getattr(model, "cfg", None), "name", "")
    if name not in ("km", "pkm") or memory is None:
        return None
    e = model.encode_images(x)
    w = model.address(model.posterior_y(e)[0])
    if name == "pkm":
        r = model._combine(model.machine_weights(e), w @ memory.R)
    else:
        r = w @ memory.R
    return model.decode_codes(r)


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class StudyResult:
    name: str
    data: str
    header: str  # protocol, units, T, budget
    table: str  # markdown
    rows: list[dict[str, Any]] = field(default_factory=list)
    png: Path | None = None
    seconds: float = 0.0

    def text(self) -> str:
        return f"{self.header}\n\n{self.table}\n"

    def save(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        md = out / f"{self.name}_{self.data}.md"
        md.write_text(self.text())
        js = out / f"{self.name}_{self.data}.json"
        js.write_text(
            json.dumps(
                {
                    "study": self.name,
                    "data": self.data,
                    "header": self.header,
                    "rows": self.rows,
                    "seconds": round(self.seconds, 1),
                },
                indent=1,
                default=str,
            )
        )
        return [md, js]


def _budget(runs: list[StudyRun]) -> str:
    parts = [f"{r.label}: {r.steps} steps, trained at T={r.train_T}, memory {r.memory}" for r in runs]
    return "; ".join(parts)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    header = (
        f"**capacity** on {data} test images: {episodes} episodes of T distinct items per T (seed {seed}), "
        f"each written to a fresh memory; every item cued with a corrupted copy ("
        + ", ".join(
            {
                "flip": f"flip: {noise:g} of pixels flipped",
                "blank": "blank: bottom half set to 0",
                "none": "none: the clean item",
            }[c]
            for c in corruptions
        )
        + f"), read {iters}x. pixel error: fraction of pixels wrong (read thresholded at 0.5) against the "
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
            what = {"flip": f"{noise:g} pixel flips", "blank": "bottom half blanked", "none": "clean cue"}[c]
            axes[0, j].set(title=f"cue: {what}", ylabel="retrieval pixel error (fraction of pixels)", xscale="log")
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


def _savefig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")  # long row labels stay inside the picture
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as im:  # a 256-colour palette: the figures are 3-4x smaller, no visible change
        small = im.convert("RGB").quantize(256)
    small.save(path, optimize=True)
    return path


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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
# the options of `km study` are in km/cli.py (the parser must not import torch)
STUDIES: dict[str, Callable[..., StudyResult]] = {
    "capacity": capacity,
    "attractors": attractors,
    "oneshot": oneshot,
    "addressing": addressing,
    "allocation": allocation,
}


def run_study(name: str, runs: list[StudyRun], out: Path, tag: str | None = None, **kw: Any):
    """Run study `name` and save its figure and table into `out`: (result, table files). With a tag every file
    is named `<study>_<data>_<tag>.*`; the figure is drawn in a scratch folder first, so an untagged figure of
    the same study already in `out` is never overwritten."""
    import shutil
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        res = STUDIES[name](runs, out=Path(scratch) if tag else out, **kw)
        if tag:  # e.g. attractors_mnist.png -> attractors_mnist_dkm.png
            res.data = f"{res.data}_{tag}"
            if res.png:
                res.png = Path(shutil.move(res.png, out / f"{res.png.stem}_{tag}{res.png.suffix}"))
    return res, res.save(out)


def main(args: Any) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    check_noise(args.noise)
    kw: dict[str, Any] = {"seed": args.seed}
    if args.T is not None:
        try:
            Ts = tuple(int(t) for t in str(args.T).split(","))
        except ValueError:
            raise StudyError(f"--T {args.T}: give an integer (capacity: a comma-separated list)") from None
        if args.study == "capacity":
            kw["Ts"] = Ts
        elif args.study != "allocation":
            kw["T"] = Ts[0]
    if args.study in ("capacity", "attractors"):
        kw["noise"] = args.noise
    if args.episodes is not None and args.study != "allocation":
        kw["episodes"] = args.episodes
    if args.iters is not None and args.study in ("capacity", "attractors", "oneshot"):
        kw["iters"] = args.iters
    if args.study == "attractors":  # checked here too, before any run is loaded
        kw["feedbacks"] = tuple(f.strip() for f in str(getattr(args, "feedback", "mean,threshold")).split(","))
        check_feedbacks(kw["feedbacks"])
    if args.study == "oneshot":
        kw["samples"] = args.samples
    if args.study == "allocation":
        kw["items"] = args.items
    runs = load_runs(args.runs)
    out = Path(args.out) if args.out else (runs[0].run_dir / "study" if runs[0].run_dir else Path("study"))
    res, files = run_study(args.study, runs, out, getattr(args, "tag", None), **kw)
    print(res.text())
    if res.png:
        print(f"figure: {res.png}")
    print(f"table: {files[0]}  ({res.seconds:.0f} s)")
