"""Tests of datamodules/: real data from the resolved data dir, plus synthetic conversion inputs."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules
from datamodules import (
    DATAMODULES,
    CIFAR10DataModule,
    DataError,
    MNISTDataModule,
    OmniglotDataModule,
    build_datamodule,
    paths,
    resolve_data_dir,
)
from datamodules.cifar10 import cached_shard, read_shard
from datamodules.download import cifar_files, download, pack_omniglot, parse_amat, record_in_manifest, save_npy_xz
from datamodules.episodes import EpisodeLoader
from datamodules.mnist import NPZ

SIZES = {
    "mnist": (50_000, 10_000, 10_000),
    "omniglot": (19_280 - 1000, 1000, 13_180),
    "cifar10": (45_000, 5000, 10_000),
}


@pytest.fixture(scope="session")
def data_root() -> Path:
    try:
        return resolve_data_dir(None)
    except DataError as err:
        pytest.skip(f"real data not available: {err}")


@pytest.fixture(scope="module")
def loaded(data_root):
    """One set-up datamodule per data set (loaded lazily, shared by the module)."""
    cache: dict[str, datamodules.InMemoryDataModule] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_datamodule(name)
            cache[name].setup("fit")
        return cache[name]

    return get


def all_idx(loader) -> list[torch.Tensor]:
    return [batch["idx"] for batch in loader]


# --- construction -----------------------------------------------------------------------


def test_construction_needs_no_data():
    assert set(DATAMODULES) == {"mnist", "omniglot", "cifar10"}
    for name, shape, lik in [("mnist", (1, 28, 28), "bernoulli"), ("cifar10", (3, 32, 32), "logistic")]:
        dm = build_datamodule(name, data_dir="/nonexistent")
        assert (dm.name, dm.image_shape, dm.likelihood) == (name, shape, lik)
    assert OmniglotDataModule(image_size=32, data_dir="/nonexistent").image_shape == (1, 32, 32)
    with pytest.raises(ValueError):
        build_datamodule("svhn")
    with pytest.raises(ValueError):
        MNISTDataModule(binarize="sometimes")
    with pytest.raises(ValueError):
        CIFAR10DataModule(episodes="random")
    with pytest.raises(TypeError):
        CIFAR10DataModule(binarize="dynamic")


# --- real data ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "omniglot", "cifar10"])
def test_splits_and_batches(loaded, name):
    dm = loaded(name)
    for split, n in zip(("train", "val", "test"), SIZES[name], strict=True):
        x, y = dm.x[split], dm.y[split]
        assert x.dtype == torch.uint8 and x.shape == (n, *dm.image_shape)
        assert y.dtype == torch.int64 and y.shape == (n,)
        assert int(x.max()) == (1 if dm.likelihood == "bernoulli" else 255)
        batch = next(iter(dm.episodes(split)))
        assert batch["split"] == split and batch["idx"].shape == (16, 32) and batch["idx"].dtype == torch.int64
        out = dm.get_batch(split, batch["idx"])
        assert out["x"].dtype == torch.float32 and out["x"].shape == (16, 32, *dm.image_shape)
        assert torch.equal(out["y"], y[batch["idx"]])
        if dm.likelihood == "bernoulli":
            assert set(out["x"].unique().tolist()) <= {0.0, 1.0}
        else:
            assert 0 <= out["x"].min() and out["x"].max() <= 1 and len(out["x"].unique()) > 2
    if name == "mnist":
        assert (dm.y["train"] == -1).all()  # no labels in the Larochelle arrays
    if name == "omniglot":
        assert dm.y["test"].min() == 964 and dm.y["train"].max() < 964


def test_iid_epoch_has_no_repeats_and_counts(loaded):
    dm = loaded("mnist")
    loader = dm.train_dataloader()
    idx = torch.cat(all_idx(loader))  # (n_batches * B, T)
    assert len(loader) == 50_000 // 32 // 16 == len(idx) // 16
    assert len(idx.unique()) == idx.numel()
    assert len(build_datamodule("mnist", train_episodes_per_epoch=64).train_dataloader()) == 4


def test_train_order_seed_and_epoch():
    def loader(seed: int = 0) -> EpisodeLoader:
        return EpisodeLoader("train", 5000, 32, 16, train=True, seed=seed)

    first, again = loader().epoch_batches(0), loader().epoch_batches(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(loader().epoch_batches(1)[0], first[0])
    assert not torch.equal(loader(seed=1).epoch_batches(0)[0], first[0])
    counting = loader()  # no set_epoch: each __iter__ is the next epoch
    assert torch.equal(all_idx(counting)[0], first[0])
    assert torch.equal(all_idx(counting)[0], loader().epoch_batches(1)[0])
    counting.set_epoch(7)
    assert torch.equal(all_idx(counting)[0], loader().epoch_batches(7)[0])
    driven = EpisodeLoader("train", 5000, 32, 16, train=True, epoch_fn=lambda: 3)
    assert torch.equal(all_idx(driven)[0], all_idx(driven)[0])  # trainer's epoch wins over counting
    assert torch.equal(all_idx(driven)[0], loader().epoch_batches(3)[0])


def test_eval_episodes_fixed_and_independent_of_seed(loaded):
    dm = loaded("mnist")
    val = all_idx(dm.val_dataloader())
    assert [len(b) for b in val] == [16] * 19 + [312 - 19 * 16]  # final partial batch kept
    assert len(torch.cat(val).unique()) == 312 * 32
    other = MNISTDataModule(seed=5, train_episodes_per_epoch=10)
    other.x, other.y = dm.x, dm.y  # share loaded tensors: only the sampling differs
    assert all(torch.equal(a, b) for a, b in zip(val, all_idx(other.val_dataloader()), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(val, all_idx(dm.val_dataloader()), strict=True))
    shifted = MNISTDataModule(eval_seed=1)
    shifted.x, shifted.y = dm.x, dm.y
    assert not torch.equal(val[0], all_idx(shifted.val_dataloader())[0])
    assert not torch.equal(all_idx(dm.test_dataloader())[0], val[0])


@pytest.mark.parametrize("name", ["omniglot", "cifar10"])
def test_class_episodes(loaded, name):
    base = loaded(name)
    dm = build_datamodule(name, episodes="class", classes_per_episode=4)
    dm.x, dm.y = base.x, base.y
    loader = dm.train_dataloader()
    assert len(loader) == len(base.train_dataloader())
    idx = torch.cat(all_idx(loader))  # (E, T)
    labels = dm.y["train"][idx]  # (E, T)
    for row_idx, row in zip(idx, labels, strict=True):
        assert len(row.unique()) == 4 and len(row_idx.unique()) == 32  # 8 distinct items of each class
    assert torch.equal(all_idx(dm.episodes("train"))[0], all_idx(dm.episodes("train"))[0])  # both epoch 0


def test_class_episodes_need_labels(loaded):
    dm = MNISTDataModule(episodes="class")
    dm.x, dm.y = loaded("mnist").x, loaded("mnist").y
    with pytest.raises(DataError, match="needs class labels.*data.binarize=dynamic"):
        next(iter(dm.train_dataloader()))
    dyn = MNISTDataModule(episodes="class", binarize="dynamic", classes_per_episode=2)
    dyn.setup("fit")  # the grey training images carry their labels
    labels = dyn.y["train"][next(iter(dyn.train_dataloader()))["idx"]]  # (B, T)
    assert all(len(row.unique()) == 2 for row in labels)


def test_class_test_episodes_fixed_and_class_pure(loaded):
    base = loaded("mnist")
    dm = MNISTDataModule(eval_episodes="class", classes_per_episode=2, test_episodes=40)
    dm.x, dm.y = base.x, base.y
    test = all_idx(dm.test_dataloader())
    idx = torch.cat(test)  # (40, 32)
    assert idx.shape == (40, 32)
    for row_idx, row in zip(idx, dm.y["test"][idx], strict=True):
        assert len(row.unique()) == 2 and len(row_idx.unique()) == 32  # 16 distinct items of each of 2 digits
    again = MNISTDataModule(seed=9, eval_episodes="class", classes_per_episode=2, test_episodes=40)
    again.x, again.y = base.x, base.y
    assert all(torch.equal(a, b) for a, b in zip(test, all_idx(again.test_dataloader()), strict=True))
    # val stays iid (checkpoint selection compares runs on one protocol); train follows data.episodes
    assert torch.equal(torch.cat(all_idx(dm.val_dataloader())), torch.cat(all_idx(base.val_dataloader())))
    no_labels = MNISTDataModule(eval_episodes="class")
    no_labels.x, no_labels.y = base.x, dict(base.y, test=torch.full_like(base.y["test"], -1))
    with pytest.raises(DataError, match="eval_episodes=class needs class labels.*Use data.eval_episodes=iid"):
        no_labels.test_dataloader()


def test_dynamic_mnist_training_excludes_the_validation_images(loaded, data_root):
    """Dynamic training serves the 60,000 grey MNIST training images minus the most likely source of each
    Larochelle validation image. Re-derive the sources of a sample of validation images against all 60,000."""
    from datamodules.mnist import TRAIN_IMAGES, VALID_SOURCES, dynamic_train_indices, ml_sources, read_idx

    grey = read_idx(data_root / TRAIN_IMAGES).reshape(60_000, 784)
    valid = loaded("mnist").x["val"].view(10_000, 784).numpy()
    pick = np.random.default_rng(0).choice(10_000, 300, replace=False)
    src, gap = ml_sources(valid[pick], grey)
    shipped = set(np.load(VALID_SOURCES).tolist())
    assert all(s in shipped or g < 1e-3 for s, g in zip(src.tolist(), gap.tolist(), strict=True))  # (a tie may flip)
    keep = dynamic_train_indices()
    assert len(keep) == 50_009 and not shipped & set(keep.tolist())
    dm = MNISTDataModule(binarize="dynamic")
    dm.setup()
    assert torch.equal(dm.x["train"].view(-1, 784), torch.from_numpy(grey[keep]))
    assert np.mean(src < 50_000) > 0.7  # what the old rule (MNIST's first 50,000) trained on: 8,404 of 10,000


def test_static_mnist_test_labels_match_the_grey_mnist_test_set(loaded, data_root):
    """The Larochelle test part is MNIST t10k sorted by class: a sample of binary images, each matched
    to its most likely grey t10k image, has that image's label."""
    from datamodules.mnist import ml_sources, read_idx

    dm = loaded("mnist")
    grey = read_idx(data_root / "MNIST/raw/t10k-images-idx3-ubyte.gz").reshape(10_000, -1)
    grey_labels = torch.from_numpy(read_idx(data_root / "MNIST/raw/t10k-labels-idx1-ubyte.gz").astype(np.int64))
    pick = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:300]
    match, _ = ml_sources(dm.x["test"][pick].view(300, -1).numpy(), grey)  # (300,) most likely grey image
    match = torch.from_numpy(match)
    assert torch.equal(grey_labels[match], dm.y["test"][pick])
    assert torch.equal(torch.bincount(dm.y["test"]), torch.bincount(grey_labels))
    assert bool((dm.y["val"] < 0).all()) and bool((dm.y["train"] < 0).all())  # shuffled parts: no labels


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_sharding_disjoint_and_covering(world_size):
    single_train = torch.cat(EpisodeLoader("train", 10_000, 32, 16, train=True).epoch_batches(2))
    single_eval = torch.cat(all_idx(EpisodeLoader("val", 10_000, 32, 16, train=False)))
    train_parts, eval_parts = [], []
    for rank in range(world_size):
        train = EpisodeLoader("train", 10_000, 32, 16, train=True, rank=rank, world_size=world_size)
        val = EpisodeLoader("val", 10_000, 32, 16, train=False, rank=rank, world_size=world_size)
        train_batches, eval_batches = train.epoch_batches(2), all_idx(val)
        assert len(train_batches) == len(train) == 312 // 16 // world_size
        assert (
            len(eval_batches)
            == len(val)
            == len(EpisodeLoader("val", 10_000, 32, 16, train=False, world_size=world_size))
        )
        assert all(0 < len(b) <= 16 for b in eval_batches)
        train_parts.append(torch.cat(train_batches))
        eval_parts.append(torch.cat(eval_batches))
    train_all, eval_all = torch.cat(train_parts), torch.cat(eval_parts)
    assert len(train_all.unique()) == train_all.numel() and len(eval_all.unique()) == eval_all.numel()
    assert set(train_all.flatten().tolist()) == set(single_train[: len(train_all)].flatten().tolist())
    assert set(eval_all.flatten().tolist()) == set(single_eval.flatten().tolist())


