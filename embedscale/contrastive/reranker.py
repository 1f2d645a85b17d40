"""Training a cross-encoder (re-ranker) on query groups: listwise cross-entropy over (positive, negatives).

Each training sample is a group: a query, its positive and its first n negatives (mined, e.g. by
`embedscale mine`). The 1 + n pairs of a group are scored jointly by the cross-encoder and the loss is
the softmax cross-entropy of the positive within its group (`listwise_loss`). Unlike the bi-encoder
there are no in-batch negatives -- each pair costs a full forward, and a group's own mined negatives
are the hard ones -- so nothing is gathered across ranks and the loss needs no duplicate masking
beyond one case: a "negative" with exactly the positive's text is masked (and counted), never scored
against it.

The data layer is the bi-encoder's: the one TrainingData with `GroupCollator` (data/collate.py) in place of the
bi-encoder's `PairCollator`; sharded directories stream through `MixtureStream` (exact, seeded order; several
directories form a weighted mixture), JSONL files are read into memory. A sample with fewer than
`reranker.num_negatives` negatives is an error naming the sample, never dropped. Clipping, as for the
bi-encoder, is the step driver's (embedscale/strategy/).

Legend: B = groups (queries) in the batch, G = 1 + n candidates per group, L = tokens.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from embedscale.config import OptimConfig, TrainerConfig
from embedscale.contrastive.losses import listwise_loss
from embedscale.contrastive.optim import build_optimizer
from embedscale.data.batch import GroupBatch, PairExample
from embedscale.data.collate import GroupCollator
from embedscale.encoder.crossencoder import CrossEncoder
from embedscale.strategy import StepDriver, driver_for

log = logging.getLogger(__name__)


def reranker_datamodule(paths: list[Path], *, collator: GroupCollator, global_batch_size: int, seed: int):
    """Training groups as the one TrainingData: shard directories streamed as a mixture, JSONL files in memory
    (a seeded shuffle per epoch, full batches only). Not both kinds at once."""
    from embedscale.config import SourceConfig
    from embedscale.data.datamodule import ExampleBatches, StreamBatches, TrainingData
    from embedscale.data.records import Fields, jsonl_pairs
    from embedscale.data.shards import ShardedDataset
    from embedscale.data.stream import Source

    for p in paths:
        if not p.exists():
            raise ValueError(f"reranker.data: {p} does not exist; fix the path or data_root")
    sharded = [p.is_dir() for p in paths]
    if any(sharded) and not all(sharded):
        raise ValueError(f"reranker.data mixes shard directories and files ({[str(p) for p in paths]}): use one kind")
    if all(sharded):

        def open_sources() -> list[Source]:
            datasets = [ShardedDataset.open(p) for p in paths]
            return [
                Source(SourceConfig(path=str(p)), ds, ds.manifest["name"], float(len(ds)))
                for p, ds in zip(paths, datasets, strict=True)
            ]

        engine = StreamBatches(open_sources, global_batch_size=global_batch_size, seed=seed)
    else:

        def load() -> list[PairExample]:
            examples = [ex for p in paths for ex in jsonl_pairs(p, Fields(section="reranker"))]
            collator.check(examples)  # in memory: fail now, not at the batch that holds the bad sample
            if len(examples) < global_batch_size:
                raise ValueError(
                    f"{len(examples)} training groups are fewer than reranker.global_batch_size={global_batch_size}: "
                    "lower it or add data"
                )
            return examples

        engine = ExampleBatches(load, global_batch_size=global_batch_size, seed=seed, no_duplicates=False)
    return TrainingData(engine, collator, seed=seed)


class RerankerModule(L.LightningModule):
    def __init__(
        self,
        model: CrossEncoder,
        *,
        optim_cfg: OptimConfig,
        temperature: float = 1.0,
        trainer_cfg: TrainerConfig | None = None,
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode: dropout must be on while training
        self.optim_cfg = optim_cfg
        self.temperature = temperature
        self.trainer_cfg = trainer_cfg
        self.driver = StepDriver()
        self.losses: list[float] = []
        """Training loss of every batch, for metrics.json."""
        self.masked_negatives = 0
        """Negatives with their positive's exact text, excluded from the loss (counted, never silent)."""

    def setup(self, stage: str) -> None:
        self.driver = driver_for(self.trainer.strategy, self.trainer_cfg)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.driver.clip(self, optimizer)

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


def fit_reranker(cfg, model: CrossEncoder, tokenizer, run_dir: Path) -> dict:
    """Train `model` in place on reranker.data (RerankerJobConfig `cfg`); returns the summary for metrics.json."""
    from embedscale.contrastive.trainer import build_trainer
    from embedscale.data.datamodule import DataProgress
    from embedscale.data.records import resolve_data_root, resolve_path

    r = cfg.reranker
    needs_root = any(not Path(p).expanduser().is_absolute() for p in r.data)
    root = resolve_data_root(cfg.data_root) if needs_root else Path("/")
    collator = GroupCollator(tokenizer, num_negatives=r.num_negatives, max_length=r.max_length)
    datamodule = reranker_datamodule(
        [resolve_path(p, root) for p in r.data], collator=collator, global_batch_size=r.global_batch_size, seed=cfg.seed
    )
    trainer = build_trainer(cfg.trainer, cfg.logger, run_dir, [DataProgress()], checkpoints=False)
    module = RerankerModule(model, optim_cfg=cfg.optim, temperature=r.temperature, trainer_cfg=cfg.trainer)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    losses = module.losses
    n = max(1, min(10, len(losses) // 2))
    return {
        "optimizer_steps": trainer.global_step,
        "groups_per_step": r.global_batch_size,
        "pairs_per_step": r.global_batch_size * (1 + r.num_negatives),
        "fit_seconds": round(seconds, 1),
        "loss_first": sum(losses[:n]) / n if losses else None,
        "loss_last": sum(losses[-n:]) / n if losses else None,
        "masked_negatives": module.masked_negatives,
    }
