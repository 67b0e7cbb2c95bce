"""Episode samplers: batches of index tensors (B, T) into an in-memory split.

An :class:`EpisodeLoader` is a plain iterable (no per-item ``__getitem__``, no workers):
each batch is ``{"split": str, "idx": LongTensor (B, T)}``; the datamodule turns indices into
images on the training device. Orders come from ``torch.Generator``s seeded by
:func:`stable_seed`, so they are identical across processes, runs and Python versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def stable_seed(*parts: object) -> int:
    """Deterministic 63-bit seed from ``parts`` (unlike ``hash``, stable across interpreters)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def iid_episodes(n_items: int, n_episodes: int, length: int, gen: torch.Generator) -> Tensor:
    """(E, T) indices from a random permutation; items repeat only if E*T > n_items."""
    n_perms = -(-n_episodes * length // n_items)
    order = torch.cat([torch.randperm(n_items, generator=gen) for _ in range(n_perms)])  # (n_perms*N,)
    return order[: n_episodes * length].view(n_episodes, length)


def class_episodes(labels: Tensor, n_episodes: int, length: int, n_classes: int, gen: torch.Generator) -> Tensor:
    """(E, T) indices; each episode holds ``n_classes`` distinct classes, ~T/n_classes items each.

    Items of a class are a random window of a per-call shuffle of that class, so they are
    distinct whenever the class has at least ceil(T/n_classes) items.
    """
    if bool((labels < 0).any()):
        raise ValueError("episodes='class' needs labels, but this split has none (label -1)")
    # class-sorted index with a random order inside each class: sort by label + U[0, 1)
    keys = labels.double() + torch.rand(len(labels), generator=gen, dtype=torch.float64)
    by_class = keys.argsort()  # (N,)
    counts = torch.bincount(labels)  # (K,)
    starts = counts.cumsum(0) - counts  # (K,)
    present = counts.nonzero().squeeze(1)  # (K',)
    if len(present) < n_classes:
        raise ValueError(f"classes_per_episode={n_classes} but the split has only {len(present)} classes")
    pick = torch.rand(n_episodes, len(present), generator=gen).argsort(dim=1)[:, :n_classes]
    classes = present[pick]  # (E, C)
    perm = torch.rand(n_episodes, length, generator=gen).argsort(dim=1)  # (E, T) random positions
    slot, rank_in_class = perm % n_classes, perm // n_classes  # (E, T) class slot, k-th item of it
    cls = classes.gather(1, slot)  # (E, T)
    offset = (torch.rand(n_episodes, n_classes, generator=gen) * counts[classes]).long()  # (E, C)
    within = (offset.gather(1, slot) + rank_in_class) % counts[cls]  # (E, T)
    return by_class[starts[cls] + within]


class EpisodeLoader:
    """Iterable of ``{"split", "idx": (B, T)}`` batches for one split and (DDP) rank.

    Training (``train=True``): each epoch draws a fresh order seeded by (seed, epoch); only
    full batches are kept and rank ``r`` takes batches ``r, r + W, ...`` of the first
    ``W * (E // B // W)``. The epoch is ``epoch_fn()`` when given (a Lightning trainer's
    ``current_epoch``), else the value of :meth:`set_epoch`, else a counter that each
    ``__iter__`` advances.

    Evaluation (``train=False``): one fixed order from (seed, split); every episode is used
    once. Single process: B-episode batches plus a final partial one. DDP: each rank takes
    every W-th episode and splits its share into the same number of near-equal batches.
    """

    def __init__(
        self,
        split: str,
        n_items: int,
        episode_length: int,
        batch_size: int,
        *,
        train: bool,
        n_episodes: int | None = None,
        mode: str = "iid",
        labels: Tensor | None = None,
        classes_per_episode: int = 4,
        class_fraction: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
    ):
        if mode not in ("iid", "class", "mixed"):
            raise ValueError(f"episodes must be 'iid', 'class' or 'mixed', got {mode!r}")
        if mode != "iid" and labels is None:
            raise ValueError(f"episodes={mode!r} needs labels")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.split, self.n_items, self.train = split, n_items, train
        self.episode_length, self.batch_size = episode_length, batch_size
        self.n_episodes = n_items // episode_length if n_episodes is None else n_episodes
        if self.n_episodes < 1:
            raise ValueError(f"{split}: {n_items} items give no episode of length {episode_length}")
        self.mode, self.labels, self.classes_per_episode = mode, labels, classes_per_episode
        self.class_fraction = class_fraction
        self.seed, self.rank, self.world_size, self.epoch_fn = seed, rank, world_size, epoch_fn
        self._next_epoch = 0
        self._eval_batches: list[Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (later ones count up from it)."""
        self._next_epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return self.n_episodes // self.batch_size // self.world_size
        per_rank = -(-self.n_episodes // self.world_size)
        return -(-per_rank // self.batch_size)

    def class_per_batch(self) -> int:
        """Class episodes in each batch: B (class), 0 (iid), round(class_fraction x B) (mixed)."""
        B = self.batch_size
        return {"class": B, "iid": 0}.get(self.mode, round(self.class_fraction * B))

    def _draw(self, gen: torch.Generator) -> Tensor:
        E, T = self.n_episodes, self.episode_length
        if self.mode == "class":
            return class_episodes(self.labels, E, T, self.classes_per_episode, gen)
        if self.mode == "iid":
            return iid_episodes(self.n_items, E, T, gen)
        # mixed: episode j is a class episode where j's position in its batch is < k, so every batch of B
        # holds exactly k class episodes (then B - k iid ones)
        cls = class_episodes(self.labels, E, T, self.classes_per_episode, gen)  # (E, T)
        iid = iid_episodes(self.n_items, E, T, gen)  # (E, T)
        is_class = (torch.arange(E) % self.batch_size) < self.class_per_batch()  # (E,)
        return torch.where(is_class[:, None], cls, iid)

    def epoch_batches(self, epoch: int) -> list[Tensor]:
        """This rank's training batches for ``epoch``: list of (B, T) LongTensors."""
        gen = torch.Generator().manual_seed(stable_seed(self.seed, epoch, self.split))
        episodes = self._draw(gen)  # (E, T)
        n = len(self) * self.world_size * self.batch_size
        return list(episodes[:n].view(-1, self.batch_size, self.episode_length)[self.rank :: self.world_size])

    def eval_batches(self) -> list[Tensor]:
        """This rank's fixed evaluation batches (computed once)."""
        if self._eval_batches is None:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, self.split))
            share = self._draw(gen)[self.rank :: self.world_size]  # (E_r, T)
            if self.world_size == 1:
                self._eval_batches = list(share.split(self.batch_size))
            else:
                self._eval_batches = list(torch.tensor_split(share, len(self)))
        return self._eval_batches

    def __iter__(self) -> Iterator[dict]:
        if self.train:
            epoch = self.epoch_fn() if self.epoch_fn is not None else self._next_epoch
            self._next_epoch = epoch + 1
            batches = self.epoch_batches(epoch)
        else:
            batches = self.eval_batches()
        for idx in batches:
            yield {"split": self.split, "idx": idx}
