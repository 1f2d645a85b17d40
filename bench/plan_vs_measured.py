"""The memory planner (`embedscale plan`) against measured peaks of one GradCache training step on CPU.

    python bench/plan_vs_measured.py                 # every row, ~4 min on 2 cores
    python bench/plan_vs_measured.py --only tiny     # rows whose model name contains "tiny"
    python bench/plan_vs_measured.py --only tiny --limit 1   # the first of them: a smoke run (two processes)

One process, strategy ddp on 1 rank, fp32, no hard negatives, texts of exactly `seq` tokens. Each row runs
in a fresh subprocess: import -> RSS `import` -> load the model, create AdamW, allocate every gradient and
both Adam moments (one update on zero gradients), tokenise the batch -> RSS `base` -> reset the peak (writing
5 to /proc/self/clear_refs; ru_maxrss when that is refused) -> one step: gradcache_step (pass 1, loss, pass 2)
+ AdamW update -> peak RSS. The rank batch is `chunk + 1` queries (and as many documents), so the
largest chunk holds `chunk` texts (the planner's chunk) and the step stays short; the `loss` row instead
takes a large batch with small chunks so that the score block dominates.

Compared:
- step:  measured peak - base   vs the planner's activations + embedding cache + gathered + loss terms;
- total: measured peak - import vs the planner's total (weights + gradients + Adam + step; no CUDA context).
A ratio is measured / planned. Why they differ is discussed in docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

WORDS = "alpha beta gamma delta protein cell gene model data signal drug trial dose risk patient".split()
MMAP_THRESHOLD = 65536
"""Bytes: with MALLOC_MMAP_THRESHOLD_ fixed, glibc mmaps every larger block and unmaps it on free, so RSS
follows live memory; by default the threshold adapts upwards and freed blocks stay in the heap."""
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
ROWS = [  # model, seq, chunk, checkpointing, queries per rank (None: chunk + 1), loss.row_chunk_size
    ("tiny", 128, 8, False, None, 1024),
    ("tiny", 128, 32, False, None, 1024),
    ("tiny", 128, 128, False, None, 1024),
    ("tiny", 128, 128, True, None, 1024),
    ("tiny-loss", 16, 16, False, 4096, 1024),
    ("minilm", 128, 8, False, None, 1024),
    ("minilm", 128, 32, False, None, 1024),
    ("minilm", 128, 32, True, None, 1024),
    ("minilm", 64, 128, False, None, 1024),
    ("minilm", 64, 128, True, None, 1024),
]


def make_tiny_bert(path: Path) -> Path:
    """A random 4-layer, 128-dim BERT with the MiniLM tokenizer (dropout 0.1, as BERT's default)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embedscale.encoder.biencoder import resolve_model_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    BertModel(BertConfig(vocab_size=tok.vocab_size, **TINY), add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where /proc refuses it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    import gc

    import torch

    from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig
    from embedscale.contrastive.gradcache import gradcache_step
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.batch import PairExample
    from embedscale.data.collate import PairCollator
    from embedscale.encoder.biencoder import load_encoder

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rss_import = _status_kib("VmRSS:")
    seq = spec["seq"]
    cfg = ModelConfig(
        name_or_path=spec["path"],
        query_max_length=seq,
        document_max_length=seq,
        gradient_checkpointing=spec["checkpointing"],
    )
    encoder, tok = load_encoder(cfg)
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(row_chunk_size=spec["row_chunk"]), optim_cfg=OptimConfig())
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    for p in params:  # gradients and both Adam moments exist before the baseline, as in any step after the first
        p.grad = torch.zeros_like(p)
    opt.step()
    collate = PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=0)
    rng = random.Random(0)

    def texts(count: int) -> list[str]:  # distinct, more word pieces than seq: exactly seq tokens each
        return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(seq + 20)) for i in range(count)]

    b = spec["batch"]
    batch = collate([PairExample(q, d) for q, d in zip(texts(b), texts(b), strict=True)])
    assert batch.queries["input_ids"].shape == (b, seq), batch.queries["input_ids"].shape
    gc.collect()
    rss_base = _status_kib("VmRSS:")
    reset = _reset_peak()
    start = time.perf_counter()
    gradcache_step(module, batch, plan=GradCacheConfig(chunk_size=spec["chunk"], sort_by_length=True))
    opt.step()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rss_import_KiB": rss_import,
        "rss_base_KiB": rss_base,
        "peak_KiB": peak,
        "seconds": seconds,
        "reset": reset,
    }


