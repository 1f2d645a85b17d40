"""Peak memory of one GradCache step vs the global batch: does memory grow only by the embeddings?

    python bench/gradcache_memory.py --sizes 512,1024,2048,4096,8192 --chunk 32
    python bench/gradcache_memory.py --sizes 8 --chunk 4 --warmup-pairs 4 --model PATH   # a smoke run, seconds

all-MiniLM-L6-v2, synthetic text of exactly 128 tokens (queries and documents), one process,
GradCache chunk 32 rows, loss row chunks 1024 (the defaults), AdamW. Each size runs in a fresh
process: load, one warm-up step on 64 pairs (allocates AdamW's state), then one full step (pass 1,
loss, pass 2, optimizer). Reported:

- `peak_rss_MiB`: the process's peak RSS (model, optimizer state, warm-up and the step: everything);
- `batch_data_MiB`: what the batch itself must hold: token ids and masks of both sides (int64) and
  the embeddings with their cached gradients (fp32) -- memory that any method holding the batch pays;
- `growth_beyond_data`: (peak - peak at the first size - (batch_data - its batch_data)) / peak at the
  first size. Target (issue 3): <= 15% at the largest size.

The peak RSS *difference* over one step misleads with glibc's default allocator: memory freed by the
warm-up stays in the process and is reused, so it is not counted. The absolute peak is what a user
sees. Set MALLOC_MMAP_THRESHOLD_=1048576 to return large blocks to the OS and watch live memory.

`--model` (a BERT-like model directory whose max length allows 128 tokens) and `--warmup-pairs` exist for smoke
runs (tests/test_bench_smoke.py): the figures are only comparable with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

WORDS = "alpha beta gamma delta protein cell gene model data signal drug trial dose risk patient".split()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def child(n: int, chunk: int, threads: int, warmup_pairs: int, model: str | None) -> dict:
    import torch

    from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig
    from embedscale.contrastive.gradcache import gradcache_step
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.batch import PairExample
    from embedscale.data.collate import PairCollator
    from embedscale.encoder.biencoder import load_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = {"name_or_path": model} if model else {}  # default: the packaged all-MiniLM-L6-v2
    encoder, tok = load_encoder(ModelConfig(**path, query_max_length=128, document_max_length=128))
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    collate = PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=0)
    rng = random.Random(0)

    def texts(count: int) -> list[str]:  # distinct, > 128 word pieces each: exactly 128 tokens
        return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(200)) for i in range(count)]

    def batch(count: int):
        return collate([PairExample(q, d) for q, d in zip(texts(count), texts(count), strict=True)])

    def step(b) -> None:
        gradcache_step(module, b, plan=GradCacheConfig(chunk_size=chunk, sort_by_length=True))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batch(warmup_pairs))
    big = batch(n)
    assert big.queries["input_ids"].shape == (n, 128) and big.documents["input_ids"].shape == (n, 128)
    before = _rss_kib("VmRSS:")
    start = time.perf_counter()
    step(big)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dim = module.encoder.query_backbone.config.hidden_size
    batch_data = 2 * (2 * n * 128 * 8) + 2 * (2 * n * dim * 4)  # ids+mask of 2 sides; embeddings+grads of 2 sides
    return {
        "seconds": seconds,
        "rss_before_step_MiB": before / 1024,
        "peak_rss_MiB": peak / 1024,
        "batch_data_MiB": batch_data / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-pairs", type=int, default=64, help="the untimed warm-up step's pairs")
    parser.add_argument("--model", default=None, help="model path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--name", default="gradcache_memory")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chunk, args.threads, args.warmup_pairs, args.model)))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--chunk", str(args.chunk), "--threads", str(args.threads)]
        cmd += ["--warmup-pairs", str(args.warmup_pairs)] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"global batch {n} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{n}: {r}", flush=True)
        rows.append(
            {
                "global_batch": n,
                "seconds": round(r["seconds"], 1),
                "rss_before_step_MiB": round(r["rss_before_step_MiB"]),
                "peak_rss_MiB": round(r["peak_rss_MiB"]),
                "batch_data_MiB": round(r["batch_data_MiB"], 1),
            }
        )
    first = rows[0]
    for row in rows:
        extra = row["peak_rss_MiB"] - first["peak_rss_MiB"] - (row["batch_data_MiB"] - first["batch_data_MiB"])
        row["growth_beyond_data"] = f"{100 * extra / first['peak_rss_MiB']:+.1f}%"
    extra = {"chunk": args.chunk, "threads": args.threads, "tokens": 128, "warmup_pairs": args.warmup_pairs}
    if args.model:
        extra["model"] = args.model
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # live-memory mode: part of how the figures were made
        extra["environment"] = f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    report(args.name, rows, extra)


if __name__ == "__main__":
    main()
