"""Exact, resumable streaming of sharded sources: one global sample order, whatever the ranks and workers.

The order is a pure function of (seed, sources, step), never of the number of ranks or workers:

- Each source's stream is its epochs one after another. Epoch e permutes the source's shards
  (seeded by seed, source, e), cuts the permuted list into windows of `shuffle_window` shards, and
  permutes the samples inside each window (seeded by seed, source, e, window); with length
  bucketing, each run of `length_bucket` samples of that permutation is then sorted by the samples'
  byte size (known from the index, without reading), so a global batch holds texts of similar
  length and pads little -- still a permutation, still independent of ranks, workers and G. Position g of the
  stream is sample (shard, position) of epoch g // N -- computed, not read, thanks to the shards'
  index (data/shards.py). Every sample occurs exactly once per epoch.
- Global batch i comes from one source (the global-batch contract: the same source on every rank),
  drawn by a seeded RNG from the mixture weights, and holds the next `G` positions of that
  source's stream: samples [c, c + G) where c is how many that source has given so far. G may be
  set per source; so may the instruction templates and in-batch negatives (off: each query sees
  only its own positive and hard negatives).
- Rank r of W takes rows [r * G / W, (r + 1) * G / W) of each global batch; worker w of n builds
  the batches i with i mod n == w, which PyTorch's DataLoader returns in order.

The loader's state is the number of global batches consumed and each source's cursor: resuming
from it continues with exactly the next unseen samples, also with another number of ranks or
workers (or another global batch size: the cursors are counted in samples).

Legend: N = samples in a source, G = global batch size, W = world size, n = workers per rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from embedscale.config import SourceConfig
from embedscale.data.batch import PairExample
from embedscale.data.shards import BadSample, ShardedDataset

_BLOCK = 4096
SKIP_REASONS = (  # every BadSample.reason (data/shards.py, to_example below): counted under data.on_error=skip
    "missing shard",
    "truncated shard",
    "invalid UTF-8",
    "corrupt sample",
    "empty or missing query",
    "empty or missing positive",
    "too few negatives",
    "missing teacher scores",
    "missing score",
    "missing teacher embeddings",
)  # source choices are drawn in blocks of this many steps


def _seed(*parts: int | str) -> np.random.SeedSequence:
    ints = [
        p if isinstance(p, int) else int.from_bytes(hashlib.blake2b(p.encode(), digest_size=4).digest()) for p in parts
    ]
    return np.random.SeedSequence(ints)


class SourceOrder:
    """Stream position g -> (shard, position in shard) for one source (see module docstring)."""

    def __init__(
        self,
        ds: ShardedDataset,
        *,
        name: str,
        seed: int,
        shuffle: bool = True,
        shuffle_window: int = 8,
        length_bucket: int = 0,
    ):
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
        self.ds, self.name, self.seed, self.shuffle, self.window = ds, name, seed, shuffle, shuffle_window
        self.bucket = length_bucket
        self.counts = np.array([s["samples"] for s in ds.shards], dtype=np.int64)
        self.n = int(self.counts.sum())
        if self.n == 0:
            raise ValueError(f"source {name!r} ({ds.root}) has no samples")
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, window starts)
        self._window: tuple[int, int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.arange(len(self.counts))
            if self.shuffle:
                order = np.random.default_rng(_seed(self.seed, self.name, epoch)).permutation(order)
            sizes = [int(self.counts[order[i : i + self.window]].sum()) for i in range(0, len(order), self.window)]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def _window_layout(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(permutation of the window's samples, its shards, cumulative sample counts of those shards)."""
        if self._window is None or self._window[:2] != (epoch, w):
            order, starts = self._epoch_layout(epoch)
            shards = order[w * self.window : (w + 1) * self.window]
            size = int(starts[w + 1] - starts[w])
            perm = np.arange(size)
            if self.shuffle:
                perm = np.random.default_rng(_seed(self.seed, self.name, epoch, w)).permutation(size)
            if self.bucket > 1:  # runs of `bucket` samples, each sorted by size: neighbours have similar lengths
                sizes = np.concatenate([self.ds.index(int(sh))[:, 1] for sh in shards])
                for i in range(0, size, self.bucket):
                    run = perm[i : i + self.bucket]
                    perm[i : i + self.bucket] = run[np.argsort(sizes[run], kind="stable")]
            self._window = (epoch, w, perm, shards, np.concatenate([[0], np.cumsum(self.counts[shards])]))
        return self._window[2], self._window[3], self._window[4]

    def locate(self, g: int) -> tuple[int, int]:
        epoch, p = divmod(g, self.n)
        _, starts = self._epoch_layout(epoch)
        w = int(np.searchsorted(starts, p, side="right")) - 1
        perm, shards, cum = self._window_layout(epoch, w)
        local = int(perm[p - starts[w]])
        i = int(np.searchsorted(cum, local, side="right")) - 1
        return int(shards[i]), local - int(cum[i])

    def read(self, start: int, count: int, *, errors: str = "raise") -> list[dict | BadSample]:
        """Samples at stream positions [start, start + count), in stream order."""
        where = [self.locate(g) for g in range(start, start + count)]
        by_shard: dict[int, list[int]] = {}
        for shard, pos in where:
            by_shard.setdefault(shard, []).append(pos)
        got = {s: dict(zip(ps, self.ds.read(s, ps, errors=errors), strict=True)) for s, ps in by_shard.items()}
        return [got[s][p] for s, p in where]


