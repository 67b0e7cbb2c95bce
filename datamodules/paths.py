"""Where the data live, and checking that the files there are intact.

The data folder is resolved as: explicit ``data_dir`` (config) > env ``KM_DATA_DIR`` >
``<repo root>/../shared/data``. Every file a data set uses is md5-checked on first use
against :data:`KNOWN_MD5` (the official / shared copies) or the ``km_manifest.json`` that
``km data download`` writes; the digest is cached per (path, size, mtime_ns) in the cache
dir so later uses cost one ``stat``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "km_manifest.json"
_MD5_CACHE = "md5.json"

# md5 of every data file, from shared/data/README.md (relative to the data dir).
KNOWN_MD5: dict[str, str] = {
    "MNIST/raw/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "MNIST/raw/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "MNIST/raw/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "MNIST/raw/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "binarized_mnist/binarized_mnist.npz": "6a167d58bf86f02bdbe2f558ff907ce0",
    "omniglot/images_background.npz": "042c0a3e1688c4f4dc9d7213db63ee80",
    "omniglot/images_evaluation.npz": "a6277b6770b9241c6906fa797456e652",
    "cifar10/train_0.npy.xz": "b165a8bb1425d1c0770539d1dd211159",
    "cifar10/train_1.npy.xz": "34cebba8d86cab16f7975aaf2b8af187",
    "cifar10/train_2.npy.xz": "41205e15de6b812a3febaa128944c86d",
    "cifar10/train_3.npy.xz": "616f2b18c7997e6238d9b155876f3258",
    "cifar10/train_4.npy.xz": "db4299de7380c10e4a89816c81dd33f2",
    "cifar10/test.npy.xz": "becae0fbf5c176df71f11181adfc43a4",
    "cifar10/labels.npz": "dc82d07787f94ee8123ec672ba659eba",
}


class DataError(Exception):
    """A data set's files are missing or corrupt; the message is one line with the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def _locate(data_dir: str | os.PathLike | None) -> tuple[Path | None, str]:
    """Return (data dir or None, where it came from)."""
    if data_dir:
        return Path(data_dir).expanduser().resolve(), "from data.data_dir"
    if os.environ.get("KM_DATA_DIR"):
        return Path(os.environ["KM_DATA_DIR"]).expanduser().resolve(), "from KM_DATA_DIR"
    default = (REPO_ROOT.parent / "shared" / "data").resolve()
    return (default if default.is_dir() else None), "default <repo>/../shared/data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None, must_exist: bool = True) -> Path:
    """Data folder: explicit arg > env KM_DATA_DIR > <repo root>/../shared/data; else DataError.

    With ``must_exist=False`` (a download target) the default folder is returned even if absent.
    """
    root, _ = _locate(data_dir)
    if root is None and not must_exist:
        return (REPO_ROOT.parent / "shared" / "data").resolve()
    if root is None:
        raise DataError(
            f"no data directory: data.data_dir and KM_DATA_DIR are unset and {REPO_ROOT.parent / 'shared' / 'data'}"
            " does not exist. Point KM_DATA_DIR (or data.data_dir=...) at the data folder,"
            " or run: km data download NAME"
        )
    return root


def cache_dir() -> Path:
    """Writable cache folder: KM_CACHE_DIR > $XDG_CACHE_HOME/kanerva-lab > ~/.cache/kanerva-lab."""
    if os.environ.get("KM_CACHE_DIR"):
        path = Path(os.environ["KM_CACHE_DIR"])
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kanerva-lab"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def md5_file(path: Path) -> str:
    """md5 hex digest of a file, read in 8 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON atomically (`km.runs.atomic_write_text`, the project's one atomic writer), so concurrent
    readers never see half a file."""
    from km.runs import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def cached_md5(path: Path, fresh: bool = False) -> str:
    """md5 of ``path``, memoised in the cache dir under (abs path, inode, size, mtime_ns, ctime_ns). The ctime
    is in the key because a file rewritten in place with its mtime restored (``touch -d``) keeps its size and
    mtime but not its ctime, which no user call can set back. ``fresh``: recompute whatever the cache holds
    (``km data check``)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    try:  # a cache must never stop a run: an unwritable HOME or a KM_CACHE_DIR that is a file hash every time
        store = cache_dir() / _MD5_CACHE
    except OSError:
        return md5_file(path)
    known = read_json(store)
    if fresh or not isinstance(known.get(key), str):
        known = {**read_json(store), key: md5_file(path)}  # re-read: another process may have written
        try:
            write_json_atomic(store, known)
        except OSError:
            pass
    return known[key]


class DataFiles:
    """The resolved data folder of one data set, with checked access to its files."""

    def __init__(self, name: str, data_dir: str | os.PathLike | None = None):
        self.name = name
        located, self.source = _locate(data_dir)
        self.root = resolve_data_dir(data_dir) if located is None else located
        md5 = read_json(self.root / MANIFEST).get("md5", {})
        self._manifest = {k: v for k, v in md5.items() if isinstance(v, str)} if isinstance(md5, dict) else {}

    def _where(self) -> str:
        return f"in {self.root} ({self.source})"

    def corrupt(self, rel: str, why: str) -> DataError:
        """Error for a file that exists but cannot be used."""
        return DataError(
            f"{self.name}: corrupt file {rel} ({why}) {self._where()}; delete it and run: km data download {self.name}"
        )

    def verified(self, rel: str, fresh: bool = False) -> Path:
        """Absolute path of ``rel`` after checking it exists and its md5 is a known one (``fresh``: hashed now,
        not taken from the cache)."""
        path = self.root / rel
        if not path.is_file():
            raise DataError(
                f"{self.name}: missing file {rel} {self._where()}. Point KM_DATA_DIR (or data.data_dir=...)"
                f" at the folder holding it, or run: km data download {self.name}"
            )
        got = cached_md5(path, fresh=fresh)
        expected = {KNOWN_MD5.get(rel), self._manifest.get(rel)} - {None}
        if got not in expected:
            raise self.corrupt(rel, f"md5 {got} != expected {' or '.join(sorted(expected)) or '(unknown file)'}")
        return path

    def load(self, rel: str, reader: Callable[[Path], T]) -> T:
        """Verify ``rel`` and read it with ``reader``; any failure becomes a one-line DataError."""
        path = self.verified(rel)
        try:
            return reader(path)
        except Exception as err:  # numpy / zipfile / lzma / shape checks: never leak a traceback
            raise self.corrupt(rel, f"{type(err).__name__}: {err}") from None
