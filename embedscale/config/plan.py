"""`plan.*`: the per-GPU memory planner (`embedscale plan`, embedscale/strategy/memory.py, docs/plan.md).

Keys that also exist in a training config carry the same name (global_batch_size, num_hard_negatives,
query_max_length, document_max_length, lora_r, torch_dtype, gradient_checkpointing, offload_*); null takes the
model's value where the model has one."""

from __future__ import annotations

from dataclasses import dataclass

from embedscale.config.choices import ParamDtype, PlanStrategy, coerce_choices

PLAN_SHAPE_KEYS = ("params", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")


@dataclass
class PlanConfig:
    """`embedscale plan`: per-GPU memory of a training setup and the largest GradCache chunk that fits."""

    strategy: PlanStrategy = PlanStrategy.ddp
    """ddp (everything replicated), zero1 (optimizer states sharded), zero2 (+ gradients), zero3 (+ weights) or
    fsdp (full sharding: zero3 memory-wise). trainer.strategy=deepspeed with trainer.zero_stage=N is zeroN,
    trainer.strategy=fsdp2 is fsdp."""
    gpus: int = 1
    """Data-parallel ranks (all nodes)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB (80 for an H100/A100-80GB)."""
    global_batch_size: int = 1024
    """Queries per step over all ranks (as data.global_batch_size); must split over plan.gpus."""
    num_hard_negatives: int = 0
    """Hard negatives per query (as data.num_hard_negatives)."""
    query_max_length: int | None = None
    """Tokens per query; null: model.query_max_length."""
    document_max_length: int | None = None
    """Tokens per document; null: model.document_max_length."""
    lora_r: int | None = None
    """LoRA rank; 0 = full fine-tuning; null: model.lora_r."""
    torch_dtype: ParamDtype | None = None
    """float32, bfloat16 or float16: bytes per stored weight; null: model.torch_dtype (auto is not allowed here)."""
    mixed_precision: bool = False
    """bf16 autocast (trainer.precision=bf16-mixed): 16-bit activations; 16-bit weights get an fp32 master copy
    and fp32 Adam states (DeepSpeed bf16 / FSDP mixed precision); fp32 weights get autocast's bf16 copies."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward (keeps each layer's input only); null: model.gradient_checkpointing."""
    offload_optimizer: bool = False
    """Adam states and fp32 master weights live in CPU memory (DeepSpeed offload_optimizer; needs zero1-3/fsdp)."""
    offload_params: bool = False
    """Sharded weights live in CPU memory, gathered layer by layer (DeepSpeed offload_param; needs zero3/fsdp)."""
    chunk: int = 0
    """GradCache rows per chunk to evaluate; 0 picks the largest that fits."""
    headroom: float = 0.1
    """Fraction of plan.gpu_memory_gib kept free (fragmentation, spikes the model does not see)."""
    cuda_context_gib: float = 0.75
    """Fixed per-process cost: CUDA context, cuBLAS/cuDNN workspaces, allocator slack (0.5-1 GiB); 0 on CPU."""
    flash_attention: bool = False
    """Fused attention (SDPA flash / memory-efficient kernels) that stores no heads x s x s score matrix."""
    params: float | None = None
    """Total parameters (e.g. 7.11e9); null: computed from the model's config.json (plan.hidden ... plan.vocab)."""
    hidden: int | None = None
    """Hidden size; null: the model's config.json."""
    layers: int | None = None
    """Transformer layers; null: the model's config.json."""
    heads: int | None = None
    """Attention heads; null: the model's config.json."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); null: the config's, else plan.heads."""
    intermediate: int | None = None
    """MLP width; null: the model's config.json."""
    vocab: int | None = None
    """Vocabulary size; null: the model's config.json. The shape keys plan a model that is not on disk."""
    output: str | None = None
    """plan.json path; null: <run dir>/plan.json."""

    def __post_init__(self) -> None:
        coerce_choices(self, "plan")
        for key in ("gpus", "global_batch_size", "query_max_length", "document_max_length", *PLAN_SHAPE_KEYS):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"plan.{key} must be >= 1, got {value}")
        if self.global_batch_size % self.gpus:
            raise ValueError(
                f"plan.global_batch_size={self.global_batch_size} does not split over plan.gpus={self.gpus}: use a "
                f"multiple of {self.gpus}"
            )
        for key in ("num_hard_negatives", "chunk", "lora_r"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"plan.{key} must be >= 0, got {value}")
        if not self.gpu_memory_gib > 0:
            raise ValueError(f"plan.gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"plan.headroom must be in [0, 1), got {self.headroom}")
        if self.cuda_context_gib < 0:
            raise ValueError(f"plan.cuda_context_gib must be >= 0, got {self.cuda_context_gib}")
        if self.offload_optimizer and self.strategy == PlanStrategy.ddp:
            raise ValueError("plan.offload_optimizer=true needs plan.strategy=zero1, zero2, zero3 or fsdp")
        if self.offload_params and self.strategy not in (PlanStrategy.zero3, PlanStrategy.fsdp):
            raise ValueError("plan.offload_params=true needs plan.strategy=zero3 or fsdp (sharded weights)")
