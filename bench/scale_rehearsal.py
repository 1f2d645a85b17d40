"""The advertised scale, end to end: `embedscale train` under torchrun (gloo) at global batches up to 65,536 pairs.

    python bench/scale_rehearsal.py      # the table of docs/scale.md (~1.5 h on 2 cores; --keep DIR resumes)
    python bench/scale_rehearsal.py --sizes 16384 --worlds 2 --allocators embedscale,glibc --rounds 3 \
        --equivalence 0 --name allocator_time                        # the allocator setting's time, interleaved
    python bench/scale_rehearsal.py --sizes 64 --worlds 2 --allocators embedscale --chunk 16 --row-chunk 16  # smoke

Every run is the real entry point: `python -m torch.distributed.run --standalone --nproc_per_node=W -m
embedscale.jobs.train` (W = 1: the plain process) with conftest's tiny random BERT (2 layers, 32 dims, no dropout,
the MiniLM tokenizer), shards written by `embedscale shard` from generated (query, positive, hard negative)
triplets with unique texts, one hard negative, GradCache on (`gradcache.chunk_size`), `loss.row_chunk_size`
score rows per block, 2 optimizer steps, data from shards in the same order for every W.

Measured per run: the peak resident set size of every rank (VmHWM, read from /proc while the run lasts; the table
shows the largest rank), the fit time per optimizer step (metrics.json's fit_seconds / steps: data loading,
tokenisation, two GradCache passes, the loss, the optimizer), and the bytes each rank received from the others in
the last step (train/gathered_MiB and train/reduce_scattered_MiB that embedscale logs). The allocator column:
`embedscale` is the default run (embedscale pins glibc's mmap threshold at start-up, embedscale/runtime.py);
`glibc` turns that off (EMBEDSCALE_MALLOC=default: glibc's dynamic threshold, what a user got before);
`live` sets MALLOC_MMAP_THRESHOLD_=1048576 in the environment (freed blocks >= 1 MiB leave at once).

`--equivalence N` (default: the largest size) also trains one process (W = 1, GradCache, the same global batch)
and compares the exported weights of every W at that size with it: max |a - b| / max |b| over all tensors.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from common import rel_diff, report, train_env, weights  # noqa: E402

MIB = 2**20
ALLOCATORS = {
    "embedscale": {},
    "glibc": {"EMBEDSCALE_MALLOC": "default"},
    "live": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
}
TOPICS = ["protein", "galaxy", "river", "violin", "engine", "forest", "vaccine", "crystal", "market", "glacier"]


def write_triplets(path: Path, n: int) -> None:
    """n (query, positive, negative) triplets, every text unique (no duplicate masking at any batch size)."""
    with path.open("w") as f:
        for i in range(n):
            t, u = TOPICS[i % len(TOPICS)], TOPICS[(i * 7 + 3) % len(TOPICS)]
            row = {"query": f"what about {t} {i}", "positive": f"{t} report {i}", "negatives": [f"{u} note {i}"]}
            f.write(json.dumps(row) + "\n")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return out


def _peak_kib(pid: int) -> tuple[str, int] | None:
    """(command line, VmHWM in KiB) of a process, None when it is gone."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return cmd, int(line.split()[1])
    except OSError:
        return None
    return None


def run_watched(cmd: list[str], env: dict, log: Path, timeout: float) -> dict[int, int]:
    """Run cmd; every 0.2 s read the peak RSS (VmHWM) of each rank process: {pid: peak KiB}."""
    peaks: dict[int, int] = {}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        start = time.monotonic()
        agent = "torch.distributed.run" in cmd
        while proc.poll() is None:
            for pid in _children(proc.pid) if agent else [proc.pid]:  # the ranks: torchrun's children, or the run
                got = _peak_kib(pid)
                if got and "embedscale.jobs.train" in got[0]:
                    peaks[pid] = max(peaks.get(pid, 0), got[1])
            if time.monotonic() - start > timeout:
                proc.kill()
                raise RuntimeError(f"{' '.join(cmd[:6])} ran past {timeout} s: see {log}")
            time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {log.read_text()[-3000:]}")
    return peaks


