"""The bytes autograd saves for backward in one forward of an embedding model, counted exactly on CPU, against
the planner's activation formula (embedscale/strategy/memory.py: activation_terms); and the H200 rows of
bench/results/gpu_plan_check.json re-planned with that formula.

    python bench/activation_bytes.py                 # ~1 min on 1 CPU thread: 132 cases + the H200 re-plan
    python bench/activation_bytes.py --quick         # 3 cases (the smoke test)

How it counts: `torch.autograd.graph.saved_tensors_hooks` sees every tensor an op saves for backward during the
forward (backbone + pooling + normalisation, as BiEncoder.encode runs it). Each is counted once per storage
(untyped_storage().nbytes(), deduplicated by data_ptr: a tensor saved twice, or two views of one storage, count
once); storages of parameters, buffers and the input ids/mask are not activations and are skipped. Under gradient
checkpointing the checkpoint keeps each layer's arguments (not seen by the hook: its own hook holds nothing), so
they are counted from the checkpoint call's arguments, and the layer recomputed in backward is measured by calling
the first layer's forward once more under the hook with the same arguments (what the recomputation does).

Models: tiny randomly initialised Llama, Mistral (grouped-query attention, SwiGLU, RMSNorm, rotary) and BERT
(dropout 0.1 on, as trained) shapes, in train mode; texts of exactly `seq` tokens (unpadded) except the `padded`
rows, whose first text is left-padded by a quarter. fp32 everywhere, and a bf16 subset (weights cast to bf16: the
planner's 16-bit activations). CPU caveats, recorded per row and in docs/plan.md: CPU SDPA runs the flash kernel
for the decoders (saves q, k, v, output and log-sum-exp, as CUDA's fused kernels do) but the math kernel for BERT
with dropout (same tensors as eager); CPU dropout saves its mask in the activation dtype (the planner's
mask_bytes = A here; CUDA saves bool masks, 1 byte); CPU LayerNorm keeps mean/rstd in bf16 under bf16 (fp32 on
CUDA, as planned: under 0.5%). Writes bench/results/activation_bytes.json ($EMBEDSCALE_BENCH_RESULTS replaces
bench/results/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import COMMITTED, report  # noqa: E402

KINDS = {  # hidden, layers, heads, kv heads, intermediate (~2.7 h for the decoders, 4 h for BERT)
    "llama": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176
    ),
    "mistral": dict(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, intermediate_size=344
    ),
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
}
VOCAB = 1000
ATTENTION = {"llama": ("eager", "sdpa"), "mistral": ("eager", "sdpa"), "bert": ("eager",)}
"""Attention kernels of the bf16 rows. Not BERT's sdpa: with dropout, CPU SDPA takes its math kernel, which in bf16
upcasts q, k, v and the scores to fp32 (measured 2950.5 KiB at seq 64, batch 4: 1.48x eager's) -- a CPU artefact:
on a GPU, bf16 SDPA with dropout runs the flash kernel."""
SEQS, BATCHES = (16, 64, 128), (1, 4, 8)
QUICK = [  # kind, seq, batch, checkpointing, attention, dtype, padded
    ("llama", 16, 2, False, "eager", "float32", False),
    ("mistral", 16, 2, True, "sdpa", "bfloat16", True),
    ("bert", 16, 2, True, "eager", "float32", False),
]


def cases(quick: bool) -> list[tuple]:
    """fp32: every kind x seq x batch x checkpointing x attention; bf16 and padded batches on a subset."""
    if quick:
        return QUICK
    full = [(*c, "float32", False) for c in itertools.product(KINDS, SEQS, BATCHES, (False, True), ("eager", "sdpa"))]
    bf16 = [(k, 64, 4, ck, at, "bfloat16", False) for k in KINDS for ck in (False, True) for at in ATTENTION[k]]
    padded = [
        (k, 64, 4, ck, at, dt, True)
        for k in ("llama", "mistral")
        for ck in (False, True)
        for at in ("eager", "sdpa")
        for dt in ("float32", "bfloat16")
    ]
    return full + bf16 + padded


def build(kind: str, *, attention: str, checkpointing: bool, dtype: str, tmp: Path):
    """(BiEncoder in train mode, the backbone's config.json dir): embedscale's own adapt_backbone and pooling."""
    import torch
    from transformers import AutoModel, BertConfig, LlamaConfig, MistralConfig

    from embedscale.config import ModelConfig, Pooling
    from embedscale.encoder.backbone import adapt_backbone
    from embedscale.encoder.biencoder import BiEncoder

    torch.manual_seed(0)
    hf_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "bert": BertConfig}[kind]
    hf = hf_cls(vocab_size=VOCAB, **KINDS[kind])
    extra = {"add_pooling_layer": False} if kind == "bert" else {}
    backbone = AutoModel.from_config(hf, attn_implementation=attention, **extra)
    cfg = ModelConfig(
        name_or_path=str(tmp / kind),
        pooling=Pooling.mean if kind == "bert" else Pooling.last_token,
        gradient_checkpointing=checkpointing,
    )
    encoder = BiEncoder(adapt_backbone(backbone, cfg), None, cfg).to(getattr(torch, dtype)).train()
    hf.save_pretrained(tmp / kind)
    return encoder, tmp / kind


def saved_bytes(encoder, *, seq: int, batch: int, padded: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one encode of `batch` random texts of
    `seq` tokens (parameters, buffers and the inputs excluded); under gradient checkpointing + the checkpointed
    layers' arguments + one recomputed layer (see the module docstring)."""
    import torch

    ids_BL = torch.randint(5, VOCAB, (batch, seq))
    m_BL = torch.ones_like(ids_BL)
    if padded:
        m_BL[0, : seq // 4] = 0  # left padding of the first text
    skip = {t.untyped_storage().data_ptr() for t in (*encoder.parameters(), *encoder.buffers(), ids_BL, m_BL)}
    kept: dict[int, torch.Tensor] = {}  # data_ptr -> one tensor of the storage (kept alive: no address reuse)

    def record(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in skip:
            kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    calls = []
    for layer in _checkpointed_layers(encoder):
        inner = layer._gradient_checkpointing_func  # noqa: SLF001 - transformers' hook point for checkpointing

        def spy(fn, *args, _inner=inner, **kw):
            calls.append((fn, args))
            return _inner(fn, *args, **kw)

        layer._gradient_checkpointing_func = spy  # noqa: SLF001
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        e_BD = encoder.encode({"input_ids": ids_BL, "attention_mask": m_BL}, side="query")
        for fn, args in calls:  # what each checkpoint keeps: its arguments (partial keywords too)
            for t in (*args, *fn.keywords.values()):
                record(t)
                if isinstance(t, tuple):  # position_embeddings = (cos, sin)
                    [record(x) for x in t]
        if calls:  # the layer recomputed in backward: the first one's forward again, same arguments
            fn, args = calls[0]
            fn(*args)
    del e_BD
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def _checkpointed_layers(encoder) -> list:
    return [m for m in encoder.modules() if getattr(m, "gradient_checkpointing", False) is True]


def predicted_terms(
    path: Path, *, seq: int, batch: int, checkpointing: bool, fused: bool, act_bytes: int, padded: bool
) -> dict[str, float]:
    """The planner's activation_terms for the model at `path` (its config.json, as `embedscale plan` reads it), with
    the CPU's dropout masks in the activation dtype."""
    from embedscale.config import ModelConfig, PlanConfig
    from embedscale.strategy.memory import activation_terms, resolve_shape

    shape = resolve_shape(ModelConfig(name_or_path=str(path)), PlanConfig(lora_r=0))
    kw = dict(rows=batch, seq=seq, act_bytes=act_bytes, checkpointing=checkpointing, fused=fused)
    return activation_terms(shape, **kw, mask_bytes=act_bytes, padded=padded)


def measure_case(case: tuple, tmp: Path) -> dict:
    kind, seq, batch, ckpt, attention, dtype, padded = case
    encoder, path = build(kind, attention=attention, checkpointing=ckpt, dtype=dtype, tmp=tmp)
    measured = saved_bytes(encoder, seq=seq, batch=batch, padded=padded)
    # CPU SDPA: flash kernel for the decoders (fused), math kernel for BERT with dropout (saves what eager saves)
    fused = attention == "sdpa" and kind != "bert"
    act = 4 if dtype == "float32" else 2
    terms = predicted_terms(path, seq=seq, batch=batch, checkpointing=ckpt, fused=fused, act_bytes=act, padded=padded)
    predicted = sum(terms.values())
    return {
        "model": kind,
        "seq": seq,
        "batch": batch,
        "ckpt": ckpt,
        "attention": f"{attention} ({'fused' if fused else 'scores kept'})",
        "dtype": dtype,
        "padded": padded,
        "predicted_KiB": round(predicted / 1024, 1),
        "measured_KiB": round(measured / 1024, 1),
        "ratio": round(predicted / measured, 4),
    }


def replan_h200() -> list[dict]:
    """bench/results/gpu_plan_check.json's rows planned again (bench/gpu_plan_check.py's own `planned`): the old
    ratio (measured / planned then) and the new one."""
    import gpu_plan_check

    committed = json.loads((COMMITTED / "gpu_plan_check.json").read_text())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in committed["rows"]:
            path = gpu_plan_check.backbone_dir(r["model"], Path(tmp))
            new = gpu_plan_check.planned(path, r["seq"], r["chunk"], r["rank_batch"], r["checkpointing"])
            out.append(
                {
                    "model": r["model"],
                    "chunk": r["chunk"],
                    "rank_batch": r["rank_batch"],
                    "checkpointing": r["checkpointing"],
                    "meas_step_MiB": r["meas_step_MiB"],
                    "old_plan_step_MiB": r["plan_step_MiB"],
                    "old_step_ratio": r["step_ratio"],
                    "new_plan_step_MiB": round(new["step_MiB"], 1),
                    "new_step_ratio": round(r["meas_step_MiB"] / new["step_MiB"], 3),
                    "meas_peak_MiB": r["meas_peak_MiB"],
                    "old_total_ratio": r["total_ratio"],
                    "new_plan_total_MiB": round(new["total_MiB"], 1),
                    "new_total_ratio": round(r["meas_peak_MiB"] / new["total_MiB"], 3),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 cases (smoke test)")
    parser.add_argument("--name", default="activation_bytes", help="results file name (bench/results/<name>.json)")
    args = parser.parse_args()
    import torch
    import transformers

    torch.set_num_threads(1)  # tiny ops: more threads only contend
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure_case(c, Path(tmp)) for c in cases(args.quick)]
    replan = replan_h200()
    ratios = [r["ratio"] for r in rows]
    summary = {"cases": len(rows), "min_ratio": min(ratios), "max_ratio": max(ratios)}
    print(json.dumps(summary))
    report(args.name, rows, {"summary": summary, "transformers": transformers.__version__, "h200_replan": replan})
    cols = list(replan[0])
    print("H200 re-plan (bench/results/gpu_plan_check.json):\n" + " | ".join(cols))
    for r in replan:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
