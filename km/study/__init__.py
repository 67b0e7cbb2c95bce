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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from km.study.addressing import (  # noqa: F401 - re-exported
    address_spread,
    addressing,
)
from km.study.allocation import (  # noqa: F401 - re-exported
    allocation,
    clustering_scores,
    purity,
    weight_sparsity,
)
from km.study.attractors import (  # noqa: F401 - re-exported
    attractors,
    classify_end_points,
    read_nll,
    still_moving,
)
from km.study.capacity import (  # noqa: F401 - re-exported
    capacity,
)
from km.study.common import (  # noqa: F401 - re-exported
    CORRUPTIONS,
    FEEDBACKS,
    StudyError,
    StudyResult,
    StudyRun,
    _budget,
    _plt,
    _savefig,
    check_feedbacks,
    check_items,
    check_noise,
    corrupt_cues,
    distinct_labels,
    episodes_of,
    iterate_reads,
    l1_distances,
    load_runs,
    md_table,
    memory_runs,
    memory_size,
    one_data_set,
    pixel_error,
    prior_read,
    retrieval_scores,
    run_label,
)
from km.study.oneshot import (  # noqa: F401 - re-exported
    class_episodes,
    nearest_class_fractions,
    oneshot,
)
from km.threads import torch_threads

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
    with torch_threads(args.threads):  # the caller's count is put back (a study run in-process)
        _main(args)


def _main(args: Any) -> None:
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
