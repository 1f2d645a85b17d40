"""The top-level schema of each job: its sections, and the checks that span them.

`DataRoot` is the one definition of `data_root`, which every job that reads files relative to the data root
inherits (training has `data.root`, the same value inside its data section).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedscale.config.batch import resolve_batch_sizes
from embedscale.config.choices import DataFormat, Precision, Strategy
from embedscale.config.data import DataConfig, ShardConfig
from embedscale.config.evaluation import EvalConfig
from embedscale.config.fields import bounded, check_fields
from embedscale.config.model import ModelConfig
from embedscale.config.pipeline import PipelineConfig
from embedscale.config.plan import PlanConfig
from embedscale.config.reranker import RerankerConfig
from embedscale.config.retrieval import GenerateConfig, HubConfig, IndexConfig, MineConfig, OnnxConfig, SweepConfig
from embedscale.config.training import (
    AnchorConfig,
    GradCacheConfig,
    LoggerConfig,
    LossConfig,
    OptimConfig,
    TrainerConfig,
)


@dataclass
class DataRoot:
    data_root: str | None = None
    """Root of relative data paths; None reads $EMBEDSCALE_DATA, then ../shared/data next to the working directory
    or the repository (as data.root for training)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The bi-encoder trained (model.*)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data and its batching (data.*)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The contrastive loss (loss.*)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule (optim.*)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Devices, strategy, precision, checkpoints (trainer.*)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Where the training curves go (logger.*)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What is evaluated before, during and after training (eval.*)."""
    gradcache: GradCacheConfig = field(default_factory=GradCacheConfig)
    """GradCache: exact gradients with one chunk of activation memory (gradcache.*)."""
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    """Keeping the model near its starting weights against forgetting: L2-SP, weight interpolation (anchor.*)."""
    seed: int = bounded(42, ge=0, le=2**32 - 1)
    """Seeds Python, numpy and torch on every rank (and DataLoader workers), and the data order."""
    run_dir: str | None = None
    """Where checkpoints, logs, metrics.json and the export go; None uses Hydra's run directory."""
    export: bool = True
    """Export a sentence-transformers/HF model to <run_dir>/model after training."""
    overwrite: bool = False
    """Train into a run directory that already holds a run (checkpoints, model/, metrics.json), replacing its
    checkpoints and export. Without it such a run_dir is refused, unless trainer.resume continues that run."""
    init_from: str | None = None
    """Start from an earlier stage: its run directory (its export, <dir>/model, is used) or an export
    directory. Replaces model.name_or_path; the export restores its pooling, prefixes and towers. The parent
    (path, weights fingerprint, its final metrics) is recorded in metrics.json under `init_from`."""

    def __post_init__(self) -> None:
        check_fields(self, "")
        world = self.trainer.world_size()
        if world is not None:
            sizes = resolve_batch_sizes(self, world)  # checked now; the train job resolves again with the launcher's
            if self.data.num_hard_negatives == 0 and sizes.global_batch_size == 1 and self.loss.symmetric_weight == 0:
                raise ValueError(
                    f"data.global_batch_size=1 (data.batch_size_per_rank={sizes.batch_size_per_rank} x {world} "
                    "rank) with no hard negatives leaves no negatives: raise one of them"
                )
        if (self.loss.distill_weight > 0) != (self.data.teacher_scores is not None):
            raise ValueError(
                f"loss.distill_weight={self.loss.distill_weight} and data.teacher_scores={self.data.teacher_scores}: "
                "distillation needs both (a weight > 0 and the scores to distil from), or neither"
            )
        if self.data.teacher_scores is not None and (
            self.data.format is not DataFormat.shards or self.data.num_hard_negatives < 1
        ):
            raise ValueError(
                "data.teacher_scores needs data.format=shards (written by `embedscale mine`) and "
                "data.num_hard_negatives >= 1 (the teacher ranks a query's positive against its negatives)"
            )
        if self.trainer.strategy in (Strategy.fsdp2, Strategy.deepspeed) and (
            self.eval.beir or self.eval.pairs or self.eval.sts
        ):
            raise ValueError(
                f"trainer.strategy={self.trainer.strategy} does not evaluate during training yet: add eval=none"
            )
        self._check_gradcache()
        self._check_anchor()

    def _check_anchor(self) -> None:
        a = self.anchor
        if a.l2_sp_weight == 0 and a.interpolation == 1:
            return
        keys = "anchor.l2_sp_weight / anchor.interpolation"
        if self.trainer.strategy in (Strategy.fsdp2, Strategy.deepspeed):
            raise ValueError(f"{keys} with trainer.strategy={self.trainer.strategy}: not supported yet (use ddp)")
        if self.model.lora_r > 0:
            raise ValueError(
                f"{keys} with model.lora_r={self.model.lora_r}: LoRA already leaves the backbone at its start; use "
                "one or the other (docs/domain.md)"
            )
        if self.optim.lr * a.l2_sp_weight >= 1:
            raise ValueError(
                f"anchor.l2_sp_weight={a.l2_sp_weight} with optim.lr={self.optim.lr}: each step would pull weights "
                f"{self.optim.lr * a.l2_sp_weight:.3g} of the way back (past the start); keep lr x l2_sp_weight < 1"
            )
        if a.interpolation < 1 and self.eval.export_best:
            raise ValueError(
                "anchor.interpolation < 1 with eval.export_best=true: the best checkpoint is chosen before the "
                "interpolation; use one or the other"
            )

    def _check_gradcache(self) -> None:
        if not self.gradcache.enabled:
            return
        t = self.trainer
        if t.precision == Precision.fp16_mixed:
            raise ValueError(
                "gradcache with trainer.precision=16-mixed: fp16 loss scaling would scale the cached "
                "surrogates but not the temperature's gradient; use trainer.precision=bf16-mixed or 32-true"
            )
        if t.strategy == Strategy.deepspeed and t.zero_stage == 2 and t.offload_optimizer:
            raise ValueError(
                "gradcache with trainer.zero_stage=2 and trainer.offload_optimizer=true: measured wrong (DeepSpeed's "
                "ZeRO-2 offload does not add up the gradients of a step's several backward passes); use "
                "trainer.zero_stage=3 with the offload, or trainer.offload_optimizer=false"
            )
        if t.accumulate_grad_batches > 1:
            raise ValueError(
                "gradcache with trainer.accumulate_grad_batches > 1: set accumulate_grad_batches=1 and "
                "raise data.batch_size_per_rank instead (GradCache makes the batch itself bigger, with more negatives)"
            )


