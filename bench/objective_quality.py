"""What each objective buys on our data (issue 23, item 5): SciFact test NDCG@10 / Recall@100 and STS-B test Spearman
after the quickstart recipe (all-MiniLM-L6-v2, SciFact train, 3 epochs of 28 steps at batch 32, lr 1e-4) with one
change per row, at the same budget (84 optimizer steps, batch 32) and the same seeds.

    python bench/objective_quality.py              # every row x seeds 42, 43, 44 (about 12 min per cell on 2 cores)
    python bench/objective_quality.py --rows base,cosent --seeds 42

Rows:
- base: the quickstart (`embedscale train` with no arguments), InfoNCE with in-batch negatives;
- qqdd: + loss.query_query and loss.document_document (GTE's improved contrastive loss);
- guide: + loss.guide_model = the starting checkpoint (GISTEmbed's guard, guide margin 0);
- margin: + loss.margin_guard=0.05 (the model's own cosines);
- cosent: SciFact (InfoNCE) + STS-B train (CoSENT) as a sharded mixture, 3 : 1 by global batches, 28 steps per epoch
  (so the same 84 steps: about 63 on SciFact, 21 on STS-B).

Each cell is one `embedscale train` process (eval=scifact_stsb: SciFact test at 256 tokens, exact search; STS-B
test). The results file is rewritten after every cell and read back on start: a cell already there is not run
again (--fresh reruns everything), so the table can be completed over several sessions. The summary rows give the
mean and the sample standard deviation over the seeds a row has so far (n says how many).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, report  # noqa: E402

NAME = "objective_quality"
METRICS = ("scifact/ndcg@10", "scifact/recall@100", "stsb/spearman")


def rows_spec(model: str, work: Path, steps_per_epoch: int) -> dict[str, list[str]]:
    scifact, stsb = work / "shards" / "scifact", work / "shards" / "stsb"
    sources = f"[{{path: {scifact}, weight: 3}}, {{path: {stsb}, loss: cosent, weight: 1}}]"
    return {
        "base": [],
        "qqdd": ["loss.query_query=true", "loss.document_document=true"],
        "guide": [f"loss.guide_model={model}"],
        "margin": ["loss.margin_guard=0.05"],
        "cosent": ["data.format=shards", f"data.sources={sources}", f"data.steps_per_epoch={steps_per_epoch}"],
    }


def cli(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "embedscale.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"embedscale {' '.join(args[:1])} failed ({proc.returncode}): see {log}")
    return time.perf_counter() - start


def make_shards(work: Path, data_root: str | None, scifact: str, sts_train: str) -> None:
    root = [f"data_root={data_root}"] if data_root else []
    for name, args in (
        ("scifact", ["shard.format=beir", f"shard.inputs=[{scifact}]", "shard.split=train"]),
        ("stsb", ["shard.format=sts", f"shard.inputs=[{sts_train}]"]),
    ):
        out = work / "shards" / name
        if not (out / "manifest.json").exists():
            cli(["shard", *args, *root, f"shard.name={name}", f"shard.output={out}"], work / f"shard-{name}.log")


def summary(cells: list[dict], rows: list[str]) -> list[dict]:
    out = []
    for row in rows:
        got = [c for c in cells if c["row"] == row]
        if not got:
            continue
        line = {"row": row, "seed": "mean", "n": len(got)}
        for m in METRICS:
            values = [c[m] for c in got]
            line[m] = round(statistics.mean(values), 4)
            line[f"{m} std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
        line["steps"] = round(statistics.mean(c["steps"] for c in got), 1)
        line["seconds"] = round(statistics.mean(c["seconds"] for c in got), 1)
        out.append(line)
    return out


def columns(line: dict) -> dict:
    """A table line with every column (summary lines and cells share the table)."""
    keys = ["row", "seed", "n"] + [k for m in METRICS for k in (m, f"{m} std")] + ["steps", "seconds"]
    return {k: line.get(k) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="base,qqdd,guide,margin,cosent")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--data-root", default=None, help="data root (default: embedscale's: ../shared/data)")
    parser.add_argument("--scifact", default="scifact", help="BEIR SciFact directory under the data root")
    parser.add_argument("--sts-train", default="stsb/train.tsv")
    parser.add_argument("--sts-test", default="stsb/test.tsv")
    parser.add_argument("--steps-per-epoch", type=int, default=28, help="the mixture row's (919 // 32 = the base's)")
    parser.add_argument("--work", default="/tmp/embedscale-objective-quality")
    parser.add_argument("--extra", default="", help="more overrides for every cell, separated by ';' (smoke tests)")
    parser.add_argument("--fresh", action="store_true", help="rerun cells the results file already holds")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    spec = rows_spec(args.model, work, args.steps_per_epoch)
    unknown = set(rows) - set(spec)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}: use {', '.join(spec)}")
    previous = RESULTS / f"{args.name}.json"
    cells = [] if args.fresh or not previous.exists() else json.loads(previous.read_text()).get("cells", [])
    if "cosent" in rows:
        make_shards(work, args.data_root, args.scifact, args.sts_train)
    common = [
        f"model.name_or_path={args.model}",
        "eval=scifact_stsb",
        f"eval.beir.0.path={args.scifact}",
        f"eval.sts.0.path={args.sts_test}",
        f"eval.cache_dir={work / 'cache'}",
        "logger=csv",
        "trainer.progress=off",
        "export=false",
    ]
    common += [f"data.root={args.data_root}"] if args.data_root else []
    common += [e for e in args.extra.split(";") if e]
    for seed in seeds:  # seed-major: every row of a seed before the next seed
        for row in rows:
            if any(c["row"] == row and c["seed"] == seed for c in cells):
                print(f"{row} seed {seed}: already in the results: skipped", flush=True)
                continue
            print(f"{row} seed {seed}: training and evaluating", flush=True)
            run_dir = work / "runs" / f"{row}-{seed}"
            overrides = [*common, *spec[row], f"seed={seed}", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]
            seconds = cli(["train", *overrides, "overwrite=true"], work / f"train-{row}-{seed}.log")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            after = metrics["eval"]["after"]
            cell = {"row": row, "seed": seed, **{m: round(after[m], 4) for m in METRICS}}
            cell.update(steps=metrics["train"]["optimizer_steps"], seconds=round(seconds, 1))
            cell["overrides"] = spec[row]
            cells.append(cell)
            before = metrics["eval"].get("before", {})
            zero_shot = {m: round(before[m], 4) for m in METRICS if m in before}
            table = [columns(line) for line in summary(cells, list(spec)) + cells]
            report(args.name, table, {"cells": cells, "zero_shot": zero_shot})


if __name__ == "__main__":
    main()