def planned(spec: dict, *, mask_bytes: int = 1) -> dict:
    """The planner's terms for one row, in MiB: step (activations + embeddings + loss) and total."""
    from embedscale.config import ModelConfig, PlanConfig
    from embedscale.strategy.memory import estimate, resolve_shape

    plan = PlanConfig(
        strategy="ddp",
        gpus=1,
        gpu_memory_gib=1000.0,
        global_batch_size=spec["batch"],
        query_max_length=spec["seq"],
        document_max_length=spec["seq"],
        lora_r=0,
        torch_dtype="float32",
        gradient_checkpointing=spec["checkpointing"],
        chunk=spec["chunk"],
        headroom=0.0,
        cuda_context_gib=0.0,
    )
    shape = resolve_shape(ModelConfig(name_or_path=spec["path"]), plan)
    terms = {
        t.name: t.bytes
        for t in estimate(shape, plan, chunk=spec["chunk"], row_chunk_size=spec["row_chunk"], mask_bytes=mask_bytes)
    }
    step = sum(terms[k] for k in ("activations", "embedding cache", "gathered embeddings", "loss"))
    mib = 2**20
    return {"step": step / mib, "activations": terms["activations"] / mib, "total": sum(terms.values()) / mib}


def measure(spec: dict, env: dict | None = None) -> dict:
    """One row in a fresh process (optionally with extra environment variables, e.g. a malloc setting)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"{spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="run only rows whose model name contains this")
    parser.add_argument("--limit", type=int, default=0, help="run at most this many of the selected rows (0: all)")
    parser.add_argument("--name", default="plan_vs_measured")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from embedscale.encoder.biencoder import resolve_model_path

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "tiny": str(make_tiny_bert(Path(tmp) / "tiny-bert")),
            "minilm": resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"),
        }
        selected = [row for row in ROWS if args.only in row[0]]
        for model, seq, chunk, ckpt, batch, row_chunk in selected[: args.limit or None]:
            spec = dict(
                path=paths[model.split("-")[0]],
                seq=seq,
                chunk=chunk,
                checkpointing=ckpt,
                batch=batch or chunk + 1,
                row_chunk=row_chunk,
                threads=args.threads,
            )
            m = measure(spec)
            lean = measure(spec, env={"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
            gpu, cpu = planned(spec), planned(spec, mask_bytes=4)
            step = (m["peak_KiB"] - m["rss_base_KiB"]) / 1024
            step_lean = (lean["peak_KiB"] - lean["rss_base_KiB"]) / 1024
            total = (m["peak_KiB"] - m["rss_import_KiB"]) / 1024
            row = {
                "model": model,
                "seq": seq,
                "chunk": chunk,
                "ckpt": ckpt,
                "queries": spec["batch"],
                "plan_step": round(gpu["step"], 1),
                "plan_step_cpu": round(cpu["step"], 1),
                "meas_step": round(step, 1),
                "meas_step_mmap": round(step_lean, 1),
                "ratio": round(step / gpu["step"], 2),
                "ratio_mmap_cpu": round(step_lean / cpu["step"], 2),
                "plan_total": round(cpu["total"], 1),
                "meas_total": round(total, 1),
                "total_ratio": round(total / cpu["total"], 2),
                "seconds": round(m["seconds"], 1),
            }
            print(row, flush=True)
            rows.append(row)
    report(
        args.name,
        rows,
        {"threads": args.threads, "tiny_bert": TINY, "units": "MiB", "peak": "VmHWM after clear_refs, else ru_maxrss"},
    )


if __name__ == "__main__":
    main()
