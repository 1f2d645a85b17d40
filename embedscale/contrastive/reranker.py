"""Training a cross-encoder (re-ranker) on query groups: listwise cross-entropy over (positive, negatives).

Each training sample is a group: a query, its positive and its first n negatives (mined, e.g. by
`embedscale mine`). The 1 + n pairs of a group are scored jointly by the cross-encoder and the loss is
the softmax cross-entropy of the positive within its group (`listwise_loss`). Unlike the bi-encoder
there are no in-batch negatives -- each pair costs a full forward, and a group's own mined negatives
are the hard ones -- so nothing is gathered across ranks and the loss needs no duplicate masking
beyond one case: a "negative" with exactly the positive's text is masked (and counted), never scored
against it.

The data layer is reused as is: sharded directories stream through `StreamDataModule` and
`MixtureStream` (exact, seeded order; several directories form a weighted mixture), with
`GroupCollator` in place of the bi-encoder's `PairCollator`; JSONL files are read into memory. A
sample with fewer than `reranker.num_negatives` negatives is an error naming the sample, never
dropped.

Legend: B = groups (queries) in the batch, G = 1 + n candidates per group, L = tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from embedscale.config import OptimConfig
from embedscale.contrastive.losses import listwise_loss
from embedscale.contrastive.optim import build_optimizer
from embedscale.data.batch import PairExample
from embedscale.encoder.crossencoder import CrossEncoder, tokenize_pairs

log = logging.getLogger(__name__)


@dataclass
class GroupBatch:
    """A tokenised batch of groups: pair g * G + j is (query g, candidate j); candidate 0 is the positive."""

    pairs: dict[str, torch.Tensor]  # input_ids/attention_mask[/token_type_ids] (B * G, L)
    mask_BG: torch.Tensor  # (B, G) bool: True = negative with the positive's exact text, excluded
    group_size: int
    keys: list[str]
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    """Set by `MixtureStream`, read by `StreamProgress` (always empty here: the stream runs with on_error=raise)."""
    in_batch_negatives: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.keys)


class GroupCollator:
    """PairExamples -> `GroupBatch`: the query paired with its positive and first `num_negatives` negatives."""

    def __init__(self, tokenizer, *, num_negatives: int, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives
        self.max_length = max_length

    def check(self, examples: list[PairExample]) -> None:
        """Raise on the first example with fewer than `num_negatives` negatives, naming it and the key."""
        n = self.num_negatives
        for ex in examples:
            if len(ex.negatives) < n:
                raise ValueError(
                    f"sample {ex.key or '?'} has {len(ex.negatives)} negatives < reranker.num_negatives={n}: "
                    "lower reranker.num_negatives or mine more negatives per query"
                )

    def __call__(self, examples: list[PairExample], *, query_prefix=None, document_prefix=None) -> GroupBatch:
        # The prefixes are the bi-encoder stream's per-source templates; the reranker's sources carry none.
        self.check(examples)
        n = self.num_negatives
        queries = [ex.query for ex in examples for _ in range(1 + n)]
        documents = [doc for ex in examples for doc in [ex.positive, *ex.negatives[:n]]]
        mask_BG = torch.tensor([[False] + [neg == ex.positive for neg in ex.negatives[:n]] for ex in examples])
        return GroupBatch(
            pairs=tokenize_pairs(self.tokenizer, queries, documents, max_length=self.max_length),
            mask_BG=mask_BG,
            group_size=1 + n,
            keys=[ex.key for ex in examples],
        )


def read_group_jsonl(path: Path) -> list[PairExample]:
    """Groups from JSONL with `query`, `positive` and `negatives` (a list) fields; other fields are ignored."""
    from embedscale.data.readers import iter_jsonl

    examples = []
    for line_no, row in iter_jsonl(path):
        for name in ("query", "positive"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise ValueError(f"{path}:{line_no}: field {name!r} is missing or empty (reranker.data)")
        negatives = row.get("negatives") or []
        if not isinstance(negatives, list) or not all(isinstance(t, str) for t in negatives):
            raise ValueError(f"{path}:{line_no}: field 'negatives' must be a list of strings (reranker.data)")
        examples.append(PairExample(row["query"], row["positive"], negatives, key=f"{path.name}:{line_no}"))
    return examples


class GroupListDataModule(L.LightningDataModule):
    """In-memory groups (JSONL): a seeded shuffle per epoch, full batches only (the remainder is logged)."""

    def __init__(self, examples: list[PairExample], *, collator: GroupCollator, global_batch_size: int, seed: int):
        super().__init__()
        if len(examples) < global_batch_size:
            raise ValueError(
                f"{len(examples)} training groups are fewer than reranker.global_batch_size={global_batch_size}: "
                "lower it or add data"
            )
        self.examples, self.collator, self.G, self.seed = examples, collator, global_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        log.info(
            "training on %d groups, %d per step; the last %d of each epoch's order are left out (incomplete batch)",
            len(self.examples),
            self.G,
            len(self.examples) % self.G,
        )
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.examples,
            batch_size=self.G,
            shuffle=True,
            drop_last=True,
            collate_fn=self.collator,
            generator=generator,
        )


def group_datamodule(
    paths: list[Path], *, collator: GroupCollator, global_batch_size: int, seed: int
) -> L.LightningDataModule:
    """Sharded directories -> a streamed mixture; JSONL files -> in-memory groups. Not both at once."""
    from embedscale.config import DataConfig, DataFormat, ModelConfig, SourceConfig
    from embedscale.data.datamodule import StreamDataModule

    for p in paths:
        if not p.exists():
            raise ValueError(f"reranker.data: {p} does not exist; fix the path or data_root")
    sharded = [p.is_dir() for p in paths]
    if any(sharded) and not all(sharded):
        raise ValueError(f"reranker.data mixes shard directories and files ({[str(p) for p in paths]}): use one kind")
    if not all(sharded):
        examples = [ex for p in paths for ex in read_group_jsonl(p)]
        collator.check(examples)  # in memory: fail now, not at the batch that holds the bad sample
        return GroupListDataModule(examples, collator=collator, global_batch_size=global_batch_size, seed=seed)
    data_cfg = DataConfig(
        format=DataFormat.shards,
        sources=[SourceConfig(path=str(p)) for p in paths],
        batch_size_per_rank=global_batch_size,
        num_hard_negatives=0,  # counted by GroupCollator, whose error names reranker.num_negatives
        on_error="raise",
    )
    dm = StreamDataModule(data_cfg, tokenizer=collator.tokenizer, model_cfg=ModelConfig(), root=Path("/"), seed=seed)
    dm.collator = collator  # the stream calls whatever collator its datamodule holds: groups, not pairs
    return dm


class RerankerModule(L.LightningModule):
    def __init__(self, model: CrossEncoder, *, optim_cfg: OptimConfig, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode: dropout must be on while training
        self.optim_cfg = optim_cfg
        self.temperature = temperature
        self.losses: list[float] = []
        """Training loss of every batch, for metrics.json."""
        self.masked_negatives = 0
        """Negatives with their positive's exact text, excluded from the loss (counted, never silent)."""

    def compute_loss(self, batch: GroupBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores_BG = self.model(batch.pairs).view(-1, batch.group_size)  # (B * G,) -> (B, G)
        return listwise_loss(scores_BG, temperature=self.temperature, mask_BG=batch.mask_BG)

    def training_step(self, batch: GroupBatch, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch)
        self.masked_negatives += int(batch.mask_BG.sum())
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=batch.batch_size)
        self.log("loss", metrics["loss"], prog_bar=True, logger=False, batch_size=batch.batch_size)
        self.losses.append(float(metrics["loss"]))
        return loss

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(
            self.model, self.optim_cfg, num_training_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
