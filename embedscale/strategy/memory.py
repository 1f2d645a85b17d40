"""The memory each strategy needs per GPU, term by term, and the largest GradCache chunk that fits (the model
behind `embedscale plan`, embedscale/jobs/plan.py).

    embedscale plan plan.gpus=8 plan.gpu_memory_gib=80 plan.global_batch_size=4096 plan.strategy=zero2
    embedscale plan model=e5_mistral +plan=e5_mistral_7b          # the 7B worked example of docs/plan.md

Why a closed-form planner and not a dry run: the setups worth planning (a 7B decoder on 8 x 80 GiB) do not fit
on the machine where one plans them, and the answer is needed before a job queues for hours. Every term is a
pure function of the model's shape and the plan's settings, with its formula in its docstring, so a user can
check it by hand and see which knob moves which term. The activation terms are fitted to the bytes autograd saves
in transformers' Llama, Mistral and BERT layers, counted exactly (bench/activation_bytes.py: within 0.5% on every
measured case); bench/plan_vs_measured.py and bench/gpu_plan_check.py compare the whole plan with measured peaks
(CPU, H200) and docs/plan.md reports where they disagree.

What one GradCache step holds at its peak (contrastive/gradcache.py): the weights, gradients and optimizer
states (per ZeRO stage), the activations of one chunk (the kept chunk's graph is alive while the loss runs),
the rank's embeddings with their cached gradients, the all-gathered embeddings with their gradients, and one
(row chunk x global candidates) score block of the loss (contrastive/losses.py).

Legend: P = parameters, T = trainable parameters, W = ranks (plan.gpus), L = layers, h = hidden, a = heads,
i = intermediate size, s = tokens per text, c = texts per chunk, b = queries per rank, N = W * b,
k = hard negatives, d = embedding dim (= h), C = N * (1 + k) candidates, r = score rows at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from embedscale.config import PlanConfig, PlanJobConfig
from embedscale.strategy.shape import ModelShape, count_params, resolve_shape  # noqa: F401 - re-exported

GIB = 2**30
SHARDED_WEIGHTS = ("zero3", "fsdp")
SHARDED_GRADIENTS = ("zero2", "zero3", "fsdp")
SHARDED_OPTIMIZER = ("zero1", "zero2", "zero3", "fsdp")
SCORE_BYTES = 28
"""Bytes per score element of one loss block at its peak (backward of one checkpointed row chunk): the fp32
matmul output, its temperature-scaled and masked copies, log-softmax output, and two gradient buffers
(6 x 4 bytes), plus ~4 bytes of boolean duplicate masks. A modelling constant, not a fit: an upper bound
(bench/plan_vs_measured.py measures ~23 bytes of live memory per element on CPU)."""


def resolve_plan(cfg: PlanJobConfig) -> PlanConfig:
    """plan.* with every null filled from model.* (lengths, LoRA rank, dtype, checkpointing)."""
    plan, model = cfg.plan, cfg.model
    dtype = plan.torch_dtype or model.torch_dtype
    if dtype == "auto":
        raise ValueError(
            "model.torch_dtype=auto: the planner needs the dtype, set plan.torch_dtype=bfloat16 or float32"
        )
    return dataclasses.replace(
        plan,
        query_max_length=plan.query_max_length or model.query_max_length,
        document_max_length=plan.document_max_length or model.document_max_length,
        lora_r=model.lora_r if plan.lora_r is None else plan.lora_r,
        torch_dtype=dtype,
        gradient_checkpointing=(
            model.gradient_checkpointing if plan.gradient_checkpointing is None else plan.gradient_checkpointing
        ),
    )


@dataclass
class Term:
    name: str
    basis: str
    bytes: float


def _param_bytes(plan: PlanConfig) -> int:
    return 4 if plan.torch_dtype == "float32" else 2


def _act_bytes(plan: PlanConfig) -> int:
    return 2 if plan.mixed_precision or _param_bytes(plan) == 2 else 4


def weights_term(shape: ModelShape, plan: PlanConfig) -> Term:
    """Stored weights: P x p_bytes (+ LoRA adapters in fp32, peft's default), / W under zero3/fsdp, 0 when
    offloaded (plan.offload_params)."""
    p = _param_bytes(plan)
    lora = shape.lora_params(plan.lora_r)
    total = shape.params * p + lora * 4
    if plan.offload_params:
        return Term("weights", f"P x {p} B, offloaded to CPU", 0.0)
    if plan.strategy in SHARDED_WEIGHTS:
        return Term("weights", f"(P x {p} B + LoRA x 4 B) / W" if lora else f"P x {p} B / W", total / plan.gpus)
    return Term("weights", f"P x {p} B + LoRA x 4 B" if lora else f"P x {p} B", total)


def gathered_layers_term(shape: ModelShape, plan: PlanConfig) -> Term:
    """zero3/fsdp (W > 1): the layer being computed and the one prefetched, unsharded: 2 x P_layer x p_bytes."""
    if plan.strategy not in SHARDED_WEIGHTS or plan.gpus == 1:
        return Term("gathered layers", "only zero3/fsdp on W > 1", 0.0)
    return Term(
        "gathered layers", f"2 layers x P_layer x {_param_bytes(plan)} B", 2 * shape.layer_params() * _param_bytes(plan)
    )


def trainable(shape: ModelShape, plan: PlanConfig) -> tuple[float, int]:
    """(T, bytes per trainable weight): all P at p_bytes, or the LoRA adapters in fp32."""
    if plan.lora_r:
        return float(shape.lora_params(plan.lora_r)), 4
    return shape.params, _param_bytes(plan)


def gradients_term(shape: ModelShape, plan: PlanConfig) -> Term:
    """Gradients in the trainable weights' dtype: T x g_bytes, / W under zero2/zero3/fsdp."""
    t, g = trainable(shape, plan)
    what = "T_lora" if plan.lora_r else "P"
    if plan.strategy in SHARDED_GRADIENTS:
        return Term("gradients", f"{what} x {g} B / W", t * g / plan.gpus)
    return Term("gradients", f"{what} x {g} B", t * g)


def optimizer_bytes_per_param(shape: ModelShape, plan: PlanConfig) -> int:
    """AdamW: two moments in fp32 (8 B) when the trainable weights are fp32 or under mixed precision (then a
    16-bit weight also has an fp32 master copy, +4 B); pure 16-bit training keeps both moments in the weight
    dtype (torch.optim.AdamW: 2 x 2 B)."""
    _, g = trainable(shape, plan)
    if g == 4:
        return 8
    return 12 if plan.mixed_precision else 4


def optimizer_term(shape: ModelShape, plan: PlanConfig) -> Term:
    """Adam states (+ fp32 master weights): T x {8, 12, 4} B (optimizer_bytes_per_param), / W under
    zero1/2/3/fsdp, 0 on the GPU when offloaded (plan.offload_optimizer)."""
    t, _ = trainable(shape, plan)
    per = optimizer_bytes_per_param(shape, plan)
    what = "T_lora" if plan.lora_r else "P"
    if plan.offload_optimizer:
        return Term("optimizer states", f"{what} x {per} B, offloaded to CPU", 0.0)
    if plan.strategy in SHARDED_OPTIMIZER:
        return Term("optimizer states", f"{what} x {per} B / W", t * per / plan.gpus)
    return Term("optimizer states", f"{what} x {per} B (Adam m, v{', master' if per == 12 else ''})", t * per)


def ddp_buckets_term(shape: ModelShape, plan: PlanConfig) -> Term:
    """DDP on W > 1: the reducer's flat gradient buckets, a second copy of the gradients (T x g_bytes;
    gradient_as_bucket_view=True would avoid it)."""
    if plan.strategy != "ddp" or plan.gpus == 1:
        return Term("ddp buckets", "only ddp on W > 1", 0.0)
    t, g = trainable(shape, plan)
    return Term("ddp buckets", f"T x {g} B", t * g)


def autocast_copies_term(shape: ModelShape, plan: PlanConfig) -> Term:
    """fp32 weights under bf16 autocast: autocast caches a bf16 copy of every weight it casts for the step,
    P x 2 B (the gathered layer only under zero3/fsdp, counted there)."""
    if not plan.mixed_precision or _param_bytes(plan) == 2 or plan.strategy in SHARDED_WEIGHTS:
        return Term("autocast copies", "only fp32 weights + mixed precision, unsharded", 0.0)
    return Term("autocast copies", "P x 2 B", shape.params * 2)


def attention_fused(shape: ModelShape, plan: PlanConfig) -> bool:
    """Whether attention runs in a fused SDPA kernel (flash / memory-efficient) that keeps no a x s x s scores:
    plan.flash_attention, except fp32 with grouped-query attention, where PyTorch's fused CUDA kernels take no
    GQA and an unpadded batch (transformers then passes enable_gqa) falls back to SDPA's math kernel, which keeps
    the same tensors as eager attention (bench/results/gpu_plan_check.json: Llama-1.1B in fp32 on an H200)."""
    gqa_fp32 = shape.kv_heads < shape.heads and _act_bytes(plan) == 4
    return plan.flash_attention and not gqa_fp32


def layer_activation_terms(
    shape: ModelShape, *, rows: int, seq: int, act_bytes: int, fused: bool, mask_bytes: int = 1, padded: bool = True
) -> dict[str, float]:
    """Bytes one transformer layer saves for backward, by term: Korthikanti et al. 2022 ('Reducing Activation
    Recomputation in Large Transformer Models'), refitted to what transformers' Llama/Mistral (decoder: gated_mlp)
    and BERT layers save, counted exactly by bench/activation_bytes.py. A = act_bytes, M = mask_bytes, 4 = fp32:

      norms      decoder: 2 (s b h (4 + A) + 4 s b)   RMSNorm's fp32 copy of its input, the normalised value, rsqrt
                 BERT:    2 (s b h A + 8 s b)          LayerNorm's input, mean and rstd (fp32)
      attention  2 s b h A                             q-projection input, o-projection input
                 eager:  + 3 s b h A                   q, and k, v repeated to all a heads (repeat_kv)
                 fused:  + s b h A + 2 s b kv' A + 4 a s b   q, k, v, log-sum-exp; kv' = h when padded (transformers
                                                       repeats k, v before SDPA under a mask), else kv_dim;
                                                       + b s^2 A padded (SDPA's float copy of the mask, per layer)
      scores     eager only: a s^2 b A (softmax output; decoders take it in fp32: a s^2 b (4 + A) with A < 4)
                 + a s^2 b A with dropout (the dropout output)
      MLP        s b h A + 4 s b i A (SwiGLU: gate output, SiLU output, up output, product) or s b h A + 2 s b i A
                 (GELU input and output)
      masks      with dropout: 2 s b h M (+ a s^2 b M with eager scores)

    mask_bytes: 1 on CUDA (bool masks of the fused dropout kernel); on CPU dropout saves its mask in the activation
    dtype (4 in fp32). padded: the batch has padding (a mask); the planner assumes it (the larger of the two).
    """
    s, b, h, a, i, A = seq, rows, shape.hidden, shape.heads, shape.intermediate, act_bytes
    sb, decoder = seq * rows, shape.gated_mlp
    terms = {"norms": 2 * (sb * h * (4 + A) + 4 * sb) if decoder else 2 * (sb * h * A + 8 * sb)}
    if fused:
        kv = h if padded else shape.kv_dim
        terms["attention"] = 3 * sb * h * A + 2 * sb * kv * A + 4 * a * sb + (b * s * s * A if padded else 0)
        terms["scores"] = 0.0
    else:
        terms["attention"] = 5 * sb * h * A
        softmax = 4 + A if decoder and A < 4 else A
        terms["scores"] = a * s * sb * (softmax + (A if shape.dropout else 0))
    terms["mlp"] = sb * h * A + (4 if decoder else 2) * sb * i * A
    masks = 2 * sb * h + (0 if fused else a * s * sb)
    terms["dropout masks"] = masks * mask_bytes if shape.dropout else 0.0
    return terms


def layer_activation_bytes(shape: ModelShape, **kw) -> float:
    """The sum of layer_activation_terms(shape, **kw): one layer's saved activations."""
    return sum(layer_activation_terms(shape, **kw).values())


def forward_activation_terms(
    shape: ModelShape,
    *,
    rows: int,
    seq: int,
    act_bytes: int,
    fused: bool,
    checkpointing: bool,
    mask_bytes: int = 1,
    padded: bool = True,
) -> dict[str, float]:
    """What one forward saves outside the layers, by term:

    embeddings  decoder: the rotary cos/sin, 2 s (h/a) A (shared by the batch and the layers);
                BERT: the embeddings' LayerNorm (s b h A + 8 s b), dropout mask (s b h M), token type ids (8 s)
    mask        decoder under checkpointing (a checkpoint argument): eager's additive causal mask b s^2 A, or,
                fused and padded, the boolean padding mask b s^2 (none unpadded: SDPA's is_causal)
    final norm + pooling   decoder: the final RMSNorm, s b h (4 + A) + 4 s b; BERT: 2 b h A (mean pooling)
    """
    s, b, h, A = seq, rows, shape.hidden, act_bytes
    sbh = s * b * h
    if shape.gated_mlp:
        mask = 0 if not checkpointing or (fused and not padded) else b * s * s * (1 if fused else A)
        final = sbh * (4 + A) + 4 * s * b
        return {"embeddings": 2 * s * h / shape.heads * A, "mask": mask, "final norm + pooling": final}
    masks = sbh * mask_bytes if shape.dropout else 0
    return {"embeddings": sbh * A + 8 * s * b + masks + 8 * s, "mask": 0.0, "final norm + pooling": 2 * b * h * A}


def activation_terms(
    shape: ModelShape,
    *,
    rows: int,
    seq: int,
    act_bytes: int,
    checkpointing: bool,
    fused: bool,
    mask_bytes: int = 1,
    padded: bool = True,
) -> dict[str, float]:
    """Activations of one forward of `rows` texts of `seq` tokens kept for backward, by term:
    no checkpointing: L x each layer term + the forward's own terms (forward_activation_terms);
    checkpointing: L x s b h A (each layer's input, kept by the checkpoint) + one layer recomputed in backward
    (less its input where the layer saves it as is: BERT, and decoders in fp32) + the forward's own terms."""
    kw = dict(rows=rows, seq=seq, act_bytes=act_bytes, fused=fused, mask_bytes=mask_bytes, padded=padded)
    layer = layer_activation_terms(shape, **kw)
    if checkpointing:
        sbh_a = seq * rows * shape.hidden * act_bytes
        own_input = sbh_a if not shape.gated_mlp or act_bytes == 4 else 0
        terms = {"layer inputs": shape.layers * sbh_a, "recomputed layer": sum(layer.values()) - own_input}
    else:
        terms = {f"layers: {k}": shape.layers * v for k, v in layer.items()}
    return terms | forward_activation_terms(shape, **kw, checkpointing=checkpointing)


def activation_bytes(shape: ModelShape, **kw) -> float:
    """The sum of activation_terms(shape, **kw)."""
    return sum(activation_terms(shape, **kw).values())


def rank_texts(plan: PlanConfig) -> int:
    """Documents per rank, b (1 + k): the larger side GradCache chunks."""
    return plan.global_batch_size // plan.gpus * (1 + plan.num_hard_negatives)


def _activation_kwargs(shape: ModelShape, plan: PlanConfig, *, mask_bytes: int = 1) -> dict[str, Any]:
    fused, ckpt = attention_fused(shape, plan), plan.gradient_checkpointing
    return dict(act_bytes=_act_bytes(plan), checkpointing=ckpt, fused=fused, mask_bytes=mask_bytes)


def step_terms(
    shape: ModelShape, plan: PlanConfig, *, chunk: int, row_chunk_size: int, mask_bytes: int = 1
) -> list[Term]:
    """What one step adds on top of the states: activations of one chunk (chunk 0: GradCache off, the whole
    rank batch at once), the embedding cache, the gathered embeddings, the loss block. mask_bytes: bytes per
    saved dropout-mask element (1 on CUDA; bench/plan_vs_measured.py passes 4 for CPU)."""
    W, k, d = plan.gpus, plan.num_hard_negatives, shape.hidden
    b = plan.global_batch_size // W
    N, C = plan.global_batch_size, plan.global_batch_size * (1 + k)
    act = _activation_kwargs(shape, plan, mask_bytes=mask_bytes)
    seq = max(plan.query_max_length, plan.document_max_length)
    ckpt = ", checkpointed" if plan.gradient_checkpointing else ""
    if chunk:
        rows = min(chunk, rank_texts(plan))
        terms = [
            Term("activations", f"{rows} texts x {seq} tok{ckpt}", activation_bytes(shape, rows=rows, seq=seq, **act))
        ]
    else:
        a_q = activation_bytes(shape, rows=b, seq=plan.query_max_length, **act)
        a_d = activation_bytes(shape, rows=rank_texts(plan), seq=plan.document_max_length, **act)
        terms = [Term("activations", f"whole rank batch, no GradCache{ckpt}", a_q + a_d)]
    terms.append(Term("embedding cache", f"b(2+k) x d x 4 B x 2 (+grads), b={b}", b * (2 + k) * d * 4 * 2))
    gathered = N * (2 + k) * d * 4 * 2 if W > 1 else 0.0
    terms.append(Term("gathered embeddings", "N(2+k) x d x 4 B x 2 (+grads); 0 on W=1", gathered))
    r = min(row_chunk_size, b) if row_chunk_size else b
    candidates = C * d * 4 * 2 if k else 0.0  # torch.cat of positives and negatives, and its gradient
    terms.append(
        Term(
            "loss", f"r x C x {SCORE_BYTES} B (r={r}, C={C}) + C x d x 8 B with k > 0", r * C * SCORE_BYTES + candidates
        )
    )
    return terms


def estimate(
    shape: ModelShape, plan: PlanConfig, *, chunk: int, row_chunk_size: int, mask_bytes: int = 1
) -> list[Term]:
    """Every term of the per-GPU peak for GradCache chunk `chunk` (0: GradCache off)."""
    states = [
        weights_term(shape, plan),
        gathered_layers_term(shape, plan),
        gradients_term(shape, plan),
        optimizer_term(shape, plan),
        ddp_buckets_term(shape, plan),
        autocast_copies_term(shape, plan),
    ]
    context = Term("cuda context", "fixed (plan.cuda_context_gib)", plan.cuda_context_gib * GIB)
    steps = step_terms(shape, plan, chunk=chunk, row_chunk_size=row_chunk_size, mask_bytes=mask_bytes)
    return states + steps + [context]


def budget_bytes(plan: PlanConfig) -> float:
    """gpu_memory x (1 - headroom)."""
    return plan.gpu_memory_gib * GIB * (1 - plan.headroom)


def fits(shape: ModelShape, plan: PlanConfig, *, chunk: int, row_chunk_size: int) -> bool:
    return sum(t.bytes for t in estimate(shape, plan, chunk=chunk, row_chunk_size=row_chunk_size)) <= budget_bytes(plan)


def pick_chunk(shape: ModelShape, plan: PlanConfig, *, row_chunk_size: int) -> tuple[int | None, int | None]:
    """(chunk, max_chunk): the largest power of two and the largest integer number of texts per GradCache chunk
    that fit (activations grow with the chunk, so a bisection finds it); (0, rank texts) when the whole rank
    batch fits without GradCache; (None, None) when not even a chunk of 1 fits."""
    if fits(shape, plan, chunk=0, row_chunk_size=row_chunk_size):
        return 0, rank_texts(plan)
    low, high = 0, rank_texts(plan) - 1  # a chunk holding the whole batch is GradCache off
    while low < high:
        mid = (low + high + 1) // 2
        if fits(shape, plan, chunk=mid, row_chunk_size=row_chunk_size):
            low = mid
        else:
            high = mid - 1
    if low == 0:
        return None, None
    return 2 ** int(math.log2(low)), low


ADVICE = (
    ("plan.strategy=zero3", dict(strategy="zero3")),
    ("plan.offload_optimizer=true", dict(offload_optimizer=True)),
    ("plan.lora_r=16", dict(lora_r=16)),
    ("plan.gradient_checkpointing=true", dict(gradient_checkpointing=True)),
    ("plan.flash_attention=true", dict(flash_attention=True)),
    ("plan.mixed_precision=true", dict(mixed_precision=True)),
)


def advice(shape: ModelShape, plan: PlanConfig, *, row_chunk_size: int) -> str:
    """What makes a chunk of 1 fit when nothing does: each single change tried in turn, then more GPUs."""
    helps = []
    for label, change in ADVICE:
        if any(getattr(plan, key) == value for key, value in change.items()):
            continue
        if "offload_optimizer" in change and plan.strategy == "ddp":
            change, label = dict(change, strategy="zero1"), label + " with plan.strategy=zero1"
        if fits(shape, dataclasses.replace(plan, **change), chunk=1, row_chunk_size=row_chunk_size):
            helps.append(label)
    for factor in (2, 4, 8):
        more = dataclasses.replace(plan, gpus=plan.gpus * factor, global_batch_size=plan.global_batch_size * factor)
        if plan.strategy != "ddp" and fits(shape, more, chunk=1, row_chunk_size=row_chunk_size):
            helps.append(f"plan.gpus={more.gpus} (same per-rank batch)")
            break
    if not helps:
        return "not even a chunk of 1 fits, and no single change fixes it: combine zero3, LoRA, offload, checkpointing"
    return "not even a chunk of 1 fits; each of these alone would: " + "; ".join(helps)


def plan_memory(shape: ModelShape, plan: PlanConfig, *, row_chunk_size: int) -> dict[str, Any]:
    """The planner's report: the chosen chunk (plan.chunk, or the largest that fits), its terms in GiB, the
    total against the budget, and a message saying what to change when nothing fits."""
    chunk, max_chunk = (plan.chunk, None) if plan.chunk else pick_chunk(shape, plan, row_chunk_size=row_chunk_size)
    if plan.chunk and plan.chunk >= rank_texts(plan):
        chunk = 0  # a chunk as large as the rank's batch is no GradCache
    terms = estimate(shape, plan, chunk=chunk or 0, row_chunk_size=row_chunk_size)
    total = sum(t.bytes for t in terms)
    ok = total <= budget_bytes(plan)
    if chunk is None:
        message = advice(shape, plan, row_chunk_size=row_chunk_size)
    elif chunk == 0:
        message = "the whole rank batch fits without GradCache: leave gradcache.chunk_size=0" if ok else ""
    else:
        message = f"set gradcache.chunk_size={chunk}"
    if plan.chunk and not ok:
        message = f"plan.chunk={plan.chunk} does not fit: use plan.chunk=0 to pick one"
    rows = min(chunk, rank_texts(plan)) if chunk else rank_texts(plan)
    seq = max(plan.query_max_length, plan.document_max_length)
    act = activation_terms(shape, rows=rows, seq=seq, **_activation_kwargs(shape, plan))
    return {
        "shape": dataclasses.asdict(shape),
        "trainable_params": trainable(shape, plan)[0],
        "inputs": {**dataclasses.asdict(plan), "row_chunk_size": row_chunk_size},
        "chunk": chunk,
        "max_chunk": max_chunk,
        "fits": ok,
        "terms": [{"name": t.name, "basis": t.basis, "gib": t.bytes / GIB} for t in terms],
        "attention_fused": attention_fused(shape, plan),
        "activation_terms_gib": {f"{k} ({rows} texts x {seq} tok)": v / GIB for k, v in act.items()},
        "total_gib": total / GIB,
        "budget_gib": budget_bytes(plan) / GIB,
        "message": message,
    }
