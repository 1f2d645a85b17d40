"""Collate (prefixes + tokenisation) and the LightningDataModule for in-memory pair datasets.

The WebDataset streaming path arrives with the data-layer issue; it will produce the same
`PairBatch`, so nothing downstream changes. Here a list of `PairExample` is read once and cut into
global batches by our own `GlobalBatchSampler` (data/sampler.py; the Trainer runs with
`use_distributed_sampler=False`): one seeded composition per epoch, without repeated texts in a
global batch where the data allows, each rank taking its slice, so that a step's global batch is the
same set of examples whatever the number of ranks. The last incomplete global batch is dropped
(every rank must take the same number of equal-shaped steps); how many samples that dropped is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from embedscale.config import DataConfig, DataFormat, ModelConfig
from embedscale.data.batch import PairBatch, PairExample, TextIds, text_id
from embedscale.data.readers import read_beir_pairs, read_jsonl_pairs, resolve_path
from embedscale.data.sampler import GlobalBatchSampler

log = logging.getLogger(__name__)


class PairCollator:
    """Turns a list of examples into a `PairBatch`: applies prefixes, tokenises, computes content ids."""

    def __init__(self, tokenizer, *, model_cfg: ModelConfig, num_hard_negatives: int) -> None:
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.num_hard_negatives = num_hard_negatives

    def _tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, examples: list[PairExample]) -> PairBatch:
        k = self.num_hard_negatives
        cfg = self.model_cfg
        negatives = [neg for ex in examples for neg in ex.negatives[:k]]  # (B * k,) row-major
        if len(negatives) != k * len(examples):
            raise ValueError(f"a batch needs {k} negatives per example (data.num_hard_negatives); some have fewer")
        documents = [ex.positive for ex in examples] + negatives
        ids = TextIds(
            query_B=torch.tensor([text_id(ex.query) for ex in examples], dtype=torch.long),
            positive_B=torch.tensor([text_id(ex.positive) for ex in examples], dtype=torch.long),
            negatives_Bk=torch.tensor([text_id(n) for n in negatives], dtype=torch.long).view(len(examples), k)
            if k
            else None,
        )
        return PairBatch(
            queries=self._tokenize([cfg.query_prefix + ex.query for ex in examples], cfg.query_max_length),
            documents=self._tokenize([cfg.document_prefix + d for d in documents], cfg.document_max_length),
            ids=ids,
            num_negatives_per_query=k,
            keys=[ex.key for ex in examples],
        )


def load_examples(cfg: DataConfig, root: Path) -> list[PairExample]:
    """Read the configured training set into memory."""
    path = resolve_path(cfg.path, root)
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
        self.examples: list[PairExample] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.examples is None:
            self.examples = load_examples(self.cfg, self.root)

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
        )
