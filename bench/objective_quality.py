"""What each objective buys on our data (issue 23, item 5): SciFact test NDCG@10 / Recall@100 and STS-B test Spearman
after the quickstart recipe (all-MiniLM-L6-v2, SciFact train, 3 epochs of 28 steps at batch 32, lr 1e-4) with one
change per row, at the same budget (84 optimizer steps, batch 32) and the same seeds.

    python bench/objective_quality.py              # every row x seeds 42, 43, 44 (about 20 min per cell on 2 cores)
    python bench/objective_quality.py --rows base,cosent --seeds 42

Rows:
- base: the quickstart (`embedscale train` with no arguments), InfoNCE with in-batch negatives;
- qqdd: + loss.query_query and loss.document_document (GTE's improved contrastive loss);
- guide: + loss.guide_model = the starting checkpoint (GISTEmbed's guard, guide margin 0);
- margin: + loss.margin_guard=0.05 (the model's own cosines);
- cosent: SciFact (InfoNCE) + STS-B train (CoSENT) as a sharded mixture, 3 : 1 by global batches, 28 steps per epoch
  (so the same 84 steps: about 63 on SciFact, 21 on STS-B).

Each cell is one `embedscale train` process (eval=scifact_general: SciFact test at 256 tokens, exact search; STS-B
test; MedQuAD retrieval over 2,000 sampled pairs). The results file is rewritten after every cell and read back on
start: a cell already there is not run again (--fresh reruns everything), so the table can be completed over
several sessions. base and cosent are domain_forgetting.py's quickstart and mix rows: the two scripts share the work
directory, and so those cells. The summary rows give the mean and the sample standard deviation over the seeds a
row has so far (n says how many).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cell_dir, mixture_overrides, quality_args, quality_common, seed_table  # noqa: E402

NAME = "objective_quality"
METRICS = ("scifact/ndcg@10", "scifact/recall@100", "stsb/spearman", "medquad/ndcg@10")


def rows_spec(args, rows: list[str]) -> dict[str, list[str]]:
    mixture = mixture_overrides(args) if "cosent" in rows else ["data.sources=<the SciFact + STS-B mixture>"]
    return {
        "base": [],
        "qqdd": ["loss.query_query=true", "loss.document_document=true"],
        "guide": [f"loss.guide_model={args.model}"],
        "margin": ["loss.margin_guard=0.05"],
        "cosent": mixture,
    }


def paired_vs_base(cells: list[dict], zero_shot: dict) -> dict:
    """Each row against base seed by seed (the same seed: the same data order and dropout draws up to the change):
    per metric the per-seed deltas, their mean, sample std and mean / (std / sqrt(n)) (a paired t statistic; with
    n = 3 seeds |t| > 4.30 is p < 0.05 two-sided). Rows whose seeds base lacks are compared on the common seeds."""
    import statistics

    base = {c["seed"]: c for c in cells if c["row"] == "base"}
    out: dict[str, dict] = {}
    for row in dict.fromkeys(c["row"] for c in cells if c["row"] != "base"):
        got = [c for c in cells if c["row"] == row and c["seed"] in base]
        if not got:
            continue
        out[row] = {"seeds": [c["seed"] for c in got]}
        for m in METRICS:
            deltas = [round(c[m] - base[c["seed"]][m], 4) for c in got]
            mean = statistics.mean(deltas)
            std = statistics.stdev(deltas) if len(deltas) > 1 else None
            t = mean / (std / len(deltas) ** 0.5) if std else None
            out[row][m] = {
                "deltas": deltas,
                "mean": round(mean, 4),
                "std": round(std, 4) if std is not None else None,
                "t": round(t, 2) if t is not None else None,
            }
    for row, got in out.items():
        print(
            f"{row} - base, paired by seed {got['seeds']}: "
            + "; ".join(f"{m} {got[m]['mean']:+.4f} (std {got[m]['std']}, t {got[m]['t']})" for m in METRICS)
        )
    return {"paired_vs_base": out}


GUARDS = ("train/guide_masked", "train/margin_guard_masked")


def guards_masked(cells: list[dict], run_dirs: dict[tuple[str, int], Path]) -> dict:
    """Per guarded cell, how many in-batch candidates per query each guard masked: the mean, min and max over the
    steps its CSV log holds (every trainer.log_every_n_steps-th step), read from the cell's run directory."""
    import csv

    out = {}
    for c in cells:
        log = run_dirs.get((c["row"], c["seed"]), Path("/nonexistent")) / "logs" / "metrics.csv"
        if not log.exists():
            continue
        with open(log) as f:
            logged = list(csv.DictReader(f))
        for key in GUARDS:
            values = [float(r[key]) for r in logged if r.get(key)]
            if values:
                out[f"{c['row']}/{c['seed']}"] = {
                    "guard": key,
                    "logged_steps": len(values),
                    "mean": round(sum(values) / len(values), 4),
                    "min": min(values),
                    "max": max(values),
                }
    return {"masked_per_query": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="base,qqdd,guide,margin,cosent")
    quality_args(parser)
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    spec = rows_spec(args, rows)
    if unknown := set(rows) - set(spec):
        raise SystemExit(f"unknown rows {sorted(unknown)}: use {', '.join(spec)}")
    common = quality_common(args)

    def derived(cells: list[dict], zero_shot: dict) -> dict:  # also the cells of seeds this call did not name
        run_dirs = {
            (c["row"], c["seed"]): cell_dir(work, [*common, *spec[c["row"]], f"seed={c['seed']}"])
            for c in cells
            if c["row"] in spec
        }
        return {**paired_vs_base(cells, zero_shot), **guards_masked(cells, run_dirs)}

    seed_table(args.name, spec, rows, seeds, common=common, metrics=METRICS, work=work, fresh=args.fresh, extra=derived)


if __name__ == "__main__":
    main()
