"""The memory planner (`embedscale plan`) against measured CUDA peaks of one GradCache training step.

    python bench/gpu_plan_check.py                    # on a GPU machine; ~2 min on one H100/H200
    python bench/gpu_plan_check.py --dry-run          # CPU, two tiny shapes: proves the script end to end (~10 s)

The GPU twin of bench/plan_vs_measured.py (which measures RSS on CPU). One process, one GPU, fp32, no hard
negatives, random token ids of exactly `seq` tokens, a randomly initialised backbone of a real shape (no
download: BERT-base, and a 1.1B Llama-shaped decoder). Per row: build the module, AdamW with every gradient and
both moments allocated (as in any step after the first), the batch on the GPU -> `base` =
torch.cuda.memory_allocated() -> reset the peak -> gradcache_step + AdamW step -> `peak` =
torch.cuda.max_memory_allocated(). Compared:
- step:  peak - base vs the planner's activations + embedding cache + gathered embeddings + loss;
- total: peak vs the planner's total without the CUDA context (allocated memory does not include it).
A ratio is measured / planned. Writes bench/results/gpu_plan_check.json ($EMBEDSCALE_BENCH_RESULTS, or $OUT when
set, replaces bench/results/).

`--dry-run` runs the same steps on the CPU with tiny shapes (DRY_ROWS) and measures RSS instead (`base` = VmRSS,
`peak` = VmHWM after resetting it): not comparable with the plan (it includes Python and torch), only a proof
that the script runs; it writes gpu_plan_check_dryrun.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS  # noqa: E402

MIB = 2**20
SHAPES = {  # randomly initialised; shapes of real checkpoints
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
    "llama-1.1b": (
        "llama",
        dict(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
        ),
    ),
}
TINY = {  # --dry-run: the same two kinds, tiny
    "tiny-bert": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
    "tiny-llama": (
        "llama",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    ),
}
SHAPES.update(TINY)
DRY_ROWS = [("tiny-bert", 32, 4, 8, False), ("tiny-llama", 32, 4, 8, True)]
ROWS = [  # shape, seq, chunk, rank batch, gradient checkpointing
    ("bert-base", 256, 32, 256, False),
    ("bert-base", 256, 128, 256, False),
    ("bert-base", 256, 512, 1024, False),
    ("bert-base", 256, 128, 256, True),
    ("bert-base", 256, 512, 1024, True),
    ("llama-1.1b", 256, 16, 64, False),
    ("llama-1.1b", 256, 64, 256, False),
    ("llama-1.1b", 256, 64, 256, True),
]


def backbone_dir(name: str, tmp: Path) -> Path:
    """config.json of the shape (what the planner reads) in tmp/name."""
    from transformers import BertConfig, LlamaConfig

    kind, shape = SHAPES[name]
    cfg = BertConfig(**shape) if kind == "bert" else LlamaConfig(vocab_size=32000, **shape)
    out = tmp / name
    cfg.save_pretrained(out)
    return out


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _memory(dev, *, peak: bool = False) -> int:
    """Bytes allocated (or the peak) on the GPU; on the CPU (--dry-run) the process's RSS (or VmHWM)."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    return 1024 * _rss_kib("VmHWM:" if peak else "VmRSS:")


