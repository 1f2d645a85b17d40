"""DeepSpeed ZeRO-3 + LoRA + GradCache on a ~1B decoder on one GPU: peak memory and samples/s next to `embedscale
plan`'s estimate for the same settings.

    bash bench/gpu_check.sh                 # one H100/H200: checks the dependencies, then this script (~3-5 min)
    python bench/gpu_check.py               # the same without the dependency check
    python bench/gpu_check.py --dry-run     # CPU, a tiny Llama, 32-bit: proves the script end to end (~1 min)

Each row runs in a fresh process (clean CUDA peak, one DeepSpeed engine per process) through embedscale's own code
path: `TrainerConfig(strategy="deepspeed", zero_stage=3)` -> `embedscale.strategy.build_strategy` -> Lightning
`Trainer.fit` on a `ContrastiveModule` with GradCache (so the step is the one of contrastive/module.py under ZeRO-3:
every backward an engine micro-step, the last the boundary). The backbone is a randomly initialised Llama of
TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 key/value heads, vocab 32000): no
download, the GPU machine is offline. LoRA r=16 on q/k/v/o, gradient checkpointing, SDPA attention, DeepSpeed bf16
(bf16 weights, fp32 master copies of the adapters), random token ids of exactly `seq` tokens, no hard negatives.

Measured per row: `torch.cuda.max_memory_allocated()` over the whole fit (first step included: it allocates the
optimizer states) and over the timed steps only, and samples/s (queries per second over the timed steps, after
`--warmup` untimed steps). Planned: `embedscale plan`'s terms for zero3, 1 GPU, the same chunk, LoRA, dtype,
checkpointing and fused attention, without the CUDA context (allocated memory does not include it). A ratio is
measured / planned. The dry run measures peak RSS instead (not comparable with the plan: it includes Python,
torch and DeepSpeed themselves).

Needs deepspeed (`pip install embedscale[deepspeed]`); without it the script says so, writes the planner's
estimates only and exits 2. Without Hydra (the job wrapper of `embedscale plan` needs it; the planner's functions
do not) the planner is imported with the wrapper disabled.
Writes bench/results/gpu_check.json (gpu_check_dryrun.json for --dry-run; $EMBEDSCALE_BENCH_RESULTS replaces
bench/results/) and, when $OUT is set, $OUT/<same name>.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS  # noqa: E402

MIB = 2**20
TINYLLAMA = dict(
    hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4
)
TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
GPU_ROWS = [  # seq, chunk, rank batch (queries; as many documents)
    dict(seq=256, chunk=16, batch=128),
    dict(seq=256, chunk=64, batch=128),
]
DRY_ROWS = [dict(seq=32, chunk=4, batch=16)]
LORA_R = 16


def _planner():
    """The planner's estimate/resolve_shape (embedscale/strategy/memory.py: needs neither Hydra nor a GPU)."""
    from embedscale.strategy.memory import estimate, resolve_shape

    return estimate, resolve_shape


def backbone_dir(tmp: Path, dry_run: bool) -> Path:
    """config.json of the Llama shape (what the planner reads, and what the row process builds)."""
    from transformers import LlamaConfig

    shape = TINY if dry_run else TINYLLAMA
    out = tmp / ("tiny-llama" if dry_run else "llama-1.1b")
    LlamaConfig(vocab_size=1000 if dry_run else 32000, **shape).save_pretrained(out)
    return out


def planned(path: Path, row: dict, dry_run: bool) -> dict:
    from embedscale.config import ModelConfig, PlanConfig, Pooling

    estimate, resolve_shape = _planner()
    plan = PlanConfig(
        strategy="zero3",
        gpus=1,
        gpu_memory_gib=1000.0,
        global_batch_size=row["batch"],
        query_max_length=row["seq"],
        document_max_length=row["seq"],
        lora_r=LORA_R,
        torch_dtype="float32" if dry_run else "bfloat16",
        mixed_precision=not dry_run,
        gradient_checkpointing=True,
        flash_attention=True,
        chunk=row["chunk"],
        headroom=0.0,
        cuda_context_gib=0.0,
    )
    shape = resolve_shape(ModelConfig(name_or_path=str(path), pooling=Pooling.last_token), plan)
    terms = {t.name: t.bytes for t in estimate(shape, plan, chunk=row["chunk"], row_chunk_size=1024, mask_bytes=1)}
    return {"plan_total_MiB": sum(terms.values()) / MIB, "plan_terms_MiB": {k: v / MIB for k, v in terms.items()}}


