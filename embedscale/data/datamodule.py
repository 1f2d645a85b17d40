"""The one LightningDataModule: a batching engine and a collator, injected; the checkpointed cursor.

    TrainingData(engine, collator)      engine: how global batches are composed and sliced by rank
        ExampleBatches                  in memory: a list of examples (JSONL, BEIR, groups) or per-epoch
                                        pre-training pairs, cut by `GlobalBatchSampler` (data/sampler.py)
        StreamBatches                   sharded sources streamed by `MixtureStream` (data/stream.py)
    collator: PairCollator (bi-encoder) or GroupCollator (re-ranker), data/collate.py

Both engines give every rank the same number of equal-shaped steps, and a step's global batch is the same set of
examples whatever the number of ranks (the Trainer runs with `use_distributed_sampler=False`). The module's
state is the number of global batches the *model* consumed (`DataProgress` counts them at each batch's end,
before Lightning's checkpoint callbacks run), so a resumed run continues with exactly the next unseen batch:
the in-memory engine skips the epoch's consumed batches, the stream restarts from its cursors.

`build_datamodule` makes the training run's from `data.*` and the run's `BatchSizes` (config/batch.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from embedscale.config import BatchSizes, DataConfig, DataFormat, ModelConfig, SourceConfig
from embedscale.data.batch import PairExample
from embedscale.data.collate import PairCollator
from embedscale.data.pretrain import PretrainPairs
from embedscale.data.records import Fields, pairs, read_corpus_documents, resolve_path
from embedscale.data.sampler import GlobalBatchSampler

log = logging.getLogger(__name__)


class ExampleBatches:
    """In-memory examples (read by `load` at setup) in seeded global batches, each rank taking its slice."""

    def __init__(
        self,
        load: Callable[[], list[PairExample] | PretrainPairs],
        *,
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        no_duplicates: bool = True,
        num_hard_negatives: int = 0,
    ) -> None:
        self.load, self.global_batch_size, self.seed = load, global_batch_size, seed
        self.shuffle, self.no_duplicates, self.k = shuffle, no_duplicates, num_hard_negatives
        self.examples: list[PairExample] | PretrainPairs | None = None

    def setup(self, rank: int, world: int) -> None:
        if self.examples is None:
            self.examples = self.load()
        self.rank, self.world = rank, world

    def dataloader(self, collator, *, consumed: int, num_workers: int, generator) -> DataLoader:
        sampler = GlobalBatchSampler(
            self.examples,
            global_batch_size=self.global_batch_size,
            world_size=self.world,
            rank=self.rank,
            seed=self.seed,
            shuffle=self.shuffle,
            no_duplicates=self.no_duplicates,
            num_hard_negatives=self.k,
        )
        if consumed:  # resumed: skip what the checkpointed run consumed of its last epoch
            epoch, done = divmod(consumed, len(sampler))
            sampler.skip = (epoch, done)
            log.info("resuming at global batch %d: epoch %d goes on after its first %d", consumed, epoch, done)
        log.info(
            "training on %d examples, global batch %d (%d per rank), %d steps per epoch; the last %d examples "
            "of each epoch's order fall in the dropped incomplete batch",
            len(self.examples),
            self.global_batch_size,
            self.global_batch_size // self.world,
            len(sampler),
            len(self.examples) % self.global_batch_size,
        )
        return DataLoader(
            self.examples,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collator,
            persistent_workers=num_workers > 0,
            generator=generator,
        )

    def state(self, consumed: int) -> dict:
        return {"consumed": consumed}

    def consumed_in(self, state: dict) -> int:
        return int(state.get("consumed", 0))

    def load_state(self, state: dict) -> None:
        """Nothing beyond the cursor: the epoch's consumed batches are skipped (dataloader)."""

    def at_epoch_start(self, consumed: int) -> None:
        """Nothing: the sampler knows the epoch."""

    def summary(self) -> dict:
        return {"examples": len(self.examples) if self.examples is not None else None}

    def num_samples(self) -> int:
        return len(self.examples) if self.examples is not None else 0


