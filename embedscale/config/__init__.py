"""Every config schema of embedscale: one typed vocabulary, split by concern.

    choices.py     every choice as a StrEnum (and `parse_choice` for values that are not Python names)
    model.py       model.*                       data.py      data.*, data.sources, data.pretrain, shard.*
    training.py    loss.*, optim.*, trainer.*, gradcache.*, logger.*
    evaluation.py  eval.*                        retrieval.py index.*, mine.*, generate.*, sweep.*
    reranker.py    reranker.*                    plan.py      plan.*        pipeline.py  pipeline.*
    jobs.py        each job's top-level schema and the checks spanning its sections
    batch.py       BatchSizes: the batch sizes resolved once (never written back into the config)
    store.py       registration with Hydra, composed tree -> dataclass
    docs.py        docs/configuration.md, generated from the field docstrings

Every leaf field has a docstring (the string under it); `python -m embedscale.config.docs` writes
docs/configuration.md from them, and tests/test_config.py fails when that page is stale.

This package must stay light: it is imported by the CLI before torch, transformers or Lightning.
"""

from embedscale.config.batch import BatchSizes, resolve_batch_sizes
from embedscale.config.choices import (
    Accelerator,
    DataFormat,
    IndexKind,
    LoggerName,
    MineFormat,
    MineMethod,
    MineSample,
    OnError,
    OnnxQuantize,
    PaddingSide,
    ParamDtype,
    PlanStrategy,
    Pooling,
    Precision,
    PretrainTask,
    Progress,
    Scheduler,
    ShardFormat,
    SourceLoss,
    Strategy,
    SweepPrecision,
    TeacherScores,
    TorchDtype,
    TriState,
    Verify,
    WandbMode,
    parse_choice,
)
from embedscale.config.data import DataConfig, PretrainConfig, ShardConfig, SourceConfig
from embedscale.config.evaluation import BeirSet, EvalConfig, PairsSet, StsSet
from embedscale.config.jobs import (
    DataRoot,
    EvaluateConfig,
    ExportJobConfig,
    GenerateJobConfig,
    MineJobConfig,
    PipelineJobConfig,
    PlanJobConfig,
    RerankerJobConfig,
    ShardJobConfig,
    SweepJobConfig,
    TrainConfig,
)
from embedscale.config.model import PACKAGED_MINILM, ModelConfig
from embedscale.config.pipeline import PipelineConfig, StageConfig
from embedscale.config.plan import PLAN_SHAPE_KEYS, PlanConfig
from embedscale.config.reranker import RerankerConfig
from embedscale.config.retrieval import GenerateConfig, HubConfig, IndexConfig, MineConfig, OnnxConfig, SweepConfig
from embedscale.config.store import register_configs, schema_of, to_config
from embedscale.config.training import (
    AnchorConfig,
    GradCacheConfig,
    LoggerConfig,
    LossConfig,
    OptimConfig,
    TrainerConfig,
)

__all__ = [
    "PACKAGED_MINILM",
    "PLAN_SHAPE_KEYS",
    "Accelerator",
    "AnchorConfig",
    "BatchSizes",
    "BeirSet",
    "DataConfig",
    "DataFormat",
    "DataRoot",
    "EvalConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "GenerateJobConfig",
    "GradCacheConfig",
    "IndexConfig",
    "IndexKind",
    "LoggerConfig",
    "LoggerName",
    "LossConfig",
    "MineConfig",
    "MineFormat",
    "MineJobConfig",
    "MineMethod",
    "MineSample",
    "ModelConfig",
    "OnError",
    "OptimConfig",
    "PaddingSide",
    "ParamDtype",
    "PairsSet",
    "PipelineConfig",
    "PipelineJobConfig",
    "PlanConfig",
    "PlanJobConfig",
    "PlanStrategy",
    "Pooling",
    "Precision",
    "PretrainConfig",
    "PretrainTask",
    "Progress",
    "RerankerConfig",
    "RerankerJobConfig",
    "Scheduler",
    "ShardConfig",
    "ShardFormat",
    "ShardJobConfig",
    "SourceConfig",
    "StageConfig",
    "Strategy",
    "StsSet",
    "SweepConfig",
    "OnnxConfig",
    "HubConfig",
    "OnnxQuantize",
    "ExportJobConfig",
    "SweepJobConfig",
    "SweepPrecision",
    "SourceLoss",
    "TeacherScores",
    "TorchDtype",
    "TrainConfig",
    "TrainerConfig",
    "TriState",
    "Verify",
    "WandbMode",
    "parse_choice",
    "register_configs",
    "resolve_batch_sizes",
    "schema_of",
    "to_config",
]
