"""The data sets by name and the files each reads with its default options; standard library only, so
`km data check` and `km --help` need neither torch nor Lightning (the data modules import both)."""

from __future__ import annotations

# binarized MNIST (static: Larochelle's fixed binarisation) and the grey MNIST training images (dynamic)
MNIST_NPZ = "binarized_mnist/binarized_mnist.npz"
MNIST_TRAIN_IMAGES = "MNIST/raw/train-images-idx3-ubyte.gz"
MNIST_TRAIN_LABELS = "MNIST/raw/train-labels-idx1-ubyte.gz"
OMNIGLOT_BACKGROUND = "omniglot/images_background.npz"
OMNIGLOT_EVALUATION = "omniglot/images_evaluation.npz"
CIFAR_TRAIN_SHARDS = [f"cifar10/train_{k}.npy.xz" for k in range(5)]
CIFAR_TEST_SHARD = "cifar10/test.npy.xz"
CIFAR_LABELS = "cifar10/labels.npz"

# name -> files read with the default options (a data module's `required_files()` may add some: MNIST's
# binarize=dynamic reads the grey training images too)
DEFAULT_FILES: dict[str, list[str]] = {
    "mnist": [MNIST_NPZ],
    "omniglot": [OMNIGLOT_BACKGROUND, OMNIGLOT_EVALUATION],
    "cifar10": [*CIFAR_TRAIN_SHARDS, CIFAR_TEST_SHARD, CIFAR_LABELS],
}
NAMES = sorted(DEFAULT_FILES)
