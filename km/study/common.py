"""What every study shares: StudyRun (a model and its test split), loading runs, the input checks, the
measurements several studies use (corrupted cues, retrieval scores, iterated reads), StudyResult and the figures."""

from __future__ import annotations

import json
import math
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
        """Asked of the model (`episodic`: it writes an episode to a memory), not read off its name."""
        return bool(getattr(self.model, "episodic", True)) and not getattr(self.model, "no_memory", False)


def memory_size(model: Any) -> str:
    """The size of a model's memory, in words: the model's own `describe_memory()` (EpisodeModel)."""
    describe = getattr(model, "describe_memory", None)
    return describe() if callable(describe) else "?"


def run_label(cfg: Any, has_memory: bool = True) -> str:
    """cpu_dkm_sampled_mnist -> dkm_sampled; + ' (class)' for memory runs trained on class episodes."""
    name = str(cfg.name)
    data = str(cfg.data.name)
    if name.startswith("cpu_") or name.startswith("paper_"):
        name = name.split("_", 1)[1]
    if name.endswith("_" + data):
        name = name[: -len(data) - 1]
    if name in ("default", "demo", "?"):
        name = str(cfg.model.name)
    if not has_memory:
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
                label=run_label(cfg, bool(getattr(model, "episodic", True))),
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
        raise StudyError(
            f"--noise {noise}: a corruption level (pixel flip probability, or noise std on colour data) must be in [0, 1]"
        )


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
    """Decoder params of the memory's own read at the addresses of x, with no bottom-up correction: the model's
    `memory_read` (KM: w^T R, the mean of p(z | y, M); PKM: sum_p pi_p w_p^T R_p). None where a model has none
    (its `read` is already the memory's: DKM mu_w^T R, K++ the mean of p(z | M, Y), GPM w_hat^T M_hat)."""
    read = getattr(model, "memory_read", None)
    if memory is None or not callable(read):
        return None
    return read(x, memory)


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
