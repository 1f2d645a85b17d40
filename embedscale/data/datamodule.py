"""Collate (prefixes + tokenisation) and the LightningDataModules: in-memory pairs, and sharded streams.

Both produce the same `PairBatch`, so nothing downstream differs. `StreamDataModule`
(data.format=shards) streams WebDataset shards through `MixtureStream` (data/stream.py): exact,
resumable, rank- and worker-independent order; its cursor lives in the Lightning checkpoint.
In `PairDataModule` a list of `PairExample` is read once and cut into
global batches by our own `GlobalBatchSampler` (data/sampler.py; the Trainer runs with
`use_distributed_sampler=False`): one seeded composition per epoch, without repeated texts in a
global batch where the data allows, each rank taking its slice, so that a step's global batch is the
same set of examples whatever the number of ranks. The last incomplete global batch is dropped
(every rank must take the same number of equal-shaped steps); how many samples that dropped is logged.
data.format=corpus reads documents instead and makes fresh pairs each epoch (`PretrainPairs`,
data/pretrain.py), through the same sampler and collator.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from embedscale.config import DataConfig, DataFormat, ModelConfig
from embedscale.data.batch import PairBatch, PairExample, TextIds, text_id
from embedscale.data.pretrain import PretrainPairs
from embedscale.data.readers import read_beir_pairs, read_corpus_documents, read_jsonl_pairs, resolve_path
from embedscale.data.sampler import GlobalBatchSampler
from embedscale.encoder.tokenize import tokenize

log = logging.getLogger(__name__)


class PairCollator:
    """Turns a list of examples into a `PairBatch`: applies prefixes, tokenises, computes content ids."""

    def __init__(self, tokenizer, *, model_cfg: ModelConfig, num_hard_negatives: int) -> None:
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.num_hard_negatives = num_hard_negatives

    def _tokenize(self, texts: list[str], prefixes: list[str], max_length: int) -> dict[str, torch.Tensor]:
        # The same function as encoding at evaluation (EOS, prefix exclusion): the two cannot diverge.
        return tokenize(self.tokenizer, texts, prefixes=prefixes, max_length=max_length, cfg=self.model_cfg)

    def __call__(
        self,
        examples: list[PairExample],
        *,
        query_prefix: str | None | list[str | None] = None,
        document_prefix: str | None | list[str | None] = None,
    ) -> PairBatch:
        """Prefixes (the model's, or a source's instruction templates: one for the batch or one per
        example, None meaning the model's), tokenisation, ids."""
        k = self.num_hard_negatives
        cfg = self.model_cfg

        def per_example(given, default: str) -> list[str]:
            given = given if isinstance(given, list) else [given] * len(examples)
            return [default if p is None else p for p in given]

        q_prefix = per_example(query_prefix, cfg.query_prefix)
        d_prefix = per_example(document_prefix, cfg.document_prefix)
        negatives = [neg for ex in examples for neg in ex.negatives[:k]]  # (B * k,) row-major
        if len(negatives) != k * len(examples):
            raise ValueError(f"a batch needs {k} negatives per example (data.num_hard_negatives); some have fewer")
        with_teacher = [ex.teacher_scores is not None for ex in examples]
        if any(with_teacher) and not all(with_teacher):
            raise ValueError("a batch mixes samples with and without teacher scores (data.teacher_scores)")
        ids = TextIds(
            query_B=torch.tensor([text_id(ex.query) for ex in examples], dtype=torch.long),
            positive_B=torch.tensor([text_id(ex.positive) for ex in examples], dtype=torch.long),
            negatives_Bk=torch.tensor([text_id(n) for n in negatives], dtype=torch.long).view(len(examples), k)
            if k
            else None,
        )
        return PairBatch(
            queries=self._tokenize([ex.query for ex in examples], q_prefix, cfg.query_max_length),
            documents=self._tokenize(
                [ex.positive for ex in examples] + negatives,
                d_prefix + [d_prefix[i] for i, ex in enumerate(examples) for _ in ex.negatives[:k]],
                cfg.document_max_length,
            ),
            ids=ids,
            num_negatives_per_query=k,
            keys=[ex.key for ex in examples],
            teacher_BG=torch.tensor([ex.teacher_scores[: 1 + k] for ex in examples], dtype=torch.float32)
            if examples and all(with_teacher)
            else None,
        )


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
    pairs = PretrainPairs(documents, p, seed=seed, name=name)
    pairs.examples(0)  # fills the epoch's counts by task, for the log
    stats = pairs.stats
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
    return pairs


def load_examples(cfg: DataConfig, root: Path, *, seed: int = 0) -> list[PairExample] | PretrainPairs:
    """Read the configured training set into memory (data.format=corpus: documents, paired per epoch)."""
    path = resolve_path(cfg.path, root)
    if cfg.format is DataFormat.corpus:
        return load_pretrain_pairs(cfg, root, seed=seed)
    if cfg.format is DataFormat.beir:
        if cfg.num_hard_negatives:
            raise ValueError("data.format=beir yields (query, positive) pairs only: set data.num_hard_negatives=0")
        examples = read_beir_pairs(path, cfg.split)
    else:
        examples = read_jsonl_pairs(
            path,
            query_field=cfg.query_field,
            positive_field=cfg.positive_field,
            negatives_field=cfg.negatives_field,
            num_hard_negatives=cfg.num_hard_negatives,
        )
    if cfg.max_samples is not None:
        examples = examples[: cfg.max_samples]
    if not examples:
        raise ValueError(f"no training examples in {path} (data.path={cfg.path!r}, data.split={cfg.split!r})")
    return examples


class PairDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, *, tokenizer, model_cfg: ModelConfig, root: Path, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.root = root
        self.collator = PairCollator(tokenizer, model_cfg=model_cfg, num_hard_negatives=cfg.num_hard_negatives)
        self.examples: list[PairExample] | PretrainPairs | None = None
        self.consumed = 0  # global batches the model consumed (PairProgress), checkpointed: resume skips them

    def setup(self, stage: str | None = None) -> None:
        if self.examples is None:
            self.examples = load_examples(self.cfg, self.root, seed=self.seed)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """On resume: the epoch's batches consumed before the checkpoint are skipped, not seen again (a
        mid-epoch checkpoint would otherwise restart the epoch's order: repeated and never-seen batches)."""
        self.consumed = int(state.get("consumed", 0))

    def train_dataloader(self) -> DataLoader:
        assert self.examples is not None, "setup() first"
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        global_batch = self.cfg.batch_size_per_rank * world
        sampler = GlobalBatchSampler(
            self.examples,
            global_batch_size=global_batch,
            world_size=world,
            rank=rank,
            seed=self.seed,
            shuffle=self.cfg.shuffle,
            no_duplicates=self.cfg.no_duplicates,
            num_hard_negatives=self.cfg.num_hard_negatives,
        )
        if self.consumed:  # resumed: skip what the checkpointed run consumed of its last epoch
            epoch, done = divmod(self.consumed, len(sampler))
            sampler.skip = (epoch, done)
            log.info("resuming at global batch %d: epoch %d goes on after its first %d", self.consumed, epoch, done)
        log.info(
            "training on %d examples, global batch %d (%d per rank), %d steps per epoch; the last %d examples "
            "of each epoch's order fall in the dropped incomplete batch",
            len(self.examples),
            global_batch,
            self.cfg.batch_size_per_rank,
            len(sampler),
            len(self.examples) % global_batch,
        )
        return DataLoader(
            self.examples,
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=self.collator,
            persistent_workers=self.cfg.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # not the global one: see RngResume
        )


def source_specs(cfg: DataConfig, root: Path) -> list:
    """The mixture's sources, opened, with their weights (explicit, or samples ** data.mixture_alpha)."""
    from embedscale.config import SourceConfig
    from embedscale.data.shards import ShardedDataset
    from embedscale.data.stream import Source

    specs = cfg.sources or [SourceConfig(path=cfg.path)]
    sources, names = [], set()
    for i, spec in enumerate(specs):
        ds = ShardedDataset.open(resolve_path(spec.path, root))
        name = spec.name or ds.manifest["name"]
        if name in names:
            raise ValueError(f"data.sources[{i}]: a second source named {name!r}; give it data.sources[{i}].name")
        names.add(name)
        weight = spec.weight if spec.weight is not None else float(len(ds)) ** cfg.mixture_alpha
        sources.append(
            Source(
                name,
                ds,
                weight,
                global_batch_size=spec.global_batch_size,
                in_batch_negatives=spec.in_batch_negatives,
                query_prefix=spec.query_prefix,
                document_prefix=spec.document_prefix,
            )
        )
    return sources


class StreamDataModule(L.LightningDataModule):
    """Sharded sources -> `MixtureStream` -> this rank's `PairBatch`es; the stream cursor is checkpointed.

    Lightning stores `state_dict()` in every checkpoint and hands it back to `load_state_dict()` on
    resume; the cursor counts the global batches the *model* has consumed (`on_train_batch_end`),
    not what the workers have prefetched, so a resumed run starts at exactly the next unseen batch.
    """

    def __init__(self, cfg: DataConfig, *, tokenizer, model_cfg: ModelConfig, root: Path, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.root, self.seed = cfg, root, seed
        self.collator = PairCollator(tokenizer, model_cfg=model_cfg, num_hard_negatives=cfg.num_hard_negatives)
        self.stream = None
        self.consumed = 0
        self.skipped: dict[str, int] = {}  # bad samples replaced under data.on_error=skip (all ranks after fit)
        self._loaded_state: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.stream is not None:
            return
        from embedscale.data.stream import MixtureStream

        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.stream = MixtureStream(
            source_specs(self.cfg, self.root),
            global_batch_size=self.cfg.batch_size_per_rank * world,
            world_size=world,
            rank=rank,
            seed=self.seed,
            shuffle=self.cfg.shuffle,
            shuffle_window=self.cfg.shuffle_window,
            length_bucket=self.cfg.length_bucket,
            steps_per_epoch=self.cfg.steps_per_epoch,
            collate=self.collator,
            num_hard_negatives=self.cfg.num_hard_negatives,
            on_error=self.cfg.on_error,
            homogeneous=self.cfg.homogeneous_batches,
            teacher=self.cfg.teacher_scores,
        )
        if self._loaded_state is not None:
            self.stream.load_state(self._loaded_state)  # load_state_dict already set self.consumed

    def train_dataloader(self) -> DataLoader:
        assert self.stream is not None, "setup() first"
        self.stream.state = self.stream.state_after(self.consumed)  # workers get a copy made now
        generator = torch.Generator().manual_seed(self.seed)  # not the global one: see contrastive RngResume
        return DataLoader(self.stream, batch_size=None, num_workers=self.cfg.num_workers, generator=generator)

    def state_dict(self) -> dict:
        if self.stream is None:
            return {}
        return self.stream.state_after(self.consumed).as_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self._loaded_state = state
        self.consumed = int(state["step"])
        if self.stream is not None:
            self.stream.load_state(state)


class PairProgress(L.Callback):
    """Counts the global batches the model consumed, for `PairDataModule`'s checkpointed cursor (Lightning runs
    checkpoint callbacks after the others, so a checkpoint taken at a batch's end counts that batch)."""

    def __init__(self, datamodule: PairDataModule) -> None:
        self.datamodule = datamodule

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.datamodule.consumed += 1


class StreamProgress(L.Callback):
    """Counts the global batches the model consumed, for `StreamDataModule`'s checkpointed cursor."""

    def __init__(self, datamodule: StreamDataModule, *, record_dir: Path | None = None) -> None:
        self.datamodule = datamodule
        self.record_dir = record_dir

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        stream = self.datamodule.stream  # later epochs' iterators (and worker copies) are made after this hook
        stream.state = stream.state_after(self.datamodule.consumed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = self.datamodule
        for reason, count in batch.skipped.items():
            dm.skipped[reason] = dm.skipped.get(reason, 0) + count
            pl_module.log(f"data/skipped/{reason.replace(' ', '_')}", float(dm.skipped[reason]), reduce_fx="max")
        if self.record_dir is not None:  # the sample ledger: what the model consumed, step by step
            import json

            self.record_dir.mkdir(parents=True, exist_ok=True)
            with open(self.record_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": dm.consumed, "source": batch.source, "keys": batch.keys}) + "\n")
        dm.consumed += 1

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        from embedscale.data.stream import SKIP_REASONS

        dm = self.datamodule  # the total over ranks, for metrics.json: one collective, at the end, on every rank
        if trainer.world_size > 1:
            counts = torch.tensor([float(dm.skipped.get(r, 0)) for r in SKIP_REASONS])
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            dm.skipped = {r: int(c) for r, c in zip(SKIP_REASONS, counts.tolist(), strict=True) if c}