@dataclass
class EvaluateConfig(DataRoot):
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model evaluated: a hub id, a local model or an embedscale export (model.*)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The sets and metrics (eval.*)."""
    output: str | None = None
    """metrics.json path; None writes into Hydra's run directory."""
    mteb_output: str | None = None
    """Also write MTEB result files (mteb's TaskResult JSON, one per set MTEB knows: scifact -> SciFact, stsb ->
    STSBenchmark) under mteb_output/<model>/<revision>/, for mteb's result tooling; None: off (docs/evaluation.md)."""


@dataclass
class ShardJobConfig(DataRoot):
    shard: ShardConfig = field(default_factory=ShardConfig)
    """What is converted and how it is cut into shards (shard.*)."""


@dataclass
class MineJobConfig(DataRoot):
    model: ModelConfig = field(default_factory=ModelConfig)
    """The bi-encoder for dense and hybrid mining: a hub id, a local model or an embedscale export."""
    mine: MineConfig = field(default_factory=MineConfig)
    """The data mined for, the candidates and the false-negative filters (mine.*)."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """The faiss index of dense mining (index.*)."""


@dataclass
class GenerateJobConfig(DataRoot):
    model: ModelConfig = field(default_factory=ModelConfig)
    """The round-trip filter's bi-encoder (used when generate.filter_top_k > 0): a hub id, a local model or an
    embedscale export."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """The corpus, the language model and its prompts, sampling, the filter and the output (generate.*)."""


@dataclass
class RerankerJobConfig(DataRoot):
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    """The cross-encoder, its training groups and the re-ranking (reranker.*)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule (optim.*)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Devices, precision and steps (trainer.*; one process)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Where the training curves go (logger.*)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The BEIR sets to re-rank on (eval.beir), cutoffs (eval.k_values), bi-encoder settings and cache."""
    seed: int = bounded(42, ge=0, le=2**32 - 1)
    """Seeds Python, numpy and torch, and the data order."""
    run_dir: str | None = None
    """Where model/, logs/, runs/ and metrics.json go; None uses Hydra's run directory."""

    def __post_init__(self) -> None:
        check_fields(self, "")
        if self.trainer.world_size() != 1:  # the bi-encoder search after training would wait on absent ranks
            raise ValueError(
                f"the reranker job trains on one process (trainer.devices={self.trainer.devices}, "
                f"trainer.num_nodes={self.trainer.num_nodes}): set trainer.devices=1 trainer.num_nodes=1"
            )
        if self.trainer.resume is not None or self.trainer.checkpoint_every_n_steps is not None:
            raise ValueError(
                "trainer.resume / trainer.checkpoint_every_n_steps: the reranker job keeps no checkpoints (it saves "
                "the trained model to <run_dir>/model): unset them"
            )
        if self.reranker.biencoder_runs and len(self.reranker.biencoder_runs) != len(self.eval.beir):
            raise ValueError(
                f"reranker.biencoder_runs has {len(self.reranker.biencoder_runs)} run(s) but eval.beir has "
                f"{len(self.eval.beir)} set(s): give one run per set, in order, or none"
            )
        if self.eval.sts:
            raise ValueError("eval.sts is set, but a cross-encoder re-ranks retrieval runs only: set eval.sts=[]")


@dataclass
class SweepJobConfig(DataRoot):
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model swept (model.*)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The BEIR sets swept (eval.beir), with eval.batch_size, eval.max_length and the embedding cache."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The dims and precisions measured (sweep.*)."""

    def __post_init__(self) -> None:
        if self.eval.sts:
            raise ValueError("eval.sts is set, but the sweep measures retrieval only: set eval.sts=[] or eval=scifact")


@dataclass
class ExportJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model exported (model.name_or_path: an embedscale export, a sentence-transformers or HF model); its
    pooling, normalisation, prefixes and token budgets are those the export recorded, or model.*."""
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    """What is written and how it is checked (onnx.*)."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Publishing the model folder with its onnx/ to the Hugging Face Hub, or a local dry run of it (hub.*)."""


@dataclass
class PlanJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model planned: its config.json gives the shape (unless plan.* overrides it); lengths, LoRA, dtype
    and checkpointing default to its values."""
    loss: LossConfig = field(default_factory=LossConfig)
    """loss.row_chunk_size bounds the score block."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """The setup planned (plan.*)."""


@dataclass
class PipelineJobConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """The stages and how they run (pipeline.*)."""