def test_dynamic_mnist_resamples_and_matches_grey(loaded):
    dm = MNISTDataModule(binarize="dynamic")
    dm.setup()
    assert dm.x["train"].shape == (50_009, 1, 28, 28) and int(dm.x["train"].max()) == 255
    assert (dm.y["train"] >= 0).all() and torch.equal(dm.x["val"], loaded("mnist").x["val"])
    idx = next(iter(dm.train_dataloader()))["idx"]
    first, second = dm.get_batch("train", idx)["x"], dm.get_batch("train", idx)["x"]
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    mean = sum(dm.get_batch("train", idx)["x"] for _ in range(100)) / 100  # (B, T, 1, 28, 28)
    grey = dm.x["train"][idx].float() / 255
    assert (mean - grey).abs().max() < 0.25  # 5 sigma of a mean of 100 Bernoullis
    assert abs(mean.mean() - grey.mean()) < 2e-3
    val_idx = next(iter(dm.val_dataloader()))["idx"]
    assert set(dm.get_batch("val", val_idx)["x"].unique().tolist()) <= {0.0, 1.0}


def test_dynamic_omniglot_keeps_static_eval(loaded):
    static = loaded("omniglot")
    dm = OmniglotDataModule(binarize="dynamic")
    dm.setup()
    assert torch.equal(dm.x["val"], static.x["val"]) and torch.equal(dm.x["test"], static.x["test"])
    assert torch.equal(dm.y["train"], static.y["train"]) and int(dm.x["train"].max()) == 255
    grey = dm.x["train"].float() / 255
    assert abs(grey.mean() - static.x["train"].float().mean()) < 2e-3  # static draws have mean grey