def measure(path: Path, row: dict, *, dry_run: bool, warmup: int, steps: int) -> dict:
    """One row, in this process: ZeRO-3 + LoRA + GradCache through Trainer.fit; peak memory and samples/s."""
    import lightning as L
    import torch
    from transformers import AutoConfig, AutoModel

    from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig, Pooling, TrainerConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.batch import PairBatch, TextIds
    from embedscale.encoder.backbone import adapt_backbone
    from embedscale.encoder.biencoder import BiEncoder
    from embedscale.strategy import build_strategy

    torch.manual_seed(0)
    cuda = not dry_run
    if dry_run:
        torch.set_num_threads(1)  # small ops: more threads only contend (2-core CI machines)
    model_cfg = ModelConfig(
        name_or_path=str(path),
        pooling=Pooling.last_token,
        padding_side="left",
        query_max_length=row["seq"],
        document_max_length=row["seq"],
        gradient_checkpointing=True,
        lora_r=LORA_R,
    )
    hf_cfg = AutoConfig.from_pretrained(path)
    dtype = torch.float32 if dry_run else torch.bfloat16
    backbone = adapt_backbone(AutoModel.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype), model_cfg)
    trainer_cfg = TrainerConfig(
        strategy="deepspeed",
        zero_stage=3,
        accelerator="cpu" if dry_run else "gpu",
        devices=1,
        precision="32-true" if dry_run else "bf16-mixed",
        gradient_clip_val=1.0,
    )
    module = ContrastiveModule(  # as the train job builds it: the step driver reads clipping from trainer_cfg
        BiEncoder(backbone, None, model_cfg),
        loss_cfg=LossConfig(),
        optim_cfg=OptimConfig(lr=1e-4, warmup_steps=0),
        gradcache=GradCacheConfig(chunk_size=row["chunk"]),
        trainer_cfg=trainer_cfg,
    )
    b, seq = row["batch"], row["seq"]

    def tokens(gen: torch.Generator) -> dict:
        ids = torch.randint(5, hf_cfg.vocab_size, (b, seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    gen = torch.Generator().manual_seed(1)
    batches = [
        PairBatch(
            tokens(gen),
            tokens(gen),
            TextIds(torch.arange(b) + 2 * b * i, torch.arange(b) + 2 * b * i + b, None),
            0,
            [f"{i}:{j}" for j in range(b)],
        )
        for i in range(warmup + steps)
    ]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda x: x)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    self.peak_warmup = torch.cuda.max_memory_allocated()  # the first step allocates the states
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=1,
        strategy=build_strategy(trainer_cfg, gradcache=True),  # as the train job passes it
        precision=trainer_cfg.precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fit_start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    result = {
        "optimizer_steps": trainer.global_step,
        "timed_steps": steps,
        "seconds_timed": round(clock.seconds, 3),
        "samples_per_s": round(b * steps / clock.seconds, 2),
        "fit_seconds": round(time.perf_counter() - fit_start, 1),
    }
    if cuda:
        steady = torch.cuda.max_memory_allocated()
        result["peak_steady_MiB"] = round(steady / MIB, 1)
        result["peak_fit_MiB"] = round(max(steady, clock.peak_warmup) / MIB, 1)
    else:
        import resource

        result["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def run_row(path: Path, row: dict, args) -> dict:
    """measure() in a fresh process; its JSON comes back on the last line of stdout."""
    cmd = [sys.executable, __file__, "--row", json.dumps(row), "--model-dir", str(path)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--dry-run"] if args.dry_run else [])
    launch = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.row_timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(dry_run: bool) -> str:
    import torch

    if not dry_run and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    versions = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for name in ("deepspeed", "lightning", "transformers", "peft"):
        if importlib.util.find_spec(name) is not None:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
    return f"{device}; " + ", ".join(versions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny Llama, 32-bit: the script end to end")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--row-timeout", type=int, default=240, help="seconds per row process")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # child process: one row
        out = measure(Path(args.model_dir), json.loads(args.row), dry_run=args.dry_run, **_steps(args))
        print(json.dumps(out), flush=True)
        return
    import torch

    command = "python bench/gpu_check.py" + (" --dry-run" if args.dry_run else "")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU; use --dry-run on CPU")
    have_deepspeed = importlib.util.find_spec("deepspeed") is not None
    print(f"command: {command}")
    print(f"machine: {machine(args.dry_run)}")
    if not have_deepspeed:
        print(
            "deepspeed is NOT installed: the ZeRO-3 rows cannot run. Install it (pip install embedscale[deepspeed], "
            "or offline: WHEELS=<dir with its wheels> bash bench/gpu_check.sh); writing the planner's estimates only."
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = backbone_dir(Path(tmp), args.dry_run)
        for row in DRY_ROWS if args.dry_run else GPU_ROWS:
            record = {"model": path.name, **row, "lora_r": LORA_R, "strategy": "zero3", "gradcache": True}
            record.update(
                {k: round(v, 1) for k, v in planned(path, row, args.dry_run).items() if k != "plan_terms_MiB"}
            )
            if have_deepspeed:
                record.update(run_row(path, row, args))
            else:
                record["error"] = "deepspeed not installed"
            if "peak_steady_MiB" in record:
                record["ratio_steady"] = round(record["peak_steady_MiB"] / record["plan_total_MiB"], 3)
            rows.append(record)
            print(json.dumps(record), flush=True)
    cols = ["model", "seq", "chunk", "batch", "plan_total_MiB", "peak_steady_MiB", "peak_fit_MiB", "peak_rss_MiB"]
    cols += ["ratio_steady"]
    cols += ["samples_per_s", "fit_seconds", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [str(r.get(c, "-")).strip().splitlines()[-1][:80] if c == "error" else str(r.get(c, "-")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    record = {"command": command, "machine": machine(args.dry_run), "dry_run": args.dry_run, "rows": rows}
    name = "gpu_check_dryrun.json" if args.dry_run else "gpu_check.json"
    targets = [RESULTS / name]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / name)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {target}")
    failed = [r for r in rows if "error" in r]
    if failed:
        sys.exit(2)


def _steps(args) -> dict:
    return {"warmup": args.warmup, "steps": args.steps}


if __name__ == "__main__":
    main()
