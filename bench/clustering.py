"""Does a Product Kanerva Machine cluster its items? Dominant machine vs class, against chance.

Run:  python bench/clustering.py RUN_DIR [RUN_DIR ...] [--items 10000] [--shuffles 20]

For each trained PKM run: every labelled test item's machine weights pi (the items are encoded one at a
time, no episode context), its dominant machine argmax pi, and the agreement of that assignment with
the class: adjusted Rand index (chance = 0), normalised mutual information and purity (fraction of
items whose machine's majority class is theirs). The chance row assigns the same machine-usage counts
at random (the dominant machines, shuffled; mean over --shuffles draws).

Labels: MNIST's static binarised test split has none, so MNIST runs use the 10,000 MNIST test
images (``MNIST/raw/t10k-*``) binarised by Bernoulli(grey / 255) with seed 0, the same recipe as the
static split; Omniglot runs use their own test split (labels: the character, 659 classes).
Measurements only, no asserts.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from datamodules.base import bernoulli_fixed
from datamodules.mnist import read_idx
from datamodules.paths import DataFiles
from km.evaluate import load_run


def purity(assign: np.ndarray, labels: np.ndarray) -> float:
    total = 0
    for m in np.unique(assign):
        total += np.bincount(labels[assign == m]).max()
    return total / len(labels)


def labelled_items(cfg, dm) -> tuple[torch.Tensor, np.ndarray]:
    if cfg.data.name == "mnist":
        files = DataFiles("mnist", cfg.data.data_dir)
        grey = torch.from_numpy(files.load("MNIST/raw/t10k-images-idx3-ubyte.gz", read_idx).copy()).float() / 255
        labels = files.load("MNIST/raw/t10k-labels-idx1-ubyte.gz", read_idx).astype(np.int64)
        return bernoulli_fixed(grey.unsqueeze(1)).float(), labels
    dm.setup("test")
    return dm.x["test"].float() / (255.0 if dm.x["test"].max() > 1 else 1.0), dm.y["test"].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--shuffles", type=int, default=20)
    args = parser.parse_args()
    table = Table(title="PKM: dominant machine vs class on labelled test items")
    for col in (
        "run",
        "data",
        "P",
        "items",
        "classes",
        "machines used",
        "ARI",
        "NMI",
        "purity",
        "chance ARI",
        "chance NMI",
        "chance purity",
    ):
        table.add_column(col, justify="right")
    for run in args.runs:
        cfg, _, _, dm, model = load_run(run)
        if not hasattr(model, "item_machines"):
            print(f"{run}: model {cfg.model.name} has a single memory; skipped")
            continue
        model.eval()
        x, labels = labelled_items(cfg, dm)
        x, labels = x[: args.items], labels[: args.items]
        with torch.no_grad():
            pi = torch.cat([model.item_machines(chunk[None])[0] for chunk in x.split(500)])  # (N, P)
        assign = pi.argmax(-1).numpy()
        rng = np.random.default_rng(0)
        chance = [
            (adjusted_rand_score(labels, s), normalized_mutual_info_score(labels, s), purity(s, labels))
            for s in (rng.permutation(assign) for _ in range(args.shuffles))
        ]
        c = np.mean(chance, axis=0)
        table.add_row(
            str(run),
            cfg.data.name,
            str(cfg.model.machines),
            str(len(labels)),
            str(len(np.unique(labels))),
            str(len(np.unique(assign))),
            f"{adjusted_rand_score(labels, assign):.4f}",
            f"{normalized_mutual_info_score(labels, assign):.4f}",
            f"{purity(assign, labels):.4f}",
            f"{c[0]:.4f}",
            f"{c[1]:.4f}",
            f"{c[2]:.4f}",
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
