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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_mixture_shards, seed_table  # noqa: E402

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
    if "cosent" in rows:
        make_mixture_shards(work, args.data_root, args.scifact, args.sts_train)
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
    seed_table(args.name, spec, rows, seeds, common=common, metrics=METRICS, work=work, fresh=args.fresh)


if __name__ == "__main__":
    main()
