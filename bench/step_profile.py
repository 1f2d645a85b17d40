"""Where a GradCache step's time goes, op by op (issue 23, item 6): one optimizer step of each system from
bench/step_throughput.py (the same models, data and step functions) under torch.profiler, after an untimed warm-up
step, in one process. Per system: the step's wall, the profiler's total self CPU time, and that time by kind of op
(matrix products, the dropout masks' random draws, softmax, the rest), with the op counts that show how many
passes each system runs.

    python bench/step_profile.py                                      # SciFact, 64 pairs, chunk 16, 1 thread
    python bench/step_profile.py --dataset scifact --pairs 128 --chunk 32 --systems es-gc,st-cached,bare-gc

One profiled step per system is one sample: compare shares and op counts, and leave speed ratios to
step_throughput.py's interleaved rounds (the profiler also adds its own per-op overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import report  # noqa: E402

KINDS = {  # op name -> kind; every other op is "other"
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::bernoulli_": "dropout masks",
    "aten::_softmax": "softmax",
    "aten::_softmax_backward_data": "softmax",
}
COUNTED = ("aten::addmm", "aten::mm", "aten::bernoulli_", "aten::_softmax")


def profile_step(step) -> tuple[float, dict[str, float], dict[str, int]]:
    """(wall seconds, self CPU seconds by kind, call counts of COUNTED ops) of one call of `step`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    by_kind: dict[str, float] = {}
    counts = dict.fromkeys(COUNTED, 0)
    for event in prof.key_averages():
        kind = KINDS.get(event.key, "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_cpu_time_total / 1e6
        if event.key in counts:
            counts[event.key] = event.count
    return wall, by_kind, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact", help="fixed, scifact or medquad (bench/step_throughput.py)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--systems", default="es-gc,st-cached,bare-gc")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=None, help="every system's dropout (default: the model's)")
    parser.add_argument("--model", default=None, help="model path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument(
        "--allocator", default="glibc", choices=("glibc", "lean", "reuse"), help="as in step_throughput.py"
    )
    parser.add_argument("--name", default="step_profile")
    args = parser.parse_args()

    import torch
    from step_throughput import load_pairs, make_step
    from transformers import AutoTokenizer

    from embedscale.encoder.biencoder import resolve_model_path
    from embedscale.runtime import tune_allocator

    tune_allocator(args.allocator)  # MALLOC_MMAP_THRESHOLD_ or EMBEDSCALE_MALLOC=default in the environment win
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_path = args.model or str(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    queries, docs, max_length = load_pairs(args.dataset, args.pairs, AutoTokenizer.from_pretrained(model_path))
    systems = args.systems.split(",")
    steps = {s: make_step(s, model_path, queries, docs, max_length, args.chunk, args.dropout) for s in systems}
    for step, *_ in steps.values():
        step()  # warm-up: the allocator's growth and lazy inits, as in step_throughput.py
    rows = []
    for system in systems:
        wall, by_kind, counts = profile_step(steps[system][0])
        total = sum(by_kind.values())
        _, padded, largest = steps[system]
        row = {"system": system, "padded_tokens": padded, "largest_chunk": largest, "wall_s": round(wall, 2)}
        row["self_cpu_s"] = round(total, 2)
        for kind in ("matmul", "dropout masks", "softmax", "other"):
            row[f"{kind} s"] = round(by_kind.get(kind, 0.0), 2)
            row[f"{kind} share"] = round(by_kind.get(kind, 0.0) / total, 3) if total else None
        row.update({f"{op.removeprefix('aten::')} calls": n for op, n in counts.items()})
        rows.append(row)
        print(f"{system}: {row}", flush=True)
    report(
        args.name,
        rows,
        {
            "dataset": args.dataset,
            "pairs": args.pairs,
            "chunk": args.chunk,
            "threads": args.threads,
            "allocator": args.allocator,
        },
    )


if __name__ == "__main__":
    main()