class StreamBatches:
    """Sharded sources -> `MixtureStream` -> this rank's slices (collated in the DataLoader's workers)."""

    def __init__(self, open_sources: Callable[[], list], *, global_batch_size: int, seed: int, **stream) -> None:
        self.open_sources, self.global_batch_size, self.seed, self.options = (
            open_sources,
            global_batch_size,
            seed,
            stream,
        )
        self.stream = None
        self._loaded: dict | None = None

    def setup(self, rank: int, world: int) -> None:
        if self.stream is not None:
            return
        from embedscale.data.stream import MixtureStream

        self.stream = MixtureStream(
            self.open_sources(),
            global_batch_size=self.global_batch_size,
            world_size=world,
            rank=rank,
            seed=self.seed,
            **self.options,
        )
        if self._loaded is not None:
            self.stream.load_state(self._loaded)

    def dataloader(self, collator, *, consumed: int, num_workers: int, generator) -> DataLoader:
        self.stream.collate = collator
        self.stream.state = self.stream.state_after(consumed)  # workers get a copy made now
        return DataLoader(self.stream, batch_size=None, num_workers=num_workers, generator=generator)

    def state(self, consumed: int) -> dict:
        return {} if self.stream is None else self.stream.state_after(consumed).as_dict()

    def consumed_in(self, state: dict) -> int:
        return int(state["step"]) if state else 0

    def load_state(self, state: dict) -> None:
        self._loaded = state
        if self.stream is not None:
            self.stream.load_state(state)

    def at_epoch_start(self, consumed: int) -> None:
        self.stream.state = self.stream.state_after(consumed)  # later epochs' iterators are made after this

    def summary(self) -> dict:
        return {"examples": None}

    def num_samples(self) -> int:
        return sum(o.n for o in self.stream.orders) if self.stream is not None else 0


