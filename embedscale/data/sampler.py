"""The global-batch sampler: one seeded composition of global batches per epoch, sliced by rank.

Every rank builds the same list of global batches (same seed, same epoch) and takes its contiguous
slice of b = G / W rows of each, so a step's global batch is the same set of examples whatever the
number of ranks, and the gathered loss sees exactly that set.

With `no_duplicates` (the default, docs/DESIGN.md's global-batch contract) a global batch never holds
the same text twice -- query, positive or hard negative -- where the data allows it: an example
whose texts collide with the batch so far is deferred to the next batch (the first place it fits).
When the remaining examples cannot fill a batch without repeats (heavily duplicated data), the
batch is completed with deferred examples anyway and the loss masks the repeats (loss.mask_duplicates):
no example is ever dropped for being a duplicate, and every epoch has exactly floor(N / G) steps
(the last N mod G examples of the epoch's order are dropped, as with drop_last, and logged).

A dataset whose examples change each epoch (`PretrainPairs`, data.format=corpus: anything with an
`examples(epoch)` method) gets its keys recomputed per epoch, and is indexed with `(epoch, i)`: the
DataLoader's workers hold a copy of the dataset and learn the epoch only through the indices.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from embedscale.data.batch import PairExample, text_id


def example_keys(example: PairExample, num_hard_negatives: int) -> frozenset[int]:
    """Content ids of the texts an example puts into a batch."""
    texts = [example.query, example.positive, *example.negatives[:num_hard_negatives]]
    return frozenset(text_id(t) for t in texts)


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        examples: Sequence[PairExample],  # or an epoch-dependent dataset with examples(epoch) (PretrainPairs)
        *,
        global_batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        no_duplicates: bool = True,
        num_hard_negatives: int = 0,
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not split over {world_size} ranks")
        if len(examples) < global_batch_size:
            raise ValueError(
                f"{len(examples)} training examples are fewer than one global batch ({global_batch_size}): "
                "lower data.global_batch_size or data.batch_size_per_rank, or raise data.max_samples if set"
            )
        self.n = len(examples)
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        # Lightning calls set_epoch on `dataloader.batch_sampler.sampler`, not on the batch sampler itself
        self.sampler = self
        self.per_epoch = examples if callable(getattr(examples, "examples", None)) else None
        self.no_duplicates, self.num_hard_negatives = no_duplicates, num_hard_negatives
        fixed = no_duplicates and self.per_epoch is None
        self.keys = [example_keys(e, num_hard_negatives) for e in examples] if fixed else None
        self.skip: tuple[int, int] | None = None  # (epoch, n): that epoch starts after its first n batches (resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.global_batch_size

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (identical on every rank)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        G = self.global_batch_size
        keys = self.keys
        if self.per_epoch is not None and self.no_duplicates:  # this epoch's texts
            keys = [example_keys(e, self.num_hard_negatives) for e in self.per_epoch.examples(self.epoch)]
        if keys is None:
            return [order[i * G : (i + 1) * G] for i in range(len(self))]
        remaining, batches = deque(order), []
        for _ in range(len(self)):
            batch, seen, deferred = [], set(), []
            while remaining and len(batch) < G:
                i = remaining.popleft()
                if keys[i] & seen:
                    deferred.append(i)
                    continue
                batch.append(i)
                seen |= keys[i]
            if len(batch) < G:  # no repeat-free completion left: fill up, the loss masks the repeats
                need = G - len(batch)
                batch += deferred[:need]
                deferred = deferred[need:]
            remaining.extendleft(reversed(deferred))  # deferred examples lead the next batch
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        lo = self.rank * self.per_rank
        batches = self.global_batches()
        if self.skip is not None and self.skip[0] == self.epoch:  # a resumed epoch: once
            batches, self.skip = batches[self.skip[1] :], None
        for batch in batches:
            if self.per_epoch is not None:
                yield [(self.epoch, i) for i in batch[lo : lo + self.per_rank]]
            else:
                yield batch[lo : lo + self.per_rank]