def train(args, model: Path, shards: Path, run_dir: Path, *, n: int, world: int, allocator: str) -> dict:
    """One run's row; a finished run kept under --keep (its row file) is not run again."""
    done = run_dir.with_suffix(".row.json")
    if done.exists():
        return json.loads(done.read_text())
    row = _train(args, model, shards, run_dir, n=n, world=world, allocator=allocator)
    done.write_text(json.dumps(row) + "\n")
    return row


def _train(args, model: Path, shards: Path, run_dir: Path, *, n: int, world: int, allocator: str) -> dict:
    overrides = [
        f"model.name_or_path={model}",
        "model.query_max_length=16",
        "model.document_max_length=16",
        "data.format=shards",
        f"data.path={shards}",
        f"data.global_batch_size={n}",
        "data.batch_size_per_rank=null",
        "data.num_hard_negatives=1",
        f"gradcache.chunk_size={args.chunk}",
        f"loss.row_chunk_size={args.row_chunk}",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        f"trainer.devices={world}",
        f"trainer.strategy={'ddp' if world > 1 else 'auto'}",
        f"trainer.num_threads={1 if world > 1 else args.one_process_threads}",
        "trainer.progress=off",
        "trainer.log_every_n_steps=1",
        "optim.lr=1e-3",
        "optim.scheduler=constant",
        "eval=none",
        "logger=csv",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    cmd = [*(launcher if world > 1 else [sys.executable]), "-m", "embedscale.jobs.train", *overrides]
    peaks = run_watched(cmd, train_env(**ALLOCATORS[allocator]), run_dir.with_suffix(".log"), args.timeout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = metrics["train"]["optimizer_steps"]
    logged = [r for r in csv.DictReader((run_dir / "logs" / "metrics.csv").open()) if r.get("train/loss")]
    last = logged[-1] if logged else {}
    row = {
        "N": n,
        "W": world,
        "allocator": allocator,
        "ranks_seen": len(peaks),
        "peak_rss_MiB_max_rank": round(max(peaks.values()) / 1024),
        "peak_rss_MiB_min_rank": round(min(peaks.values()) / 1024),
        "s_per_step": round(metrics["train"]["fit_seconds"] / steps, 1),
        "gathered_MiB_per_rank": round(float(last.get("train/gathered_MiB") or 0), 2),
        "reduce_scattered_MiB_per_rank": round(float(last.get("train/reduce_scattered_MiB") or 0), 2),
        "steps": steps,
        **linear_terms(n, world, args.row_chunk),
    }
    if steps != 2 or len(peaks) != world:
        raise RuntimeError(f"run {run_dir}: {steps} steps, {len(peaks)} rank processes seen (want 2, {world})")
    return row


def linear_terms(n: int, world: int, row_chunk: int, k: int = 1, dim: int = 32) -> dict:
    """What a rank holds that grows with N (MiB): the gathered embeddings and their gradients, N (2 + k) x d x 4 B
    x 2, and one score block of the loss, r x C x 28 B (C = N (1 + k) candidates, r = min(row_chunk, N / W);
    embedscale/strategy/memory.py's loss term); next to the full N x C score matrix that a loss scoring every
    query at once would materialise (4 B per score, before its gradient)."""
    cands = n * (1 + k)
    rows = min(row_chunk, n // world)
    return {
        "O(N)_terms_MiB": round((n * (2 + k) * dim * 8 + rows * cands * 28) / MIB, 1),
        "full_score_matrix_MiB": round(n * cands * 4 / MIB),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,16384,65536", help="global batches (pairs)")
    parser.add_argument("--worlds", default="2,8", help="ranks per run (torchrun --nproc_per_node)")
    parser.add_argument("--allocators", default="embedscale,glibc,live", help=",".join(ALLOCATORS))
    parser.add_argument("--allocators-at", default="4096,16384,65536", help="sizes run with every allocator")
    parser.add_argument("--equivalence", type=int, default=None, help="size trained also as one process; 0: none")
    parser.add_argument("--chunk", type=int, default=512, help="gradcache.chunk_size (texts per encoder pass)")
    parser.add_argument("--row-chunk", type=int, default=256, help="loss.row_chunk_size (score rows per block)")
    parser.add_argument("--skip", default="", help="N:W:allocator runs left out, comma-separated")
    parser.add_argument("--one-process-threads", type=int, default=1, help="torch threads of the W = 1 run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run, interleaved (timing)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", help="keep the runs under this directory")
    parser.add_argument("--name", default="scale_rehearsal")
    args = parser.parse_args()
    from conftest import make_tiny_bert

    sizes = [int(s) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    allocators = args.allocators.split(",")
    at = {int(s) for s in args.allocators_at.split(",")}
    equivalence = max(sizes) if args.equivalence is None else args.equivalence
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model, shards = tmp / "tiny_bert_nodrop", tmp / "shards"
    if not (shards / "manifest.json").exists():  # else kept from an earlier invocation with the same --keep
        make_tiny_bert(model, dropout=0.0)
        write_triplets(tmp / "triplets.jsonl", 2 * max(sizes))
        shard_cmd = [sys.executable, "-m", "embedscale.jobs.shard", f"shard.inputs=[{tmp / 'triplets.jsonl'}]"]
        shard_cmd += [f"shard.output={shards}", "shard.name=triplets", f"hydra.run.dir={tmp / 'shard-run'}"]
        subprocess.run(shard_cmd, env=train_env(), check=True, cwd=ROOT, capture_output=True)
    rows, runs = [], {}
    for rnd in range(args.rounds):  # rounds > 1: the allocators interleaved, for their time (--name allocator_time)
        for n in sizes:
            for world in worlds:
                for allocator in allocators if n in at else allocators[:1]:
                    if f"{n}:{world}:{allocator}" in args.skip.split(","):
                        continue
                    run_dir = tmp / (f"n{n}-w{world}-{allocator}" + (f"-r{rnd}" if args.rounds > 1 else ""))
                    rows.append(train(args, model, shards, run_dir, n=n, world=world, allocator=allocator))
                    rows[-1]["round"] = rnd
                    print(rows[-1], flush=True)
                    if allocator == allocators[0]:
                        runs[(n, world)] = run_dir
    equal = []
    if equivalence:
        one = tmp / f"n{equivalence}-w1"
        rows.append(train(args, model, shards, one, n=equivalence, world=1, allocator=allocators[0]))
        print(rows[-1], flush=True)
        ref, start = weights(one), weights(model)
        moved = max((ref[k] - start[k]).abs().max().item() for k in ref if k in start)
        for world in worlds:
            got = weights(runs[(equivalence, world)])
            equal.append({"case": f"W={world} vs one process, N={equivalence}", "max_rel_diff": rel_diff(got, ref)})
        for a, b in zip(worlds, worlds[1:]):
            got, want = weights(runs[(equivalence, b)]), weights(runs[(equivalence, a)])
            equal.append({"case": f"W={b} vs W={a}, N={equivalence}", "max_rel_diff": rel_diff(got, want)})
        equal.append({"case": "weights moved by training (max |after - before|)", "max_rel_diff": moved})
        for e in equal:
            print(f"{e['case']}: {e['max_rel_diff']:.3e}")
    for row in rows:
        row.setdefault("round", 0)  # (the one-process run)
    medians = {}
    for allocator in allocators:
        times = [r["s_per_step"] for r in rows if r["allocator"] == allocator and r["W"] > 1]
        medians[allocator] = statistics.median(times) if times else None
    extra = {
        "median_s_per_step": medians,
        "equivalence": equal,
        "settings": {
            "model": "conftest make_tiny_bert(dropout=0): 2 layers, hidden 32, MiniLM tokenizer",
            "query/document max tokens": 16,
            "hard negatives": 1,
            "gradcache.chunk_size": args.chunk,
            "loss.row_chunk_size": args.row_chunk,
            "optimizer steps": 2,
            "threads per rank": 1,
        },
    }
    report(args.name, rows, extra)


if __name__ == "__main__":
    main()
