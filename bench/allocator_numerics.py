"""Does trainer.host_allocator change what a run computes? It should only change where freed memory goes (glibc's
mmap threshold, runtime.tune_allocator), not the arithmetic: this trains the quickstart (all-MiniLM-L6-v2, SciFact
train, batch 32, seed 42) for a few optimizer steps under each allocator, one process each, and compares every
logged step's loss and gradient norm and the exported weights with the first allocator's, bit for bit.

    python bench/allocator_numerics.py                       # lean, reuse, glibc; 4 steps
    python bench/allocator_numerics.py --steps 8 --allocators lean,reuse

Why it matters: bench/objective_quality.py's later rows ran under `reuse` (faster on CPU, docs/large-batch.md)
while its first rows ran under the default `lean`; the rows are comparable only if the allocator leaves the numbers
alone. Wall seconds are reported but are one run each, not a timing comparison (bench/step_throughput.py is).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embedscale_cli, rel_diff, report, weights  # noqa: E402

NAME = "allocator_numerics"


def logged(run_dir: Path, key: str) -> list[float]:
    """The per-step values of `key` in a run's CSV log, in step order."""
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allocators", default="lean,reuse,glibc")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="/tmp/embedscale-allocator-numerics")
    parser.add_argument("--extra", default="", help="more overrides for every run, separated by ';' (smoke tests)")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    allocators = args.allocators.split(",")
    runs = {}
    for allocator in allocators:
        run_dir = work / allocator
        overrides = [
            f"trainer.max_steps={args.steps}",
            "trainer.log_every_n_steps=1",
            "trainer.progress=off",
            f"trainer.host_allocator={allocator}",
            f"seed={args.seed}",
            "eval=none",
            "logger=csv",
            f"run_dir={run_dir}",
            f"hydra.run.dir={run_dir}",
            "overwrite=true",
            *(e for e in args.extra.split(";") if e),
        ]
        print(f"{allocator}: training {args.steps} steps in {run_dir}", flush=True)
        seconds = embedscale_cli(["train", *overrides], work / f"{allocator}.log")
        runs[allocator] = {
            "loss": logged(run_dir, "train/loss"),
            "grad_norm": logged(run_dir, "train/grad_norm"),
            "weights": weights(run_dir),
            "seconds": round(seconds, 1),
        }
    reference = runs[allocators[0]]
    if len(reference["loss"]) != args.steps:
        raise SystemExit(f"{allocators[0]} logged {len(reference['loss'])} losses for {args.steps} steps")
    rows = []
    for allocator in allocators:
        run = runs[allocator]
        rows.append(
            {
                "allocator": allocator,
                "steps": len(run["loss"]),
                "losses identical": run["loss"] == reference["loss"],
                "grad norms identical": run["grad_norm"] == reference["grad_norm"],
                "weights max rel diff": rel_diff(run["weights"], reference["weights"]),
                "final loss": run["loss"][-1],
                "wall s (one run)": run["seconds"],
            }
        )
    report(
        args.name,
        rows,
        {"reference": allocators[0], "losses": {a: runs[a]["loss"] for a in allocators}},
    )
    if not all(r["losses identical"] and r["grad norms identical"] and r["weights max rel diff"] == 0 for r in rows):
        print(json.dumps(rows, indent=2))
        raise SystemExit("an allocator changed the numbers: see the table")


if __name__ == "__main__":
    main()