TEACHER_FIELDS = {  # data.teacher_scores -> (positive's field, negatives' field) written by `embedscale mine`
    "cross_encoder": ("positive_ce_score", "negative_ce_scores"),
    "retriever": ("positive_score", "negative_scores"),
}


def to_example(
    row: dict | BadSample, num_hard_negatives: int, teacher: str | None = None, loss: str = "contrastive"
) -> PairExample | BadSample:
    """A decoded sample -> PairExample, or the BadSample saying what is wrong with it. `loss`: the source's
    objective (data.sources[].loss), whose targets the sample must hold (a score, the teacher's embeddings)."""
    if isinstance(row, BadSample):
        return row
    where = f"sample {row.get('key', '?')} of source {row.get('source', '?')}"
    for name in ("query", "positive"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            return BadSample(f"empty or missing {name}", where, "fix the source and re-shard it")
    negatives = row.get("negatives") or []
    if len(negatives) < num_hard_negatives:
        return BadSample(
            "too few negatives", where, f"it has {len(negatives)} < data.num_hard_negatives={num_hard_negatives}"
        )
    scores = None
    if teacher is not None:
        pos_field, neg_field = TEACHER_FIELDS[teacher]
        scores = [row.get(pos_field), *(row.get(neg_field) or [])[:num_hard_negatives]]
        if len(scores) < 1 + num_hard_negatives or any(not isinstance(s, int | float) for s in scores):
            return BadSample(
                "missing teacher scores",
                where,
                f"data.teacher_scores={teacher} needs {pos_field} and {num_hard_negatives} {neg_field} per sample "
                "(mine with a cross-encoder for cross_encoder; random-fill negatives have none)",
            )
    example = PairExample(row["query"], row["positive"], list(negatives), key=row.get("key", ""), teacher_scores=scores)
    if loss in ("cosent", "angle"):
        score = row.get("score")
        if not isinstance(score, int | float) or isinstance(score, bool) or score != score:
            return BadSample(
                "missing score",
                where,
                f"loss={loss} trains on scored pairs: shard the source with a score (shard.score_field, or "
                "shard.format=sts)",
            )
        example.score = float(score)
    elif loss in ("mse", "kl"):
        embeddings = [row.get("query_embedding"), row.get("positive_embedding")]
        if not all(_vector(e) for e in embeddings) or len(embeddings[0]) != len(embeddings[1]):
            return BadSample(
                "missing teacher embeddings",
                where,
                f"loss={loss} needs query_embedding and positive_embedding (equal-length lists of numbers) in every "
                "sample: shard the source with shard.embedding_fields",
            )
        example.teacher_embeddings = (embeddings[0], embeddings[1])
    return example


def _vector(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int | float) for v in value)


@dataclass
class Source:
    """A source of the mixture, opened: its config (data.sources[i]), its dataset, its name and weight resolved."""

    spec: SourceConfig
    dataset: ShardedDataset
    name: str
    weight: float = 1.0

    @classmethod
    def of(cls, name: str, dataset: ShardedDataset, weight: float = 1.0, **spec) -> Source:
        """A source built in code (tests, benchmarks): `spec` holds SourceConfig's other fields."""
        return cls(
            SourceConfig(path=str(getattr(dataset, "root", "")), name=name, weight=weight, **spec),
            dataset,
            name,
            weight,
        )

    @property
    def global_batch_size(self) -> int | None:
        return self.spec.global_batch_size  # None: the stream's

    @property
    def in_batch_negatives(self) -> bool:
        return self.spec.in_batch_negatives

    @property
    def query_prefix(self) -> str | None:
        return self.spec.query_prefix  # None: the model's

    @property
    def document_prefix(self) -> str | None:
        return self.spec.document_prefix

    @property
    def loss(self) -> str:
        return str(self.spec.loss)

    def hard_negatives(self, k: int) -> int:
        """Hard negatives per row this source's batches carry: the run's k, none for a non-contrastive objective."""
        return k if self.loss == "contrastive" else 0


