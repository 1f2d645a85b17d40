"""Domain gain vs forgetting (issue 24, item 3): SciFact test NDCG@10 (the domain) next to STS-B test Spearman and
MedQuAD retrieval NDCG@10 (general ability: eval=scifact_general, MedQuAD as retrieval over 2,000 sampled pairs)
after fine-tuning all-MiniLM-L6-v2 on SciFact at the quickstart's budget (84 optimizer steps at batch 32, lr 1e-4),
with one forgetting control per row, the same seeds.

    python bench/domain_forgetting.py                      # every row x seeds 42, 43, 44 (~20 min per cell, 2 cores)
    python bench/domain_forgetting.py --rows quickstart,wise --seeds 42

Rows:
- quickstart: `embedscale train eval=scifact_general` (tuned for the domain score alone);
- l2sp: + anchor.l2_sp_weight=300 (each step pulls the weights 3% of the way back to the start);
- wise: + anchor.interpolation=0.5 (the final weights halfway between the start and the fine-tuned ones);
- mix: SciFact (InfoNCE) + STS-B train (CoSENT) as a sharded mixture, 3 : 1 by global batches, 28 steps per
  epoch (the same 84 steps: about 63 on SciFact, 21 on STS-B);
- domain: mix + wise (conf/recipe/domain.yaml's training stage until 2026-12-06; the recipe now interpolates at 0.7,
  the row domain@0.7);
- ict: no labels: inverse-cloze pairs from the SciFact corpus (data.format=corpus, data.pretrain.task=ict), 84
  steps, + wise (the domain recipe without its labelled pairs or the STS-B mixture).
- wise@A, domain@A: wise and domain at anchor.interpolation=A (e.g. --rows domain@0.7): points of the WiSE curve,
  each one evaluation (below); wise@0.5 is wise.

The goal (issue 24): a recipe that keeps >= 90% of the quickstart's domain gain (NDCG@10 over zero-shot) while each
general metric drops by at most 0.005 (0.5 points) from zero-shot; `goal` in the json computes it per row from
the row means. Cells are resumable as in objective_quality.py (bench/common.py seed_table), and quickstart and mix
are objective_quality.py's base and cosent cells (the same work directory: run once for both tables). wise and
domain train exactly the steps of quickstart and mix and differ only at the end: their cells resume the source
cell's final checkpoint (same seed), train no step, and are interpolated and evaluated by the train job (about 5
minutes instead of 20; the exported model equals a full run's bit for bit, tests/test_anchor.py); their `seconds`
add the source's. List a source row before the rows resumed from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mixture_overrides, quality_args, quality_common, seed_table  # noqa: E402

NAME = "domain_forgetting"
DOMAIN = "scifact/ndcg@10"
GENERAL = ("stsb/spearman", "medquad/ndcg@10")
METRICS = (DOMAIN, "scifact/recall@100", *GENERAL)
RESUME_FROM = {"wise": "quickstart", "domain": "mix"}
"""Rows that train exactly their source's steps and only interpolate at the end: resumed from its final checkpoint
(bench/common.py seed_table), not trained again."""


def rows_spec(args, rows: list[str]) -> dict[str, list[str]]:
    mix = mixture_overrides(args) if {"mix", "domain"} & set(rows) else ["data.sources=<the SciFact + STS-B mixture>"]
    wise = ["anchor.interpolation=0.5"]
    ict = ["data.format=corpus", f"data.path={args.scifact}", "data.pretrain.task=ict"]
    ict += [f"trainer.max_steps={args.steps}"]
    return {
        "quickstart": [],
        "l2sp": ["anchor.l2_sp_weight=300"],
        "wise": wise,
        "mix": mix,
        "domain": mix + wise,
        "ict": ict + wise,
    }


def goal(cells: list[dict], zero_shot: dict) -> dict:
    """Per row, over the seeds it has and against the quickstart cells of those same seeds (a row that has fewer
    seeds is not compared with another seed's quickstart): the share of the quickstart's domain gain it keeps, each
    general metric's change from zero-shot, and whether both targets hold."""
    if not zero_shot:
        return {}
    quickstart = {c["seed"]: c for c in cells if c["row"] == "quickstart"}
    out = {}
    for row in dict.fromkeys(c["row"] for c in cells):
        got = [c for c in cells if c["row"] == row and c["seed"] in quickstart]
        if not got:
            continue
        mean = lambda group, m: sum(c[m] for c in group) / len(group)  # noqa: E731
        gain = mean([quickstart[c["seed"]] for c in got], DOMAIN) - zero_shot[DOMAIN]
        kept = (mean(got, DOMAIN) - zero_shot[DOMAIN]) / gain if gain else None
        drops = {m: round(mean(got, m) - zero_shot[m], 4) for m in GENERAL if m in zero_shot}
        out[row] = {
            "seeds": [c["seed"] for c in got],
            "domain_gain_kept": round(kept, 3) if kept is not None else None,
            "general_change": drops,
            "meets_goal": kept is not None and kept >= 0.9 and all(d >= -0.005 for d in drops.values()),
        }
    return {"goal": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="quickstart,mix,domain,ict,wise,l2sp")
    quality_args(parser)
    parser.add_argument("--steps", type=int, default=84, help="the ict row's optimizer steps (the quickstart's)")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    spec = rows_spec(args, rows)
    resume_from = dict(RESUME_FROM)
    for row in rows:  # wise@A, domain@A: the same cells at another interpolation (the WiSE curve, per seed)
        base, _, alpha = row.partition("@")
        if alpha and base in RESUME_FROM:
            spec[row] = [o for o in spec[base] if not o.startswith("anchor.interpolation=")]
            spec[row].append(f"anchor.interpolation={float(alpha)}")
            resume_from[row] = RESUME_FROM[base]
    if unknown := set(rows) - set(spec):
        raise SystemExit(f"unknown rows {sorted(unknown)}: use {', '.join(spec)}")
    common = quality_common(args)
    seed_table(
        args.name,
        spec,
        rows,
        seeds,
        common=common,
        metrics=METRICS,
        work=work,
        fresh=args.fresh,
        extra=goal,
        resume_from=resume_from,
    )


if __name__ == "__main__":
    main()
