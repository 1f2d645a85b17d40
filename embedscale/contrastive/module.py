"""The LightningModule: encode a `PairBatch`, compute the contrastive loss, log what matters.

Single-process today; the exact multi-rank path (gather with gradient + local loss, GradCache)
plugs in at `_embed_and_score` without touching the loss maths (see contrastive/losses.py).
The learnable temperature lives here, outside the encoder, but inside the module whose forward
DDP wraps -- so its gradient is averaged across ranks like every other parameter's.

Legend: B = queries in the batch, k = hard negatives per query, D = dim.
"""

from __future__ import annotations

import lightning as L
import torch

from embedscale.config import LossConfig, OptimConfig
from embedscale.contrastive.losses import Temperature, contrastive_loss
from embedscale.contrastive.optim import build_optimizer
from embedscale.data.batch import PairBatch
from embedscale.encoder.biencoder import BiEncoder


class ContrastiveModule(L.LightningModule):
    def __init__(self, encoder: BiEncoder, *, loss_cfg: LossConfig, optim_cfg: OptimConfig) -> None:
        super().__init__()
        self.encoder = encoder.train()  # from_pretrained returns eval mode: dropout must be on while training
        self.loss_cfg = loss_cfg
        self.optim_cfg = optim_cfg
        self.temperature = Temperature(
            loss_cfg.temperature, learnable=loss_cfg.learnable_temperature, max_inverse=loss_cfg.max_inverse_temperature
        )

    def compute_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, k = batch.batch_size, batch.num_negatives_per_query
        q_BD = self.encoder.encode(batch.queries, side="query")
        docs_XD = self.encoder.encode(batch.documents, side="document")  # (B * (1 + k), D)
        pos_BD = docs_XD[:B]
        neg_BkD = docs_XD[B:].view(B, k, -1) if k else None
        cfg = self.encoder.cfg
        return contrastive_loss(
            q_BD,
            pos_BD,
            neg_BkD,
            inverse_temperature=self.temperature(),
            ids=batch.ids if self.loss_cfg.mask_duplicates else None,
            symmetric_weight=self.loss_cfg.symmetric_weight,
            matryoshka_dims=cfg.matryoshka_dims,
            matryoshka_weights=cfg.matryoshka_weights,
            normalize=cfg.normalize,
        )

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch)
        metrics["temperature"] = 1.0 / self.temperature().detach()
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, prog_bar=False, batch_size=batch.batch_size)
        self.log("loss", metrics["loss"], prog_bar=True, logger=False, batch_size=batch.batch_size)
        return loss

    def configure_optimizers(self):
        temperature = self.temperature.log_inverse if self.loss_cfg.learnable_temperature else None
        optimizer, scheduler = build_optimizer(
            self.encoder,
            self.optim_cfg,
            num_training_steps=int(self.trainer.estimated_stepping_batches),
            temperature=temperature,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