class TrainingData(L.LightningDataModule):
    """Batches from an engine, collated by a collator; the consumed-batch cursor lives in every checkpoint."""

    def __init__(
        self,
        engine,
        collator,
        *,
        num_workers: int = 0,
        seed: int = 0,
        record_dir: Path | None = None,
        max_skipped_fraction: float = 0.001,
    ) -> None:
        super().__init__()
        self.engine, self.collator, self.num_workers, self.seed = engine, collator, num_workers, seed
        self.record_dir = record_dir
        self.max_skipped_fraction = max_skipped_fraction
        self.consumed = 0  # global batches the model consumed (DataProgress), checkpointed: resume skips them
        self.skipped: dict[str, int] = {}  # bad samples replaced under data.on_error=skip (all ranks after fit)

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.engine.setup(rank, world)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)  # not the global one: see contrastive RngResume
        return self.engine.dataloader(
            self.collator, consumed=self.consumed, num_workers=self.num_workers, generator=generator
        )

    def state_dict(self) -> dict:
        return self.engine.state(self.consumed)

    def load_state_dict(self, state: dict) -> None:
        """On resume: the batches consumed before the checkpoint are skipped, not seen again (a mid-epoch checkpoint
        would otherwise restart the epoch's order: repeated and never-seen batches)."""
        if not state:
            return
        self.consumed = self.engine.consumed_in(state)
        self.engine.load_state(state)

    # -- called by DataProgress -----------------------------------------------------------------------------------
    def epoch_started(self) -> None:
        self.engine.at_epoch_start(self.consumed)

    def batch_consumed(self, trainer: L.Trainer, module: L.LightningModule, batch) -> None:
        for reason, count in batch.skipped.items():
            if reason not in self.skipped:  # each reason once, with its first sample and the fix
                log.warning(
                    "data.on_error=skip: skipping samples (%s), e.g. %s",
                    reason,
                    batch.skip_notes.get(reason, "?"),
                )
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            module.log(f"data/skipped/{reason.replace(' ', '_')}", float(self.skipped[reason]), reduce_fx="max")
        if batch.skipped:
            self._check_skip_budget(trainer)
        if self.record_dir is not None:  # the sample ledger: what the model consumed, step by step
            self.record_dir.mkdir(parents=True, exist_ok=True)
            with open(self.record_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": self.consumed, "source": batch.source, "keys": batch.keys}) + "\n")
        self.consumed += 1

    def _check_skip_budget(self, trainer: L.Trainer) -> None:
        """Fail once this rank skipped more than its share of data.max_skipped_fraction of the dataset."""
        total = self.engine.num_samples()
        budget = self.max_skipped_fraction * total / max(trainer.world_size, 1)
        skipped = sum(self.skipped.values())
        if skipped > budget:
            raise ValueError(
                f"data.on_error=skip: {skipped} bad sample(s) skipped on rank {trainer.global_rank} "
                f"({dict(self.skipped)}), more than data.max_skipped_fraction={self.max_skipped_fraction:g} of the "
                f"dataset's {total} samples allows ({budget:.1f} per rank): repair the sources (the log names the "
                "first bad sample of each reason) or raise data.max_skipped_fraction"
            )

    def training_ended(self, trainer: L.Trainer) -> None:
        from embedscale.data.stream import SKIP_REASONS

        if trainer.world_size > 1:  # the total over ranks, for metrics.json: one collective, on every rank
            counts = torch.tensor([float(self.skipped.get(r, 0)) for r in SKIP_REASONS])
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            self.skipped = {r: int(c) for r, c in zip(SKIP_REASONS, counts.tolist(), strict=True) if c}

    def summary(self) -> dict:
        """What metrics.json records of the data: example count (in memory), the stream's cursor, skips."""
        stream = self.state_dict() if isinstance(self.engine, StreamBatches) else None
        return {**self.engine.summary(), "stream": stream, "skipped_samples": self.skipped}


class DataProgress(L.Callback):
    """Tells the run's TrainingData which global batches the model consumed (its checkpointed cursor). Lightning
    runs checkpoint callbacks after the others, so a checkpoint taken at a batch's end counts that batch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        trainer.datamodule.epoch_started()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.batch_consumed(trainer, pl_module, batch)

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.datamodule.training_ended(trainer)


# -- the training run's data (data.*) ----------------------------------------------------------------------------


def load_pretrain_pairs(cfg: DataConfig, root: Path, *, seed: int = 0) -> PretrainPairs:
    """data.format=corpus: the corpus's documents (the first data.max_samples) as per-epoch pre-training pairs."""
    path = resolve_path(cfg.path, root)
    p = cfg.pretrain
    if path.is_dir() and (p.text_field, p.title_field) != ("text", "title"):
        log.warning(
            "data.pretrain.text_field=%s / title_field=%s have no effect: %s is a BEIR directory (text, title)",
            p.text_field,
            p.title_field,
            path,
        )
    documents = read_corpus_documents(path, text_field=p.text_field, title_field=p.title_field)
    if cfg.max_samples is not None:
        documents = documents[: cfg.max_samples]
    name = path.name.removesuffix(".gz").removesuffix(".jsonl")
    pretrain = PretrainPairs(documents, p, seed=seed, name=name)
    pretrain.examples(0)  # fills the epoch's counts by task, for the log
    stats = pretrain.stats
    log.info(
        "pre-training pairs (data.pretrain.task=%s) from %d of %d documents of %s; epoch 0: %d ICT, %d spans, "
        "%d ICT fallen back to spans (fewer than 2 sentences or none of data.pretrain.min_query_words=%d words)",
        p.task,
        stats["used"],
        stats["documents"],
        path,
        stats["ict"],
        stats["spans"],
        stats["ict_fallback"],
        p.min_query_words,
    )
    return pretrain


def load_examples(cfg: DataConfig, root: Path, *, seed: int = 0) -> list[PairExample] | PretrainPairs:
    """Read the configured training set into memory (data.format=corpus: documents, paired per epoch)."""
    path = resolve_path(cfg.path, root)
    if cfg.format is DataFormat.corpus:
        return load_pretrain_pairs(cfg, root, seed=seed)
    if cfg.format is DataFormat.beir and cfg.num_hard_negatives:
        raise ValueError("data.format=beir yields (query, positive) pairs only: set data.num_hard_negatives=0")
    fields = Fields(cfg.query_field, cfg.positive_field, cfg.negatives_field, section="data")
    examples = []
    for ex in pairs(str(cfg.format), path, fields, split=cfg.split, min_negatives=cfg.num_hard_negatives):
        if cfg.format is DataFormat.beir:
            ex.key = f"{path.name}:{ex.key}"
        ex.negatives = ex.negatives[: cfg.num_hard_negatives]
        examples.append(ex)
        if cfg.max_samples is not None and len(examples) >= cfg.max_samples:
            break
    if not examples:
        raise ValueError(f"no training examples in {path} (data.path={cfg.path!r}, data.split={cfg.split!r})")
    return examples


def open_sources(cfg: DataConfig, root: Path) -> list:
    """The mixture's sources (data.sources, or one at data.path), opened, with their weights (explicit, or
    samples ** data.mixture_alpha)."""
    from embedscale.data.shards import ShardedDataset
    from embedscale.data.stream import Source

    specs = cfg.sources or [SourceConfig(path=cfg.path)]
    sources, names = [], set()
    for i, spec in enumerate(specs):
        ds = ShardedDataset.open(resolve_path(spec.path, root), verify=str(cfg.verify))
        name = spec.name or ds.manifest["name"]
        if name in names:
            raise ValueError(f"data.sources[{i}]: a second source named {name!r}; give it data.sources[{i}].name")
        names.add(name)
        weight = spec.weight if spec.weight is not None else float(len(ds)) ** cfg.mixture_alpha
        sources.append(Source(spec, ds, name, weight))
    return sources


def build_datamodule(
    cfg: DataConfig, sizes: BatchSizes, *, tokenizer, model_cfg: ModelConfig, root: Path, seed: int, run_dir: Path
) -> TrainingData:
    """The training run's data (data.*): in-memory examples or sharded streams, collated into PairBatches."""
    collator = PairCollator(tokenizer, model_cfg=model_cfg, num_hard_negatives=cfg.num_hard_negatives)
    if cfg.format is DataFormat.shards:
        engine = StreamBatches(
            lambda: open_sources(cfg, root),
            global_batch_size=sizes.global_batch_size,
            seed=seed,
            shuffle=cfg.shuffle,
            shuffle_window=cfg.shuffle_window,
            length_bucket=cfg.length_bucket,
            steps_per_epoch=cfg.steps_per_epoch,
            num_hard_negatives=cfg.num_hard_negatives,
            on_error=str(cfg.on_error),
            homogeneous=cfg.homogeneous_batches,
            teacher=None if cfg.teacher_scores is None else str(cfg.teacher_scores),
        )
        record_dir = run_dir / "samples" if cfg.record_keys else None
    else:
        engine = ExampleBatches(
            lambda: load_examples(cfg, root, seed=seed),
            global_batch_size=sizes.global_batch_size,
            seed=seed,
            shuffle=cfg.shuffle,
            no_duplicates=cfg.no_duplicates,
            num_hard_negatives=cfg.num_hard_negatives,
        )
        record_dir = None
    return TrainingData(
        engine,
        collator,
        num_workers=cfg.num_workers,
        seed=seed,
        record_dir=record_dir,
        max_skipped_fraction=cfg.max_skipped_fraction,
    )