def test_lightning_trainer_drives_epochs(loaded):
    import pytorch_lightning as pl

    seen: list[tuple[int, torch.Tensor]] = []

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                seen.append((self.current_epoch, batch["x"]))
            assert batch["x"].shape == (16, 32, 1, 28, 28) and batch["y"].shape == (16, 32)
            return (self.w - batch["x"].mean()) ** 2

        def validation_step(self, batch, batch_idx):
            assert batch["x"].dtype == torch.float32

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MNISTDataModule()
    dm.x, dm.y = loaded("mnist").x, loaded("mnist").y
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Probe(), datamodule=dm)
    assert [epoch for epoch, _ in seen] == [0, 1]
    for epoch, x in seen:
        expected = dm.get_batch("train", dm.episodes("train").epoch_batches(epoch)[0])["x"]
        assert torch.equal(x, expected)


# --- data dir, md5 cache, errors ---------------------------------------------------------------


def test_resolve_data_dir_order(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("KM_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("KM_DATA_DIR")
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(DataError, match="KM_DATA_DIR"):
        resolve_data_dir(None)
    assert resolve_data_dir(None, must_exist=False) == tmp_path / "shared" / "data"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir(None) == tmp_path / "shared" / "data"


def test_md5_verdict_is_cached(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("KM_CACHE_DIR", str(tmp_path))
    files = paths.DataFiles("mnist", data_root)
    assert files.verified(NPZ) == data_root / NPZ
    assert (tmp_path / "md5.json").is_file()

    def no_hashing(path):
        raise AssertionError("re-hashed a file whose md5 is cached")

    monkeypatch.setattr(paths, "md5_file", no_hashing)
    assert paths.DataFiles("mnist", data_root).verified(NPZ) == data_root / NPZ
    dm = MNISTDataModule(data_dir=data_root)
    dm.verify()  # mnist static needs only the cached npz
    assert dm.data_dir == data_root and not dm.x


def test_missing_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="missing file binarized_mnist/binarized_mnist.npz"):
        MNISTDataModule(binarize="dynamic").verify()
    assert "MNIST/raw/train-images-idx3-ubyte.gz" in MNISTDataModule(binarize="dynamic").required_files()
    with pytest.raises(DataError) as err:
        MNISTDataModule().setup()
    message = str(err.value)
    assert "\n" not in message and "missing file binarized_mnist/binarized_mnist.npz" in message
    assert str(tmp_path) in message and "KM_DATA_DIR" in message and "km data download mnist" in message


def test_corrupt_files(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("KM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "binarized_mnist").mkdir()
    shutil.copyfile(data_root / NPZ, tmp_path / NPZ)
    with open(tmp_path / NPZ, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(
        DataError, match=r"mnist: corrupt file binarized_mnist/binarized_mnist.npz \(md5 \w+ != expected 6a16"
    ) as err:
        MNISTDataModule(data_dir=tmp_path).setup()
    assert "\n" not in str(err.value) and "km data download mnist" in str(err.value)
    record_in_manifest(tmp_path, [NPZ])  # md5 now "known", so the load itself must fail cleanly
    with pytest.raises(DataError, match="corrupt file .*BadZipFile") as err:
        MNISTDataModule(data_dir=tmp_path).setup()
    assert "\n" not in str(err.value)

    rel = "cifar10/test.npy.xz"
    (tmp_path / "cifar10").mkdir()
    blob = bytearray((data_root / rel).read_bytes()[:100_000])
    blob[5000] ^= 0xFF
    (tmp_path / rel).write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cifar10: corrupt file cifar10/test.npy.xz .md5"):
        cached_shard(paths.DataFiles("cifar10", tmp_path), rel)
    record_in_manifest(tmp_path, [rel])
    with pytest.raises(DataError, match="corrupt file cifar10/test.npy.xz .*(LZMAError|EOFError)"):
        cached_shard(paths.DataFiles("cifar10", tmp_path), rel)


# --- download conversions (synthetic; no network) -------------------------------------------------


def test_parse_amat():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 2, size=(3, 784), dtype=np.uint8)
    text = "\n".join(" ".join(str(v) for v in row) for row in images) + "\n"
    assert np.array_equal(parse_amat(text), images) and parse_amat(text).dtype == np.uint8
    with pytest.raises(ValueError):
        parse_amat("0 1 0\n")


def test_pack_omniglot_orders_by_character_and_drawer():
    rng = np.random.default_rng(0)
    chars = [965, 970, 1000]
    images = {(c, d): rng.random((4, 4)) > 0.5 for c in chars for d in range(1, 21)}
    items = [(f"alphabet/char/{c:04d}_{d:02d}.png", im) for (c, d), im in images.items()]
    rng.shuffle(items)
    packed = pack_omniglot(items)
    assert packed["images"].shape == (3, 20, 4, 4) and packed["images"].dtype == bool
    assert all(
        np.array_equal(packed["images"][i, d - 1], images[c, d]) for i, c in enumerate(chars) for d in range(1, 21)
    )
    assert np.array_equal(packed["labels"], np.repeat(np.arange(3)[:, None], 20, axis=1))
    with pytest.raises(ValueError):
        pack_omniglot(items[:-1])


def test_cifar_files_and_npy_xz(tmp_path):
    train_x = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    files = cifar_files(train_x, np.arange(10) % 10, train_x[:4], np.arange(4), ["a"] * 10)
    assert sorted(files) == ["labels.npz", "test.npy.xz"] + [f"train_{k}.npy.xz" for k in range(5)]
    assert np.array_equal(np.concatenate([files[f"train_{k}.npy.xz"] for k in range(5)]), train_x)
    assert files["labels.npz"]["train_labels"].dtype == np.uint8
    shard = np.broadcast_to(np.arange(10_000, dtype=np.uint8)[:, None, None, None], (10_000, 32, 32, 3))
    save_npy_xz(tmp_path / "s.npy.xz", shard)
    assert np.array_equal(read_shard(tmp_path / "s.npy.xz"), shard)


def test_downloaded_layout_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("KM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "binarized_mnist").mkdir()
    arrays = {k: np.zeros((n, 784), np.uint8) for k, n in (("train", 50_000), ("valid", 10_000), ("test", 10_000))}
    np.savez_compressed(tmp_path / NPZ, **arrays)  # md5 differs from the shared copy
    with pytest.raises(DataError, match="corrupt"):
        MNISTDataModule(data_dir=tmp_path).setup()
    record_in_manifest(tmp_path, [NPZ])
    dm = MNISTDataModule(data_dir=tmp_path)
    dm.setup()
    assert dm.x["test"].shape == (10_000, 1, 28, 28)


def test_download_without_network_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KM_CACHE_DIR", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="mnist: download into .* failed") as err:
        download("mnist", tmp_path / "data")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="unknown data set"):
        download("svhn", tmp_path / "data")


def test_mixed_episodes_put_the_stated_fraction_of_class_episodes_in_every_batch() -> None:
    """data.episodes=mixed: round(class_fraction x B) one-class episodes in each training batch, the rest iid
    (labels of 40 classes x 50 items; an iid episode of T = 10 is one-class with probability ~1e-16)."""
    from datamodules.episodes import EpisodeLoader

    labels = torch.arange(40).repeat_interleave(50)  # (2000,)
    for fraction, k in ((0.25, 2), (0.5, 4), (0.0, 0), (1.0, 8)):
        loader = EpisodeLoader(
            "train", 2000, 10, 8, train=True, n_episodes=96, mode="mixed", labels=labels,
            classes_per_episode=1, class_fraction=fraction, seed=3,
        )  # fmt: skip
        assert loader.class_per_batch() == k
        batches = [b["idx"] for b in loader]
        assert len(batches) == 12
        for idx in batches:
            pure = [len(labels[row].unique()) == 1 for row in idx]
            assert pure == [True] * k + [False] * (8 - k), (fraction, pure)
            assert all(len(row.unique()) == 10 for row in idx)  # distinct items in every episode
    with pytest.raises(ValueError, match="class_fraction must be in"):
        MNISTDataModule(episodes="mixed", class_fraction=1.5)


def test_mixed_class_fraction_out_of_range_is_a_config_error() -> None:
    from km.config import compose_config
    from km.overrides import ConfigError

    with pytest.raises(ConfigError, match="data.class_fraction"):
        compose_config(["data=omniglot", "data.episodes=mixed", "data.class_fraction=2"])
    cfg = compose_config(["data=omniglot", "data.episodes=mixed", "data.class_fraction=0.25"])
    assert cfg.data.episodes == "mixed" and cfg.data.class_fraction == 0.25
    with pytest.raises(ConfigError, match="eval_episodes"):
        compose_config(["data=omniglot", "data.eval_episodes=mixed"])