@dataclass
class StreamState:
    """What the checkpoint holds: global batches consumed, and samples each source has given by then."""

    step: int = 0
    cursors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"step": self.step, "cursors": dict(self.cursors)}


class MixtureStream(torch.utils.data.IterableDataset):
    """Global batches from weighted sources; yields this rank's slice of each, collated (in the workers)."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        global_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 8,
        length_bucket: int = 0,
        steps_per_epoch: int | None = None,
        collate=None,
        num_hard_negatives: int = 0,
        on_error: str = "raise",
        homogeneous: bool = True,
        teacher: str | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={on_error!r}: use raise or skip")
        if not sources:
            raise ValueError("no data sources")
        if not homogeneous:
            odd = [
                s.name
                for s in sources
                if s.global_batch_size or not s.in_batch_negatives or s.loss != "contrastive" or s.spec.loss_weight != 1
            ]
            if odd:
                raise ValueError(
                    f"data.homogeneous_batches=false mixes sources inside a batch: sources {odd} set their own "
                    "global_batch_size, in_batch_negatives=false, loss or loss_weight, which needs one source per batch"
                )
        self.homogeneous = homogeneous
        self.G = global_batch_size
        self.sizes = [s.global_batch_size or global_batch_size for s in sources]  # G per source
        for s, G in zip(sources, self.sizes, strict=True):
            if G % world_size:
                raise ValueError(f"source {s.name!r}: global batch {G} does not split over {world_size} ranks")
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"source weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.sources = list(sources)
        self.orders = [
            SourceOrder(
                s.dataset,
                name=s.name,
                seed=seed,
                shuffle=shuffle,
                shuffle_window=shuffle_window,
                length_bucket=length_bucket,
            )
            for s in sources
        ]
        self.probs = weights / weights.sum()
        self.W, self.rank, self.seed = world_size, rank, seed
        total = sum(o.n for o in self.orders)
        mean_G = float(np.dot(self.probs, self.sizes)) if homogeneous else float(global_batch_size)
        self.steps_per_epoch = steps_per_epoch or max(1, int(total // mean_G))
        self.collate = collate
        self.k, self.on_error, self.teacher = num_hard_negatives, on_error, teacher
        self.state = StreamState(0, {s.name: 0 for s in sources})
        self.skip_notes: dict[str, str] = {}  # under on_error=skip: the first bad sample of each reason
        self._blocks: dict[int, np.ndarray] = {}
        self._block_cum: list[np.ndarray] = [np.zeros(len(self.sources), dtype=np.int64)]

    # -- the schedule ------------------------------------------------------------------------------
    def _block(self, block: int) -> np.ndarray:
        """(_BLOCK, sources) samples each source gives to each global batch of a block of steps."""
        if block not in self._blocks:
            rng = np.random.default_rng(_seed(self.seed, "mixture", block))
            S = len(self.sources)
            if self.homogeneous:  # one source per global batch, with its own batch size
                rows = np.eye(S, dtype=np.int64)[rng.choice(S, size=_BLOCK, p=self.probs)] * np.array(self.sizes)
            else:  # every global batch mixes sources: G rows split by the weights
                rows = rng.multinomial(self.G, self.probs, size=_BLOCK).astype(np.int64)
            self._blocks[block] = rows
        return self._blocks[block]

    def rows_of(self, step: int) -> np.ndarray:
        block, i = divmod(step, _BLOCK)
        return self._block(block)[i]

    def source_of(self, step: int) -> int:
        """The source of a homogeneous global batch."""
        return int(np.argmax(self.rows_of(step)))

    def _samples_before(self, step: int) -> np.ndarray:
        """Samples each source gave to the global batches [0, step) (vectorised per block of steps)."""
        block, i = divmod(step, _BLOCK)
        while len(self._block_cum) <= block:  # _block_cum[j] = samples given in [0, j * _BLOCK)
            j = len(self._block_cum) - 1
            self._block_cum.append(self._block_cum[-1] + self._block(j).sum(axis=0))
        return self._block_cum[block] + self._block(block)[:i].sum(axis=0)

    def cursors_at(self, step: int) -> list[int]:
        """Samples each source has given before global batch `step` (from the loaded state on)."""
        if step < self.state.step:
            raise ValueError(f"step {step} precedes the stream state's step {self.state.step}")
        given = self._samples_before(step) - self._samples_before(self.state.step)
        return [self.state.cursors.get(s.name, 0) + int(g) for s, g in zip(self.sources, given, strict=True)]

    def load_state(self, state: dict) -> None:
        unknown = set(state.get("cursors", {})) - {s.name for s in self.sources}
        if unknown:
            raise ValueError(f"the checkpoint's stream has sources {sorted(unknown)} this config lacks")
        self.state = StreamState(
            int(state["step"]), {s.name: int(state["cursors"].get(s.name, 0)) for s in self.sources}
        )

    def state_after(self, consumed_steps: int) -> StreamState:
        cur = self.cursors_at(consumed_steps)
        return StreamState(consumed_steps, {s.name: c for s, c in zip(self.sources, cur, strict=True)})

    # -- iteration ---------------------------------------------------------------------------------
    def epoch_end(self, step: int) -> int:
        return (step // self.steps_per_epoch + 1) * self.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def rank_examples(self, step: int, cursors: list[int]) -> tuple[str, list[PairExample], dict[str, int], list[int]]:
        """(source name, this rank's examples, skipped samples by reason, each example's source index)
        of global batch `step`. Its rows are, source by source, the next rows_of(step)[s] samples of each
        source's stream; this rank takes rows [rank * b, (rank + 1) * b).

        Under on_error=skip a bad sample's row is refilled with a copy of a good row of the same slice:
        every rank keeps b rows (collectives need equal shapes), and the loss's duplicate masking keeps
        the copy from being a false negative. The skip is counted, never silent."""
        n_S = self.rows_of(step)
        G = int(n_S.sum())
        b = G // self.W
        lo, hi = self.rank * b, (self.rank + 1) * b
        errors = "return" if self.on_error == "skip" else "raise"
        rows, owners, at = [], [], 0
        for s, n in enumerate(n_S.tolist()):
            a, z = max(lo, at), min(hi, at + n)  # this rank's part of source s's rows
            if a < z:
                got = self.orders[s].read(cursors[s] + a - at, z - a, errors=errors)
                src = self.sources[s]
                teacher = self.teacher if src.loss == "contrastive" else None
                rows += [to_example(r, src.hard_negatives(self.k), teacher, src.loss) for r in got]
                owners += [s] * (z - a)
            at += n
        bad = [r for r in rows if isinstance(r, BadSample)]
        if bad and self.on_error == "raise":
            raise ValueError(bad[0].message())
        good = [r for r in rows if not isinstance(r, BadSample)]
        if not good:
            raise ValueError(f"every sample of a batch slice is bad, e.g. {bad[0].message()}")
        skipped: dict[str, int] = {}
        for r in bad:
            skipped[r.reason] = skipped.get(r.reason, 0) + 1
            self.skip_notes.setdefault(r.reason, r.message(skipping=True))  # the first of each reason, for the log
        examples = [r if not isinstance(r, BadSample) else good[i % len(good)] for i, r in enumerate(rows)]
        name = self.sources[self.source_of(step)].name if self.homogeneous else "mixed"
        return name, examples, skipped, owners

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.state.step
        end = self.epoch_end(start)  # a resumed epoch yields only its remaining batches
        cursors = self.cursors_at(start)
        for step in range(start, end):
            if (step - start) % workers == worker:
                name, examples, skipped, owners = self.rank_examples(step, cursors)
                if self.collate is None:
                    yield examples
                else:
                    srcs = [self.sources[s] for s in owners]
                    first = srcs[0]  # a non-contrastive objective needs homogeneous batches: one source
                    batch = self.collate(
                        examples,
                        query_prefix=[src.query_prefix for src in srcs],
                        document_prefix=[src.document_prefix for src in srcs],
                        num_hard_negatives=first.hard_negatives(self.k),
                        loss=first.loss,
                        loss_weight=first.spec.loss_weight,
                    )
                    batch.source, batch.skipped = name, skipped
                    batch.skip_notes = {reason: self.skip_notes[reason] for reason in skipped}
                    batch.in_batch_negatives = all(src.in_batch_negatives for src in srcs)
                    yield batch
            for s, n in enumerate(self.rows_of(step).tolist()):
                cursors[s] += n