def _reset_peak(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # VmHWM := VmRSS; where /proc refuses it, the peak stays the process's own (a dry run only)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(name: str, path: Path, seq: int, chunk: int, batch: int, checkpointing: bool, device: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModel

    from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig, Pooling
    from embedscale.contrastive.gradcache import gradcache_step
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.batch import PairBatch, TextIds
    from embedscale.encoder.backbone import adapt_backbone
    from embedscale.encoder.biencoder import BiEncoder

    torch.manual_seed(0)
    dev = torch.device(device)
    decoder = SHAPES[name][0] == "llama"
    cfg = ModelConfig(
        name_or_path=str(path),
        pooling=Pooling.last_token if decoder else Pooling.mean,
        query_max_length=seq,
        document_max_length=seq,
        gradient_checkpointing=checkpointing,
    )
    hf_cfg = AutoConfig.from_pretrained(path)
    kwargs = {} if decoder else {"add_pooling_layer": False}
    backbone = AutoModel.from_config(hf_cfg, attn_implementation="sdpa", **kwargs)
    backbone = adapt_backbone(backbone, cfg)
    module = ContrastiveModule(BiEncoder(backbone, None, cfg), loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    module.to(dev).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()

    def tokens(n: int) -> dict:
        ids = torch.randint(5, hf_cfg.vocab_size, (n, seq), device=dev)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    ids = TextIds(torch.arange(batch, device=dev), torch.arange(batch, device=dev) + 10**6, None)
    rows = PairBatch(tokens(batch), tokens(batch), ids, 0, [str(i) for i in range(batch)])
    base = _memory(dev)
    _reset_peak(dev)
    start = time.perf_counter()
    gradcache_step(module, rows, plan=GradCacheConfig(chunk_size=chunk, sort_by_length=True))
    opt.step()
    peak = _memory(dev, peak=True)
    seconds = time.perf_counter() - start
    del module, opt, rows, params, backbone
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"base_MiB": base / MIB, "peak_MiB": peak / MIB, "step_MiB": (peak - base) / MIB, "seconds": seconds}


def planned(path: Path, seq: int, chunk: int, batch: int, checkpointing: bool) -> dict:
    from embedscale.config import ModelConfig, PlanConfig
    from embedscale.strategy.memory import estimate, resolve_shape

    plan = PlanConfig(
        strategy="ddp",
        gpus=1,
        gpu_memory_gib=1000.0,
        global_batch_size=batch,
        query_max_length=seq,
        document_max_length=seq,
        lora_r=0,
        torch_dtype="float32",
        gradient_checkpointing=checkpointing,
        flash_attention=True,
        chunk=chunk,
        headroom=0.0,
        cuda_context_gib=0.0,
    )
    shape = resolve_shape(ModelConfig(name_or_path=str(path)), plan)
    terms = {t.name: t.bytes for t in estimate(shape, plan, chunk=chunk, row_chunk_size=1024, mask_bytes=1)}
    step = sum(terms[k] for k in ("activations", "embedding cache", "gathered embeddings", "loss"))
    return {"step_MiB": step / MIB, "total_MiB": sum(terms.values()) / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, RSS: the script end to end")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops: more threads only contend
        gpu = f"CPU ({os.cpu_count()} cores), dry run"
    elif gpu is None:
        raise SystemExit("bench/gpu_plan_check.py needs a CUDA GPU (bench/plan_vs_measured.py is the CPU check)")
    command = "python bench/gpu_plan_check.py" + (" --dry-run" if args.dry_run else "")
    print(f"command: {command}")
    print(f"machine: {gpu}, torch {torch.__version__}, python {platform.python_version()}")
    out_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, seq, chunk, batch, ckpt in DRY_ROWS if args.dry_run else ROWS:
            path = backbone_dir(name, Path(tmp))
            m = measure(name, path, seq, chunk, batch, ckpt, "cpu" if args.dry_run else "cuda")
            p = planned(path, seq, chunk, batch, ckpt)
            row = {
                "model": name,
                "seq": seq,
                "chunk": chunk,
                "rank_batch": batch,
                "checkpointing": ckpt,
                "plan_step_MiB": round(p["step_MiB"], 1),
                "meas_step_MiB": round(m["step_MiB"], 1),
                "step_ratio": round(m["step_MiB"] / p["step_MiB"], 3),
                "plan_total_MiB": round(p["total_MiB"], 1),
                "meas_peak_MiB": round(m["peak_MiB"], 1),
                "total_ratio": round(m["peak_MiB"] / p["total_MiB"], 3),
                "seconds": round(m["seconds"], 2),
            }
            out_rows.append(row)
            print(json.dumps(row), flush=True)
    cols = list(out_rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in out_rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    record = {"command": command, "machine": gpu, "torch": torch.__version__, "rows": out_rows}
    name = "gpu_plan_check_dryrun.json" if args.dry_run else "gpu_plan_check.json"
    target = Path(os.environ.get("OUT", RESULTS)) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
