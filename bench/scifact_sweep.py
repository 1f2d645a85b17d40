"""Seed sweep on SciFact: sentence-transformers MNRL vs embedscale variants, same model, data, batch, epochs.

    python bench/scifact_sweep.py --device cuda --seeds 0,1,2,3,4 --budget-s 380

On 919 pairs and ~84 steps one seed moves NDCG@10 by about a point, so a single run cannot tell a
real improvement from luck. This script trains every variant for every seed (seed-major order, so a
time budget still leaves balanced seeds), scores each model with the same evaluator (SciFact test,
exact search, 256 tokens), and prints mean and standard deviation per variant. It is how the
quickstart defaults were chosen; the figure that counts is then rerun on the CPU with
bench/st_mnrl_scifact.py. Variants are `name=system:override,override` (system st or es);
overrides after `--` apply to all.

Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402
from st_mnrl_scifact import compose, evaluate, train_sentence_transformers  # noqa: E402

DEFAULT_VARIANTS = [
    "st=st:",
    "es=es:",
    "es-t0.03=es:loss.temperature=0.03",
    "es-learnT=es:loss.learnable_temperature=true",
    "es-sym0.5=es:loss.symmetric_weight=0.5",
    "st-lr5e-5=st:optim.lr=5e-5",
    "es-lr5e-5=es:optim.lr=5e-5",
]
NAMES = ["scifact/ndcg@10", "scifact/recall@100", "scifact/mrr@10"]


def run_variant(system: str, overrides: list[str], run_dir: Path, device: str) -> dict:
    """Train one variant into run_dir and return its SciFact test metrics."""
    if system == "st":
        cfg = compose(overrides)
        import torch

        torch.manual_seed(cfg.seed)
        train_sentence_transformers(cfg, run_dir, device)
        return evaluate(str(run_dir / "model"), cfg, device)
    from embedscale.jobs.train import run

    accel = ["trainer.accelerator=gpu", "trainer.precision=32-true"] if device == "cuda" else []
    fixed = [*accel, "logger=none", "export=false", "eval.save_runs=false", "trainer.progress=off"]
    out = run(compose([*overrides, *fixed, f"run_dir={run_dir}"]))
    return out["eval"]["after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", action="append", help="name=system:overrides (repeatable)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this")
    parser.add_argument("--out", default="runs/scifact_sweep")
    parser.add_argument("--partial", default=None, help="also append each finished run here as JSON lines")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    variants = []
    for spec in args.variant or DEFAULT_VARIANTS:
        name, rest = spec.split("=", 1)
        system, _, ovr = rest.partition(":")
        variants.append((name, system, [o for o in ovr.split(",") if o]))
    start = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    rows, failed = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, system, ovr in variants:
            if time.perf_counter() - start > args.budget_s or name in failed:
                continue
            t0 = time.perf_counter()
            run_dir = Path(args.out).resolve() / f"{name}-seed{seed}"
            try:
                metrics = run_variant(system, [*args.overrides, *ovr, f"seed={seed}"], run_dir, args.device)
            except Exception as exc:  # one broken variant must not cost the others their runs
                import traceback

                traceback.print_exc()
                failed[name] = repr(exc)
                print(f"FAILED {name}: {exc!r}", flush=True)
                continue
            row = {"variant": name, "seed": seed, **{n: metrics[n] for n in NAMES}}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            results[name].append(metrics)
            print("RUN " + json.dumps(row), flush=True)
            if args.partial:
                with open(args.partial, "a") as f:
                    f.write(json.dumps(row) + "\n")
    summary = []
    for name, runs in results.items():
        if not runs:
            continue
        ndcg = [r["scifact/ndcg@10"] for r in runs]
        summary.append(
            {
                "variant": name,
                "seeds": len(runs),
                **{f"mean {n}": statistics.mean(r[n] for r in runs) for n in NAMES},
                "ndcg@10 std": statistics.stdev(ndcg) if len(ndcg) > 1 else 0.0,
            }
        )
    extra = {"runs": rows, "failed": failed, "variants": args.variant or DEFAULT_VARIANTS}
    report(f"scifact_sweep_{args.device}", summary, extra)


if __name__ == "__main__":
    main()
