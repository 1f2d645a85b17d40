"""The LightningModule: encode a `PairBatch`, gather across ranks, compute the loss, log what matters.

Multi-rank: every rank gathers the queries, the positives and each hard-negative column of the
whole global batch *with gradient* (embedscale/distributed.py), then scores only its own query rows
(`local`, labels offset by rank x b). Under the strategy's gradient average this is exactly the one-process
gradient of the global batch; one process is the special case W = 1. The learnable temperature lives here,
outside the encoder, but inside the module the strategy wraps -- so its gradient is averaged across ranks like
every other parameter's.

With GradCache on (`gradcache.chunk_size` or `gradcache.token_budget`) the step is GradCache
(contrastive/gradcache.py) with manual optimisation: several backward passes, then the step driver's gradient
sync and clipping, then the update. How each of those happens under DDP, FSDP2 or DeepSpeed is the driver's
business (embedscale/strategy/): the module calls it at fixed points and never asks which strategy runs.

Legend: B = queries in the batch, k = hard negatives per query, D = dim.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from embedscale.config import GradCacheConfig, LossConfig, OptimConfig, TrainerConfig
from embedscale.contrastive.gradcache import gradcache_step, split_tokens
from embedscale.contrastive.guard import FiniteGuard
from embedscale.contrastive.losses import Temperature, contrastive_loss, distillation_loss
from embedscale.contrastive.objectives import angle_similarity, cosent_loss, embedding_kl_loss, embedding_mse_loss
from embedscale.contrastive.optim import build_optimizer
from embedscale.contrastive.queue import NegativeQueue
from embedscale.data.batch import Objective, PairBatch, TextIds
from embedscale.distributed import all_gather_no_grad, all_gather_with_grad, max_over_ranks, traffic_bytes, world
from embedscale.encoder.biencoder import BiEncoder, truncate
from embedscale.strategy import StepDriver, driver_for


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        encoder: BiEncoder,
        *,
        loss_cfg: LossConfig,
        optim_cfg: OptimConfig,
        gradcache: GradCacheConfig | None = None,
        trainer_cfg: TrainerConfig | None = None,
    ) -> None:
        """With GradCache on (`gradcache.enabled`) the module optimises manually (GradCache needs several
        backward passes per step); otherwise Lightning does. Either way the step driver of the run's strategy
        (chosen at `setup` from `trainer_cfg` and the live strategy) syncs and clips the gradients."""
        super().__init__()
        self.gradcache = gradcache if gradcache is not None and gradcache.enabled else None
        self.trainer_cfg = trainer_cfg
        self.automatic_optimization = self.gradcache is None
        self.encoder = encoder.train()  # from_pretrained returns eval mode: dropout must be on while training
        if encoder.cfg.multivector:
            _check_late_interaction(loss_cfg)
        self.loss_cfg = loss_cfg
        self.optim_cfg = optim_cfg
        self.temperature = Temperature(
            loss_cfg.temperature, learnable=loss_cfg.learnable_temperature, max_inverse=loss_cfg.max_inverse_temperature
        )
        self.driver: StepDriver = StepDriver()  # outside a Trainer; replaced at setup
        skip = trainer_cfg.skip_nonfinite_steps if trainer_cfg is not None else 0
        self.guard = FiniteGuard(skip_budget=skip) if trainer_cfg is None or trainer_cfg.nonfinite_check else None
        self._step_loss: torch.Tensor | None = None
        self.steps_this_run = 0
        """Training steps this process ran (a resumed run that ran none is reported: jobs/train.py)."""
        object.__setattr__(self, "guide", None)  # not a submodule: never trained, checkpointed or exported
        self.queue = NegativeQueue(loss_cfg.queue_size) if loss_cfg.queue_size else None
        self._pending_queue: tuple[torch.Tensor, torch.Tensor | None] | None = None  # this step's documents
        self._logged_keys: set[str] = set()
        """Metrics logged so far: a step whose objective has none of one logs it as NaN (mixtures of objectives)."""

    def set_guide(self, guide: BiEncoder | None) -> None:
        """The frozen guide embedder of loss.guide_model (or None), kept outside the module's parameters."""
        if guide is not None:
            guide.eval().requires_grad_(False)
        object.__setattr__(self, "guide", guide)

    @torch.no_grad()
    def guide_embeddings(self, batch: PairBatch):
        """The guide's (queries (B, G), positives (B, G), negatives (B, k, G) or None) of this rank's batch, or None
        without a guide; in the chunks GradCache would use (gradcache.*), so that the guide's forward never holds
        more activations than the trained encoder's."""
        if self.guide is None or not batch.objective.contrastive:
            return None
        device = batch.queries["input_ids"].device
        if next(self.guide.parameters()).device != device:
            self.guide.to(device)
        plan = self.gradcache

        def encode(tokens: dict, side: str) -> torch.Tensor:
            if plan is None:  # without GradCache the encoder's own forward takes the whole batch too
                return self.guide.encode(tokens, side=side).float()
            chunks = split_tokens(
                tokens, plan.chunk_size, token_budget=plan.token_budget, sort_by_length=plan.sort_by_length
            )
            parts = [self.guide.encode(c.tokens, side=side).float() for c in chunks]
            return torch.cat(parts)[torch.argsort(torch.cat([c.rows_c for c in chunks]))]  # batch order

        B, k = batch.batch_size, batch.num_negatives_per_query
        q_BG, docs_XG = encode(batch.queries, "query"), encode(batch.documents, "document")
        return q_BG, docs_XG[:B], docs_XG[B:].view(B, k, -1) if k else None

    def setup(self, stage: str) -> None:
        self.driver = driver_for(self.trainer.strategy, self.trainer_cfg)
        self.driver.prepare(self)
        if self.guard is not None:
            self.guard.cannot_skip = self.driver.cannot_skip_steps

    def configure_model(self) -> None:
        self.driver.configure_model(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.driver.on_save_checkpoint(checkpoint)
        if self.queue is not None:
            checkpoint["embedscale_queue"] = self.queue.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.driver.on_load_checkpoint(checkpoint)
        if self.queue is not None and "embedscale_queue" in checkpoint:
            self.queue.load_state_dict(checkpoint["embedscale_queue"])

    def on_after_backward(self) -> None:
        if self.automatic_optimization:  # a GradCache step syncs once, after all its backward passes
            self.driver.after_backward(self)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.automatic_optimization:  # a GradCache step clips in _gradcache_training_step
            grad_norm = self.driver.clip(self, optimizer)
            if not self._finite_step(optimizer, grad_norm):
                for p in self.parameters():  # AdamW skips parameters without a gradient: no update at all
                    p.grad = None

    def _finite_step(self, optimizer, grad_norm: torch.Tensor | None) -> bool:
        """The non-finite guard (contrastive/guard.py): True when this step may update the weights."""
        if self.guard is None:
            return True
        return self.guard.check(
            step=self.trainer.global_step + 1,
            loss=self._step_loss,
            grad_norm=grad_norm,
            lr=float(optimizer.param_groups[0]["lr"]),
            temperature=float(1.0 / self.temperature().detach()),
        )

    def compute_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, k = batch.batch_size, batch.num_negatives_per_query
        q_BD = self.encoder.encode(batch.queries, side="query")
        docs_XD = self.encoder.encode(batch.documents, side="document")  # (B * (1 + k), D) or (.., M, D)
        neg_BkD = docs_XD[B:].view(B, k, *docs_XD.shape[1:]) if k else None
        return self.loss_from_embeddings(
            q_BD,
            docs_XD[:B],
            neg_BkD,
            batch.ids,
            batch.in_batch_negatives,
            teacher_BG=batch.teacher_BG,
            guide=self.guide_embeddings(batch),
            objective=batch.objective,
            token_masks=batch.token_masks,
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
        guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
        objective: Objective | None = None,
        token_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gather this rank's embeddings into the global batch and score the local query rows; with teacher
        scores (and loss.distill_weight > 0) add the distillation term over each local row's own candidates.
        `objective`: the batch's source objective (data.sources[].loss); None or contrastive: the above, else
        `objective_loss`. Either way multiplied by the source's loss_weight. model.multivector: the embeddings
        are token matrices (B, L, D), (B, M, D), (B, k, M, D) with `token_masks` (queries (B, L), documents
        (B * (1 + k), M)), scored by MaxSim (`late_interaction_loss`)."""
        if objective is not None and not objective.contrastive:
            if self.encoder.cfg.multivector:
                raise ValueError(
                    f"data.sources[].loss={objective.loss}: a model.multivector model trains contrastive sources only"
                )
            return self.objective_loss(q_BD, pos_BD, objective)
        if self.encoder.cfg.multivector:
            if token_masks is None:
                raise ValueError("model.multivector: loss_from_embeddings needs the batch's token_masks")
            loss, metrics = self.late_interaction_loss(
                q_BD, pos_BD, neg_BkD, token_masks, ids, in_batch_negatives, teacher_BG
            )
        else:
            loss, metrics = self._contrastive(q_BD, pos_BD, neg_BkD, ids, in_batch_negatives, teacher_BG, guide)
        if objective is not None and objective.weight != 1.0:
            loss = loss * objective.weight
            metrics["loss"] = loss.detach()
        return loss, metrics

    def objective_loss(
        self, q_BD: torch.Tensor, pos_BD: torch.Tensor, objective: Objective
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A non-contrastive source's loss (contrastive/objectives.py) over the global batch, at each Matryoshka
        dimension (model.matryoshka_dims, weighted; mse compares full embeddings), times the source's weight.

        CoSENT / AnglE: every rank gathers the pair similarities (N scalars, with gradient) and the gold scores and
        computes the same global loss. KL: the local queries against the gathered positives. MSE: local rows. A
        learnable temperature unused by the objective is kept in the graph (x 0) so that every strategy sees the
        same parameters take part in every step."""
        rank, _ = world()
        B, cfg, kind = q_BD.shape[0], self.encoder.cfg, objective.loss
        if kind == "mse":
            loss, metrics = embedding_mse_loss(q_BD, pos_BD, objective.teacher_query_BT, objective.teacher_positive_BT)
            loss = loss + 0.0 * self.temperature()
        else:
            dims = list(cfg.matryoshka_dims) or [None]
            weights = list(cfg.matryoshka_weights) or [1.0] * len(dims)
            if kind == "kl":
                q_all = all_gather_with_grad(q_BD, "query embeddings")
                pos_all = all_gather_with_grad(pos_BD, "positive embeddings")
                t_q = all_gather_no_grad(objective.teacher_query_BT.to(q_BD.device), "teacher query embeddings")
                t_pos = all_gather_no_grad(objective.teacher_positive_BT.to(q_BD.device), "teacher positive embeddings")
            else:
                scores_N = all_gather_no_grad(objective.scores_B.to(q_BD.device), "gold scores")
            loss, metrics = 0.0, {}
            for dim, weight in zip(dims, weights, strict=True):
                cut = (lambda x: x) if dim is None else (lambda x, d=dim: truncate(x, d, normalize=cfg.normalize))
                if kind == "kl":
                    loss_d, metrics_d = embedding_kl_loss(
                        cut(q_all),
                        cut(pos_all),
                        t_q,
                        t_pos,
                        local=slice(rank * B, rank * B + B),
                        inverse_temperature=self.temperature(),
                        teacher_temperature=self.loss_cfg.embedding_teacher_temperature,
                    )
                else:
                    similarity = angle_similarity if kind == "angle" else F.cosine_similarity
                    sim_N = all_gather_with_grad(similarity(cut(q_BD), cut(pos_BD)), "pair similarities")
                    loss_d, metrics_d = cosent_loss(
                        sim_N, scores_N, scale=self.loss_cfg.cosent_scale, row_chunk_size=self.loss_cfg.row_chunk_size
                    )
                    loss_d = loss_d + 0.0 * self.temperature()
                loss = loss + weight * loss_d
                if dim is not None:
                    metrics[f"loss_dim{dim}"] = loss_d.detach()
                if dim is None or dim == max(dims):
                    metrics.update(metrics_d)
        loss = loss * objective.weight
        metrics[f"loss_{kind}"] = loss.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    def late_interaction_loss(
        self,
        q_BLD: torch.Tensor,
        pos_BMD: torch.Tensor,
        neg_BkMD: torch.Tensor | None,
        token_masks: tuple[torch.Tensor, torch.Tensor],
        ids: TextIds,
        in_batch_negatives: bool,
        teacher_BG: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ColBERT's loss over the global batch (contrastive/maxsim.py): every rank pads its token matrices to the
        widest of all ranks, gathers them with gradient (their masks without), and scores its own query rows by
        MaxSim against every gathered positive and hard negative, in (maxsim_row_chunk_size x
        maxsim_doc_chunk_size) blocks; plus distillation to teacher scores over each row's own candidates."""
        from embedscale.contrastive.maxsim import maxsim_distillation_loss, maxsim_loss

        rank, _ = world()
        B, k = q_BLD.shape[0], 0 if neg_BkMD is None else neg_BkMD.shape[1]
        q_mask_BL, docs_mask_XM = token_masks
        q_mask_BL, docs_mask_XM = q_mask_BL.to(q_BLD.device).bool(), docs_mask_XM.to(q_BLD.device).bool()
        pos_mask_BM = docs_mask_XM[:B]
        neg_mask_BkM = docs_mask_XM[B:].view(B, k, -1) if k else None
        L, M = max_over_ranks(q_BLD.shape[1]), max_over_ranks(pos_BMD.shape[1])  # one width for every rank's
        q_BLD, q_mask_BL = _pad_tokens(q_BLD, q_mask_BL, L)
        pos_BMD, pos_mask_BM = _pad_tokens(pos_BMD, pos_mask_BM, M)
        if k:
            neg_BkMD, neg_mask_BkM = _pad_tokens(neg_BkMD, neg_mask_BkM, M)
        q_NLD = all_gather_with_grad(q_BLD, "query token matrices")
        pos_NMD = all_gather_with_grad(pos_BMD, "positive token matrices")
        neg_NkMD = _gather_columns(neg_BkMD, all_gather_with_grad, "negative token matrices") if k else None
        q_mask_NL = all_gather_no_grad(q_mask_BL, "query token masks")
        pos_mask_NM = all_gather_no_grad(pos_mask_BM, "positive token masks")
        neg_mask_NkM = _gather_columns(neg_mask_BkM, all_gather_no_grad, "negative token masks") if k else None
        loss, metrics = maxsim_loss(
            q_NLD,
            q_mask_NL,
            pos_NMD,
            pos_mask_NM,
            neg_NkMD,
            neg_mask_NkM,
            inverse_temperature=self.temperature(),
            local=slice(rank * B, rank * B + B),
            ids=self._gathered_ids(ids),
            row_chunk_size=self.loss_cfg.maxsim_row_chunk_size,
            doc_chunk_size=self.loss_cfg.maxsim_doc_chunk_size,
            in_batch_negatives=in_batch_negatives,
            normalize=self.loss_cfg.maxsim_normalize,
        )
        if teacher_BG is not None and self.loss_cfg.distill_weight > 0 and k:
            kl, distill = maxsim_distillation_loss(
                q_BLD,
                q_mask_BL,
                pos_BMD,
                pos_mask_BM,
                neg_BkMD,
                neg_mask_BkM,
                teacher_BG,
                inverse_temperature=self.temperature(),
                teacher_temperature=self.loss_cfg.distill_temperature,
                normalize=self.loss_cfg.maxsim_normalize,
            )
            loss = loss + self.loss_cfg.distill_weight * kl
            metrics.update(distill)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _gathered_ids(self, ids: TextIds) -> TextIds | None:
        """The global batch's content ids (duplicate masking), or None with loss.mask_duplicates off."""
        if not self.loss_cfg.mask_duplicates:
            return None
        return TextIds(
            all_gather_no_grad(ids.query_B, "query ids"),
            all_gather_no_grad(ids.positive_B, "positive ids"),
            None if ids.negatives_Bk is None else all_gather_no_grad(ids.negatives_Bk, "negative ids"),
        )

    def _contrastive(
        self,
        q_BD: torch.Tensor,
        pos_BD: torch.Tensor,
        neg_BkD: torch.Tensor | None,
        ids: TextIds,
        in_batch_negatives: bool,
        teacher_BG: torch.Tensor | None,
        guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rank, _ = world()
        B = q_BD.shape[0]
        q_ND = all_gather_with_grad(q_BD, "query embeddings")
        pos_ND = all_gather_with_grad(pos_BD, "positive embeddings")
        neg_NkD = None if neg_BkD is None else _gather_columns(neg_BkD, all_gather_with_grad, "negative")
        gathered_ids = self._gathered_ids(ids)
        guide_all = None
        if guide is not None:  # the guide's view of the global batch, gathered like the embeddings (no gradient)
            g_q, g_pos, g_neg = guide
            guide_all = (
                all_gather_no_grad(g_q, "guide queries"),
                all_gather_no_grad(g_pos, "guide positives"),
                None if g_neg is None else _gather_columns(g_neg, all_gather_no_grad, "guide negative"),
            )
        cfg = self.encoder.cfg
        queue = None
        if self.queue is not None and in_batch_negatives:  # the queue's documents are in-batch-like negatives
            queue = self.queue.view()
            docs_XD = pos_ND if neg_NkD is None else torch.cat([pos_ND, neg_NkD.reshape(-1, pos_ND.shape[-1])])
            docs_ids = None
            if gathered_ids is not None:
                negative_ids = () if gathered_ids.negatives_Bk is None else (gathered_ids.negatives_Bk.reshape(-1),)
                docs_ids = torch.cat([gathered_ids.positive_B, *negative_ids])
            self._pending_queue = (docs_XD.detach(), docs_ids)  # pushed when the step is done (training_step)
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
            query_query=self.loss_cfg.query_query,
            document_document=self.loss_cfg.document_document,
            margin_guard=self.loss_cfg.margin_guard,
            guide=guide_all,
            guide_margin=self.loss_cfg.guide_margin,
            queue=queue,
        )
        if self.queue is not None:
            metrics["queue_length"] = torch.tensor(float(len(self.queue)))
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
        self.driver.begin_step(self, manual=not self.automatic_optimization)

    def _gradcache_training_step(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        loss, metrics = gradcache_step(self, batch, plan=self.gradcache, driver=self.driver)
        self.driver.sync_gradients(self)
        self._step_loss = loss
        if self._finite_step(optimizer, self.driver.clip(self, optimizer)):
            optimizer.step()  # under DeepSpeed engine.step(): partitioned gradients finalised, clipped, AdamW, zeroed
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss, metrics

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        traffic = traffic_bytes()
        self.steps_this_run += 1
        if self.gradcache is not None:
            loss, metrics = self._gradcache_training_step(batch)
        else:
            loss, metrics = self.compute_loss(batch)
            self._step_loss = loss.detach()
        metrics["temperature"] = 1.0 / self.temperature().detach()
        if self._pending_queue is not None:  # after the step's loss (and GradCache's passes): the next step sees it
            self.queue.push(*self._pending_queue)
            self._pending_queue = None
        if world()[1] > 1:  # what this rank received from the others in this step (embedscale/distributed.py);
            kinds = traffic if self.gradcache is not None else ("gathered",)  # else the backward runs after this
            for kind in kinds:
                metrics[f"{kind}_MiB"] = torch.tensor((traffic_bytes()[kind] - traffic[kind]) / 2**20)
        for key in self._logged_keys - metrics.keys():  # another source's objective logged it: not this step's value
            metrics[key] = torch.tensor(float("nan"))  # (Lightning would repeat its last value)
        self._logged_keys |= metrics.keys()
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


def _pad_tokens(x_BLD: torch.Tensor, mask_BL: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token matrices (and their masks) padded with unscored zero vectors to `width` tokens (dim -2 / -1)."""
    extra = width - x_BLD.shape[-2]
    if extra == 0:
        return x_BLD, mask_BL
    return F.pad(x_BLD, (0, 0, 0, extra)), F.pad(mask_BL, (0, extra), value=False)


def _check_late_interaction(loss_cfg: LossConfig) -> None:
    """ValueError naming each loss.* setting a model.multivector model does not train with."""
    unsupported = {
        "loss.symmetric_weight": loss_cfg.symmetric_weight > 0,
        "loss.query_query": loss_cfg.query_query,
        "loss.document_document": loss_cfg.document_document,
        "loss.margin_guard": loss_cfg.margin_guard is not None,
        "loss.guide_model": loss_cfg.guide_model is not None,
        "loss.queue_size": loss_cfg.queue_size > 0,
    }
    on = [key for key, value in unsupported.items() if value]
    if on:
        raise ValueError(
            f"model.multivector=true scores queries against documents by MaxSim only: unset {', '.join(on)}"
        )


def _gather_columns(x_BkX: torch.Tensor, gather, name: str) -> torch.Tensor:
    """(B, k, X) -> (N, k, X), one column at a time: gathering the rows whole would interleave the ranks."""
    return torch.stack([gather(x_BkX[:, m], f"{name} column {m}") for m in range(x_BkX.shape[1])], dim=1)
