"""The training loops' view of their data: micro-batches addressed by position.

Why: a loop should not care whether its images come from a map-style dataset (random access, one permutation per
epoch: :func:`batch_indices`) or from streaming shards (:class:`ShardStream`); it asks for the micro-batches from
``start`` on and records :meth:`BatchSource.position` in its checkpoints. In both cases the batches are a pure
function of the position (and the seed, world size and workers), so a resumed run reads exactly what the
uninterrupted run would have read.
"""

from __future__ import annotations

import random
import sys
from typing import Any, Callable, Iterable, Iterator

import torch

from ..data.folder import collate
from ..data.shards import ShardSet
from ..errors import TextokError


class BatchSource:
    """Micro-batches of ``batch_size`` for one rank of ``world``, over a dataset or a shard set."""

    def __init__(self, dataset: Any, batch_size: int, *, rank: int = 0, world: int = 1, workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 1000) -> None:
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.workers, self.seed = workers, seed
        self.stream = (dataset.stream(batch_size, rank=rank, world=world, workers=workers, seed=seed,
                                      shuffle_buffer=shuffle_buffer) if self.streaming else None)
        self._reported: set[str] = set()

    @property
    def streaming(self) -> bool:
        """True for shards: the samples cannot be listed up front (e.g. to encode every caption beforehand)."""
        return isinstance(self.dataset, ShardSet)

    def batches(self, start: int) -> Iterator[dict[str, Any]]:
        """Micro-batches ``start``, ``start + 1``, ... (forever); a skipped sample is counted in ``skipped`` and a
        shard with bad samples is reported once, naming it."""
        if self.stream is not None:
            for batch in self.stream.batches(start):
                self._report(batch.pop("problems", []))
                yield batch
            return
        def order(first: int) -> Iterator[list[int]]:
            return batch_indices(len(self.dataset), self.batch_size * self.world, self.rank, self.batch_size,
                                 self.seed, first)

        if self.workers > 0:
            stream: Iterable[dict[str, Any]] = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=order(start), collate_fn=collate, num_workers=self.workers,
                persistent_workers=True)
        else:
            stream = (collate([self.dataset[i] for i in indices]) for indices in order(start))
        load = lambda k: collate([self.dataset[i] for i in next(order(k))])  # noqa: E731
        span = len(self.dataset) // (self.batch_size * self.world)
        for k, batch in enumerate(stream, start):  # a batch of undecodable images only: a stand-in, resume stays exact
            yield batch if batch["captions"] else stand_in_batch(batch, k, load, span)

    def position(self, micro: int) -> dict[str, Any]:
        """Where micro-batch ``micro`` reads (what a checkpoint records besides the step)."""
        if self.stream is not None:
            return {"kind": "shards", **self.stream.position(micro)}
        per_epoch = len(self.dataset) // (self.batch_size * self.world)
        return {"kind": "indices", "micro_batch": micro, "epoch": micro // max(1, per_epoch), "world": self.world}

    def captions(self) -> Iterable[str] | None:
        """Every caption of a map-style dataset (to encode once up front), ``None`` for shards."""
        if self.streaming:
            return None
        return (c for i in range(len(self.dataset)) for c in captions_of(self.dataset, i))

    def _report(self, problems: list[str]) -> None:
        for line in problems:
            if line not in self._reported:
                self._reported.add(line)
                print(f"[rank {self.rank}] {line}", file=sys.stderr)


def captions_of(dataset: Any, index: int) -> list[str]:
    """The captions of item ``index``, without decoding its image when the dataset allows."""
    getter = getattr(dataset, "captions_of", None)
    if getter is not None:
        return getter(index)
    item = dataset[index]
    return item["captions"] if item is not None else []


def batch_indices(n: int, global_batch: int, rank: int, per_rank: int, seed: int, start: int) -> Iterator[list[int]]:
    """Index lists for micro-batch ``start``, ``start+1``, ... of this rank, a pure function of the position.

    Each epoch is a fresh permutation (seeded by ``seed`` and the epoch); the last partial global batch is
    dropped so every rank gets equal shares. Resuming at micro-batch k yields exactly what k would have been.
    """
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise TextokError(f"the dataset has {n} images, fewer than one global batch of {global_batch}: "
                          "lower batch_size or use more data")
    k = start
    perm, perm_epoch = None, -1
    while True:
        epoch, pos = divmod(k, per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
            perm_epoch = epoch
        first = pos * global_batch + rank * per_rank
        yield perm[first : first + per_rank]
        k += 1


def stand_in_batch(empty: dict[str, Any], position: int, load: Callable[[int], dict[str, Any]], span: int
                   ) -> dict[str, Any]:
    """A batch to train on at micro-batch ``position``, none of whose images could be decoded (``empty``).

    It is the nearest earlier micro-batch that has images (at the start of a run, the nearest later one),
    searched over ``span`` positions each way (an epoch). Being a pure function of the position, a resumed run
    gets the same stand-in, so resume stays exact; ``skipped`` keeps ``empty``'s count of undecodable images.
    """
    nearest = [*range(position - 1, max(-1, position - 1 - span), -1), *range(position + 1, position + 1 + span)]
    for k in nearest:
        batch = load(k)
        if batch["captions"]:
            return {**batch, "skipped": empty["skipped"]}
    raise TextokError(f"none of the images of {span} micro-batches around micro-batch {position} could be decoded; "
                      "check that the data folder holds images textok can read")


def pick_captions(captions: list[list[str]], indices: list[int], seed: int, step: int, train: bool = True) -> list[str]:
    """One caption per image: random per (seed, step, image) in training, the first one in evaluation."""
    if not train:
        return [c[0] for c in captions]
    out = []
    for caps, idx in zip(captions, indices):
        out.append(caps[random.Random(hash((seed, step, idx)) & 0xFFFFFFFF).randrange(len(caps))])
    return out


__all__ = ["BatchSource", "batch_indices", "captions_of", "pick_captions", "stand_in_batch"]
