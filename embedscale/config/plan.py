"""`plan.*`: the per-GPU memory planner (`embedscale plan`, embedscale/strategy/memory.py, docs/plan.md).

Keys that also exist in a training config carry the same name (global_batch_size, num_hard_negatives,
query_max_length, document_max_length, lora_r, torch_dtype, gradient_checkpointing, offload_*); null takes the
model's value where the model has one."""

from __future__ import annotations

from dataclasses import dataclass

from embedscale.config.choices import ParamDtype, PlanStrategy
from embedscale.config.fields import bounded, check_fields

PLAN_SHAPE_KEYS = ("params", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")


@dataclass
class PlanConfig:
    """`embedscale plan`: per-GPU memory of a training setup and the largest GradCache chunk that fits."""

    strategy: PlanStrategy = PlanStrategy.ddp
    """ddp (everything replicated), zero1 (optimizer states sharded), zero2 (+ gradients), zero3 (+ weights) or
    fsdp (full sharding: zero3 memory-wise). trainer.strategy=deepspeed with trainer.zero_stage=N is zeroN,
    trainer.strategy=fsdp2 is fsdp."""
    gpus: int = bounded(1, ge=1)
    """Data-parallel ranks (all nodes)."""
    gpu_memory_gib: float = bounded(80.0, gt=0)
    """Memory of one GPU in GiB (80 for an H100/A100-80GB)."""
    global_batch_size: int = bounded(1024, ge=1)
    """Queries per step over all ranks (as data.global_batch_size); must split over plan.gpus."""
    num_hard_negatives: int = bounded(0, ge=0)
    """Hard negatives per query (as data.num_hard_negatives)."""
    query_max_length: int | None = bounded(None, ge=1)
    """Tokens per query; null: model.query_max_length."""
    document_max_length: int | None = bounded(None, ge=1)
    """Tokens per document; null: model.document_max_length."""
    lora_r: int | None = bounded(None, ge=0)
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
    chunk: int = bounded(0, ge=0)
    """GradCache rows per chunk to evaluate; 0 picks the largest that fits."""
    headroom: float = bounded(0.1, ge=0, lt=1)
    """Fraction of plan.gpu_memory_gib kept free (fragmentation, spikes the model does not see)."""
    cuda_context_gib: float = bounded(0.75, ge=0)
    """Fixed per-process cost: CUDA context, cuBLAS/cuDNN workspaces, allocator slack (0.5-1 GiB); 0 on CPU."""
    flash_attention: bool = False
    """Fused attention (SDPA flash / memory-efficient kernels) that stores no heads x s x s score matrix. Not in fp32
    with grouped-query attention (kv_heads < heads): PyTorch's fused kernels take no GQA in fp32 and SDPA falls back
    to its math kernel, planned like eager attention."""
    params: float | None = bounded(None, ge=1)
    """Total parameters (e.g. 7.11e9); null: computed from the model's config.json (plan.hidden ... plan.vocab)."""
    hidden: int | None = bounded(None, ge=1)
    """Hidden size; null: the model's config.json."""
    layers: int | None = bounded(None, ge=1)
    """Transformer layers; null: the model's config.json."""
    heads: int | None = bounded(None, ge=1)
    """Attention heads; null: the model's config.json."""
    kv_heads: int | None = bounded(None, ge=1)
    """Key/value heads (grouped-query attention); null: the config's, else plan.heads."""
    intermediate: int | None = bounded(None, ge=1)
    """MLP width; null: the model's config.json."""
    vocab: int | None = bounded(None, ge=1)
    """Vocabulary size; null: the model's config.json. The shape keys plan a model that is not on disk."""
    output: str | None = None
    """plan.json path; null: <run dir>/plan.json."""

    def __post_init__(self) -> None:
        check_fields(self, "plan")
        if self.global_batch_size % self.gpus:
            raise ValueError(
                f"plan.global_batch_size={self.global_batch_size} does not split over plan.gpus={self.gpus}: use a "
                f"multiple of {self.gpus}"
            )
        if self.offload_optimizer and self.strategy == PlanStrategy.ddp:
            raise ValueError("plan.offload_optimizer=true needs plan.strategy=zero1, zero2, zero3 or fsdp")
        if self.offload_params and self.strategy not in (PlanStrategy.zero3, PlanStrategy.fsdp):
            raise ValueError("plan.offload_params=true needs plan.strategy=zero3 or fsdp (sharded weights)")
