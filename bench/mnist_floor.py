"""How near can a smooth model's read come to a binarised MNIST digit? The binarisation noise floor.

    python bench/mnist_floor.py [--data DIR]     # default: KM_DATA_DIR (the raw grey MNIST test set is read)

Binarised MNIST (Larochelle & Murray) draws every pixel of a grey MNIST digit g as Bernoulli(g). A model that
gives back the ideal digit, g thresholded at 0.5, still differs from the binarised item in the pixels the draw
flipped: in expectation min(g, 1 - g) per pixel. A model can only come nearer by memorising each item's own draw.
This is the floor beside the attractor study's distances (docs/results.md, study 2; the study thresholds every
read at 0.5 and counts differing pixels). Printed for the grey MNIST test set (10,000 digits):

    floor          mean over pixels and digits of min(g, 1 - g): expected distance, binarised digit to ideal digit
    two draws      mean of 2 g (1 - g): expected distance between two binarisations of one digit
"""

from __future__ import annotations

import argparse

import numpy as np

from datamodules.mnist import read_idx
from datamodules.paths import DataError, resolve_data_dir
from km.cli import fail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="data root holding MNIST/raw (default: KM_DATA_DIR, ../shared/data)")
    a = p.parse_args()
    try:
        f = resolve_data_dir(a.data) / "MNIST/raw/t10k-images-idx3-ubyte.gz"
    except DataError as e:
        fail(str(e))
    if not f.is_file():
        fail(f"{f} not found (the grey MNIST test set; point --data or KM_DATA_DIR at the data)")
    g = read_idx(f).reshape(-1, 784) / 255.0
    print(f"grey MNIST test digits: {len(g)}")
    print(f"floor (binarised digit vs ideal digit, fraction of pixels): {np.minimum(g, 1 - g).mean():.4f}")
    print(f"two draws of one digit differ by (fraction of pixels):      {(2 * g * (1 - g)).mean():.4f}")


if __name__ == "__main__":
    main()
