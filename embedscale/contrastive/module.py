"""The LightningModule: encode a `PairBatch`, gather across ranks, compute the loss, log what matters.

Multi-rank: every rank gathers the queries, the positives and each hard-negative column of the
whole global batch *with gradient* (contrastive/gather.py), then scores only its own query rows
(`local`, labels offset by rank x b). Under DDP's gradient average this is exactly the one-process
gradient of the global batch; one process is the special case W = 1. The learnable temperature
lives here, outside the encoder, but inside the module whose forward DDP wraps -- so its gradient
is averaged across ranks like every other parameter's.

With GradCache on (`gradcache.chunk_size` or `gradcache.token_budget`) the step is GradCache
(contrastive/gradcache.py) with manual optimisation: several backward passes, one explicit gradient
all-reduce, clipping, update.

Under `trainer.strategy=fsdp2` (embedscale/strategy.py) the strategy shards the backbones in `configure_model`;
FSDP2 reduce-scatters their gradients at every backward (also each GradCache chunk's: the sharded gradients
accumulate sums of averages, which is exact), so only the replicated parameters (the learnable temperature) are
averaged here, and clipping takes the norm over all shards (gather.clip_grad_norm_sharded_).

Under `trainer.strategy=deepspeed` (ZeRO-2/3) the DeepSpeed engine owns backward, reduction, clipping (at the
global norm over all partitions, `gradient_clipping` in its config) and the step; the temperature is one of its
parameters like any other. GradCache runs every backward of a step -- the cache's and each chunk's -- through
the engine as micro-steps of its own (unmanaged: embedscale/strategy.py) gradient accumulation, whose boundary is
`engine.step()`: ZeRO-2/3 reduce-scatter each micro-step's (averaged) gradient into the partitioned gradient,
where the micro-steps add up (a sum of averages: exact, as under FSDP2), and the engine steps once. Nothing is
divided by the accumulation count: gradient_accumulation_steps is 1.

Legend: B = queries in the batch, k = hard negatives per query, D = dim.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel

from embedscale.config import GradCacheConfig, LossConfig, OptimConfig
from embedscale.contrastive.gather import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_gradients_,
    clip_grad_norm_sharded_,
    world,
)
from embedscale.contrastive.gradcache import gradcache_step
from embedscale.contrastive.losses import Temperature, contrastive_loss, distillation_loss
from embedscale.contrastive.optim import build_optimizer
from embedscale.data.batch import PairBatch, TextIds
from embedscale.encoder.biencoder import BiEncoder


class VectorTemperature(Temperature):
    """A learnable Temperature whose log(1/tau) is stored with shape (1,) instead of as a 0-dim tensor: DeepSpeed
    broadcasts every parameter at start-up as bytes (`p.data.view(torch.uint8)`), which a 0-dim tensor cannot be
    viewed as. Same values, same optimizer arithmetic (elementwise); forward still returns a scalar."""

    def __init__(self, temperature: Temperature) -> None:
        torch.nn.Module.__init__(self)
        self.max_inverse = temperature.max_inverse
        self.log_inverse = torch.nn.Parameter(temperature.log_inverse.detach().clone().reshape(1))  # (1,)

    def forward(self) -> torch.Tensor:
        return self.log_inverse.exp().clamp(max=self.max_inverse)[0]  # scalar 1/tau


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        encoder: BiEncoder,
        *,
        loss_cfg: LossConfig,
        optim_cfg: OptimConfig,
        gradcache: GradCacheConfig | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        """With GradCache on (`gradcache.enabled`) the module optimises manually (GradCache needs several
        backward passes per step) and clips at `gradient_clip_val` itself; otherwise the Trainer does both."""
        super().__init__()
        self.gradcache = gradcache if gradcache is not None and gradcache.enabled else None
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = self.gradcache is None
        self.encoder = encoder.train()  # from_pretrained returns eval mode: dropout must be on while training
        self.loss_cfg = loss_cfg
        self.optim_cfg = optim_cfg
        self.temperature = Temperature(
            loss_cfg.temperature, learnable=loss_cfg.learnable_temperature, max_inverse=loss_cfg.max_inverse_temperature
        )
        self.fsdp2 = False  # set by configure_model when the strategy shards the backbones

    def setup(self, stage: str) -> None:
        """Under DeepSpeed give the learnable temperature a 1-element parameter (VectorTemperature). Here, not in
        configure_model: Lightning runs that under deepspeed.zero.Init, which would partition the new parameter
        apart from the module that DeepSpeed casts to bf16 later."""
        if self.zero_stage is not None and isinstance(self.temperature.log_inverse, torch.nn.Parameter):
            if self.temperature.log_inverse.dim() == 0:
                self.temperature = VectorTemperature(self.temperature)

    def configure_model(self) -> None:
        """Let an FSDP2 strategy (embedscale/strategy.py) shard the backbones; a no-op for every other strategy."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None and not self.fsdp2:
            shard(self)
            self.fsdp2 = True

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of the run (trainer.strategy=deepspeed), None under every other strategy."""
        trainer = self._trainer
        return getattr(trainer.strategy, "zero_stage", None) if trainer is not None else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.fsdp2:  # its optimizer state is indexed in another parameter order than ddp's
            checkpoint["embedscale_fsdp2"] = True
        if self.zero_stage is not None:
            checkpoint["embedscale_zero_stage"] = self.zero_stage

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stage = checkpoint.get("embedscale_zero_stage")
        if stage != self.zero_stage:
            written = f"deepspeed ZeRO-{stage}" if stage is not None else "another strategy than deepspeed"
            now = f"deepspeed ZeRO-{self.zero_stage}" if self.zero_stage is not None else "another strategy"
            raise ValueError(
                f"trainer.resume: the checkpoint was written under {written} and this run uses {now}: resume with "
                "the trainer.strategy and trainer.zero_stage that wrote it"
            )
        if checkpoint.get("embedscale_fsdp2", False) != self.fsdp2:
            written, now = ("fsdp2", "another strategy") if not self.fsdp2 else ("another strategy", "fsdp2")
            raise ValueError(
                f"trainer.resume: the checkpoint was written under {written} and this run uses {now}; the optimizer "
                "state does not carry over between them: resume with the trainer.strategy that wrote it"
            )

    def on_after_backward(self) -> None:
        # FSDP2 reduced the sharded gradients in the backward; the replicated ones (temperature) are averaged here.
        # GradCache (manual optimisation) averages them once per step itself, not after each chunk's backward.
        if self.fsdp2 and self.automatic_optimization:
            all_reduce_gradients_(self.parameters())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.fsdp2 and gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("trainer.strategy=fsdp2 clips by norm only")
            clip_grad_norm_sharded_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def compute_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, k = batch.batch_size, batch.num_negatives_per_query
        q_BD = self.encoder.encode(batch.queries, side="query")
        docs_XD = self.encoder.encode(batch.documents, side="document")  # (B * (1 + k), D)
        neg_BkD = docs_XD[B:].view(B, k, -1) if k else None
        return self.loss_from_embeddings(
            q_BD, docs_XD[:B], neg_BkD, batch.ids, batch.in_batch_negatives, teacher_BG=batch.teacher_BG
        )

    def loss_from_embeddings(
        self,
        q_BD: torch.Tensor,
        pos_BD: torch.Tensor,
        neg_BkD: torch.Tensor | None,
        ids: TextIds,
        in_batch_negatives: bool = True,
        *,
        teacher_BG: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gather this rank's embeddings into the global batch and score the local query rows; with teacher
        scores (and loss.distill_weight > 0) add the distillation term over each local row's own candidates."""
        rank, _ = world()
        B = q_BD.shape[0]
        q_ND = all_gather_with_grad(q_BD, "query embeddings")
        pos_ND = all_gather_with_grad(pos_BD, "positive embeddings")
        neg_NkD = None
        if neg_BkD is not None:  # one column at a time: concatenating first would interleave ranks
            cols = [all_gather_with_grad(neg_BkD[:, m], f"negative column {m}") for m in range(neg_BkD.shape[1])]
            neg_NkD = torch.stack(cols, dim=1)
        gathered_ids = None
        if self.loss_cfg.mask_duplicates:
            gathered_ids = TextIds(
                all_gather_no_grad(ids.query_B, "query ids"),
                all_gather_no_grad(ids.positive_B, "positive ids"),
                None if ids.negatives_Bk is None else all_gather_no_grad(ids.negatives_Bk, "negative ids"),
            )
        cfg = self.encoder.cfg
        loss, metrics = contrastive_loss(
            q_ND,
            pos_ND,
            neg_NkD,
            inverse_temperature=self.temperature(),
            ids=gathered_ids,
            local=slice(rank * B, rank * B + B),
            symmetric_weight=self.loss_cfg.symmetric_weight,
            matryoshka_dims=cfg.matryoshka_dims,
            matryoshka_weights=cfg.matryoshka_weights,
            normalize=cfg.normalize,
            row_chunk_size=self.loss_cfg.row_chunk_size,
            in_batch_negatives=in_batch_negatives,
        )
        if teacher_BG is not None and self.loss_cfg.distill_weight > 0 and neg_BkD is not None:
            kl, distill = distillation_loss(
                q_BD,
                pos_BD,
                neg_BkD,
                teacher_BG,
                inverse_temperature=self.temperature(),
                teacher_temperature=self.loss_cfg.distill_temperature,
            )
            loss = loss + self.loss_cfg.distill_weight * kl
            metrics.update(distill)
            metrics["loss"] = loss.detach()
        return loss, metrics

    def on_train_batch_start(self, batch: PairBatch, batch_idx: int) -> None:
        # GradCache runs several backward passes per step; DDP's reducer (which expects one) is switched
        # off for the whole step and the gradients are averaged once, explicitly, before the update.
        if self.gradcache is not None and isinstance(self.trainer.model, DistributedDataParallel):
            self.trainer.model.require_backward_grad_sync = False

    def _gradcache_training_step(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        gc = self.gradcache
        chunks = dict(chunk_size=gc.chunk_size, token_budget=gc.token_budget, sort_by_length=gc.sort_by_length)
        if self.zero_stage is not None:
            # DeepSpeed ZeRO: every backward through the engine (Lightning's manual_backward -> engine.backward),
            # one micro-step each; engine.step() below is the boundary: it reduces, clips at the global norm and
            # steps once (see the module docstring)
            engine = self.trainer.model  # the DeepSpeedEngine wrapping this module
            loss, metrics = gradcache_step(
                self,
                batch,
                **chunks,
                backward=self.manual_backward,
                cache_backward=self.manual_backward,
                before_backward=lambda is_last: self._next_micro_step(engine, is_last),
            )
        else:
            loss, metrics = gradcache_step(self, batch, **chunks, backward=self.manual_backward)
            all_reduce_gradients_(self.parameters())  # under FSDP2 only the replicated (non-DTensor) gradients
            if self.gradient_clip_val and self.fsdp2:
                clip_grad_norm_sharded_(self.parameters(), self.gradient_clip_val)
            elif self.gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()  # under DeepSpeed engine.step(): partitioned gradients finalised, clipped, AdamW, zeroed
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss, metrics

    def _next_micro_step(self, engine, is_last: bool) -> None:
        """Before each backward of a GradCache step under DeepSpeed (a micro-step of the engine's unmanaged gradient
        accumulation: each reduce-scatters, engine.step() is the boundary)."""
        if self.zero_stage == 3 and not getattr(self, "_micro_steps_begun", False):
            # ZeRO-3 *copies* a gradient partition in the first micro-step of a step and adds in later ones, and it
            # never zeroes the partitions: a parameter the first backward does not reach (the cache's backward
            # reaches only the temperature; a chunk only its own tower) would add onto the previous step's
            # gradient. Start each step from zeros, adding in every micro-step (without: 1.8e-3 off after 3 steps).
            optimizer = engine.optimizer  # DeepSpeed's ZeRO-3 optimizer
            optimizer.grad_partitions_flat_buffer.zero_()
            optimizer.micro_step_id = 1
        self._micro_steps_begun = not is_last

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        if self.gradcache is not None:
            loss, metrics = self._gradcache_training_step(batch)
        else:
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
