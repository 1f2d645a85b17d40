"""Sharded strategies at width: ZeRO-3 and FSDP2 with GradCache on 4 gloo ranks, a tiny decoder, global batch 4,096,
against DDP; and an FSDP2 sharded checkpoint resumed (at 4 ranks and at 2) against the uninterrupted run.

    python bench/sharded_equivalence.py                      # the table of docs/scale.md (~15 min on 2 cores)
    python bench/sharded_equivalence.py --batch 16 --chunk 4 --world 2 --name sharded_equivalence_smoke   # smoke

Every run is the real entry point (`python -m embedscale.jobs.train`, Lightning starting the ranks) on tests/helpers'
tiny random Mistral (2 layers, hidden 64, 4 heads, 2 key/value heads; last-token pooling, left padding, no dropout),
generated (query, positive) pairs over its word vocabulary, `--steps` optimizer steps of `--batch` pairs, the same
data order for every strategy. Full fine-tuning: DDP (plain, no GradCache) vs FSDP2 + GradCache. LoRA (r 4, gradient
checkpointing): DDP vs ZeRO-3 + GradCache and FSDP2 + GradCache. The exported weights (LoRA merged) are compared:
max |a - b| / max |b| over all tensors. Every run covers 2 epochs of steps - 1 batches (max_steps = steps).
Resume: the FSDP2 + GradCache run stopped after steps - 1 steps, at the end of the first epoch (its checkpoint:
one shard per rank), resumed for the last step on `--world` ranks and on half of them, vs the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from common import rel_diff, report, train_env, weights  # noqa: E402


def write_pairs(path: Path, n: int, words: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
            p = " ".join(rng.choice(words) for _ in range(rng.randint(5, 10)))
            f.write(json.dumps({"query": f"{q} {i}", "positive": f"{p} {i}"}) + "\n")


def train(args: list[str], run_dir: Path, timeout: float) -> float:
    env = train_env()
    env.setdefault("TORCH_EXTENSIONS_DIR", str(run_dir.parent / "torch_extensions"))
    cmd = [sys.executable, "-m", "embedscale.jobs.train", *args, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{run_dir.name}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4096, help="global batch (pairs)")
    parser.add_argument("--chunk", type=int, default=256, help="gradcache.chunk_size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--no-lora", action="store_true", help="full fine-tuning and resume only (smoke runs)")
    parser.add_argument("--keep", help="keep the runs under this directory")
    parser.add_argument("--name", default="sharded_equivalence")
    args = parser.parse_args()
    from helpers import _words, make_tiny_mistral

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="sharded-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model = make_tiny_mistral(tmp / "tiny_mistral")
    # an epoch of steps - 1 batches, 2 epochs: the stopped run below ends exactly at an epoch's end
    write_pairs(tmp / "pairs.jsonl", args.batch * (args.steps - 1), [w for w in _words() if w.isalpha()])
    common = [
        f"model.name_or_path={model}",
        "model.pooling=last_token",
        "model.padding_side=left",
        "model.query_max_length=16",
        "model.document_max_length=16",
        "data.format=jsonl",
        f"data.path={tmp / 'pairs.jsonl'}",
        f"data.global_batch_size={args.batch}",
        "data.batch_size_per_rank=null",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=2",
        f"trainer.devices={args.world}",
        "trainer.num_threads=1",
        "trainer.progress=off",
        "trainer.gradient_clip_val=1.0",
        "optim.lr=1e-3",
        "optim.scheduler=constant",
        "eval=none",
        "logger=none",
    ]
    gc = f"gradcache.chunk_size={args.chunk}"
    lora = ["model.lora_r=4", "model.gradient_checkpointing=true"]
    runs = {
        "ddp": ["trainer=ddp_cpu"],
        "fsdp2_gc": ["trainer=fsdp2_cpu", gc],
        "ddp_lora": ["trainer=ddp_cpu", *lora],
        "zero3_lora_gc": ["trainer=deepspeed_zero3_cpu", gc, *lora],
        "fsdp2_lora_gc": ["trainer=fsdp2_cpu", gc, *lora],
        "fsdp2_gc_stopped": ["trainer=fsdp2_cpu", gc, f"trainer.max_steps={args.steps - 1}"],
    }
    if args.no_lora:
        runs = {k: v for k, v in runs.items() if "lora" not in k}
    seconds = {}
    for name, extra in runs.items():
        seconds[name] = train([*common, *extra], tmp / name, args.timeout)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    # The stopped run ended with its epoch (steps - 1 batches), where a checkpoint written at the end of fit is
    # exact (Lightning counts an epoch cut by max_steps as finished: docs/scale.md). Resumed for the last step on
    # the same ranks and on half of them (the shards re-split on load), against the uninterrupted run.
    last = tmp / "fsdp2_gc_stopped" / "checkpoints" / "last.ckpt"
    shards = sorted(p.name for p in last.glob("*.distcp"))
    half = max(1, args.world // 2)
    resumed = {
        "fsdp2_gc_resumed": ["trainer=fsdp2_cpu", gc, f"trainer.resume={last}"],
        f"fsdp2_gc_resumed_w{half}": ["trainer=fsdp2_cpu", gc, f"trainer.resume={last}", f"trainer.devices={half}"],
    }
    for name, extra in resumed.items():
        seconds[name] = train([*common, *extra], tmp / name, args.timeout)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    w = {name: weights(tmp / name) for name in seconds}
    start = weights(model)
    pairs = [
        ("fsdp2_gc", "ddp", "FSDP2 + GradCache vs DDP, full fine-tuning"),
        ("zero3_lora_gc", "ddp_lora", "ZeRO-3 + LoRA + GradCache vs DDP + LoRA"),
        ("fsdp2_lora_gc", "ddp_lora", "FSDP2 + LoRA + GradCache vs DDP + LoRA"),
        ("fsdp2_gc_resumed", "fsdp2_gc", f"FSDP2 sharded checkpoint (step {args.steps - 1}) resumed vs uninterrupted"),
        (
            f"fsdp2_gc_resumed_w{half}",
            "fsdp2_gc",
            f"the same resumed on W={half} (resharded) vs uninterrupted",
        ),
    ]
    pairs = [p for p in pairs if p[0] in seconds]
    rows = [
        {
            "case": what,
            "max_rel_diff": float(f"{rel_diff(w[got], w[want]):.3e}"),
            "within_1e-5": rel_diff(w[got], w[want]) <= 1e-5,
            "seconds": f"{seconds[got]:.0f} vs {seconds[want]:.0f}",
        }
        for got, want, what in pairs
    ]
    moved = {
        run: max((w[run][k] - start[k]).abs().max().item() for k in start) for run in ("ddp", "ddp_lora") if run in w
    }
    extra = {
        "world": args.world,
        "global_batch": args.batch,
        "gradcache.chunk_size": args.chunk,
        "optimizer_steps": args.steps,
        "weights_moved_max_abs": moved,
        "checkpoint_shards": shards,
    }
    report(args.name, rows, extra)
    if not all(r["within_1e-5"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
