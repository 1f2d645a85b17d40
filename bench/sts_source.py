"""Why the STS-B mixture does not guard STS-B (issue 24, item 3; docs/domain.md): domain_forgetting's `mix` row
trains SciFact (InfoNCE) and STS-B train (CoSENT) 3 : 1 by global batches at the quickstart's lr (1e-4), and its
STS-B test Spearman changed by +0.6 / -0.8 / -3.6 points over seeds 42 / 43 / 44. This script separates the two
suspects: the STS-B source on its own, and how many of the mixture's 84 global batches each seed gave it.

    python bench/sts_source.py                                     # rows cosent@1e-4,cosent@2e-5 x seeds 42-44
    python bench/sts_source.py --rows cosent@1e-4 --seeds 44 --sts-steps 29

Rows:
- cosent@LR: all-MiniLM-L6-v2 trained on the STS-B train shards alone (CoSENT, batch 32) for `--sts-steps`
  optimizer steps (default 21: the mixture's expected share, 84 / 4) at optim.lr=LR, everything else the
  quickstart's (warm-up, clipping at 1.0, AdamW); evaluated on STS-B test only (zero-shot: the `before` evaluation).

`schedule` in the json: for each seed, the STS-B global batches among the mixture's first 84 (and the last 10), drawn
by the training stream itself (embedscale.data.stream.MixtureStream over the same shards, weights and seed), next to
the mix cell's STS-B test Spearman from bench/results/domain_forgetting.json when it holds that seed. `grad_norms`:
each cell's logged pre-clipping gradient norms (train/grad_norm in its logs/metrics.csv, every 10th step; the
quickstart clips at 1.0). Cells are resumable (bench/common.py seed_table) and share domain_forgetting's work
directory (its STS-B shards).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MIXTURE, RESULTS, cell_dir, make_mixture_shards, quality_args, quality_common, seed_table  # noqa: E402

NAME = "sts_source"
METRICS = ("stsb/spearman",)
MIX_STEPS = 84  # domain_forgetting's budget: 3 epochs of 28 global batches


def schedule(args, seeds: list[int]) -> list[dict]:
    """Per seed: the mixture's STS-B global batches among its first MIX_STEPS (the training stream's own draw)."""
    from embedscale.config import DataConfig, DataFormat, SourceConfig
    from embedscale.data.datamodule import open_sources
    from embedscale.data.stream import MixtureStream

    work = Path(args.work)
    sources = [SourceConfig(path=str(work / "shards" / name), **spec) for name, spec in MIXTURE.items()]
    cfg = DataConfig(format=DataFormat.shards, sources=sources)
    sources = open_sources(cfg, work)
    sts = [s.name for s in sources].index("stsb")
    mixed = RESULTS / "domain_forgetting.json"
    mix_cells = json.loads(mixed.read_text())["cells"] if mixed.exists() and args.mix_results else []
    out = []
    for seed in seeds:
        stream = MixtureStream(sources, global_batch_size=32, seed=seed)
        picks = [stream.source_of(step) == sts for step in range(MIX_STEPS)]
        mix = [c for c in mix_cells if c["row"] == "mix" and c["seed"] == seed]
        out.append(
            {
                "seed": seed,
                "stsb_steps": sum(picks),
                "stsb_steps_last_10": sum(picks[-10:]),
                "mix_stsb/spearman": mix[0]["stsb/spearman"] if mix else None,
            }
        )
    return out


def grad_norms(run_dir: Path) -> list[float]:
    """The pre-clipping gradient norms a run logged (its CSV log's train/grad_norm)."""
    import csv

    log = run_dir / "logs" / "metrics.csv"
    if not log.exists():
        return []
    with log.open() as f:
        return [round(float(r["train/grad_norm"]), 2) for r in csv.DictReader(f) if r.get("train/grad_norm")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="cosent@1e-4,cosent@2e-5")
    quality_args(parser)
    parser.add_argument("--sts-steps", type=int, default=MIX_STEPS // 4, help="optimizer steps of a cosent row")
    parser.add_argument(
        "--no-mix-results",
        dest="mix_results",
        action="store_false",
        help="leave the committed domain_forgetting mix cells out of `schedule` (smoke runs)",
    )
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    make_mixture_shards(work, args.data_root, args.scifact, args.sts_train)
    spec = {}
    for row in rows:
        base, _, lr = row.partition("@")
        if base != "cosent" or not lr:
            raise SystemExit(f"unknown row {row!r}: use cosent@LR (e.g. cosent@1e-4)")
        spec[row] = [
            "data.format=shards",
            f"data.sources=[{{path: {work / 'shards' / 'stsb'}, loss: cosent}}]",
            f"data.steps_per_epoch={args.sts_steps}",
            f"trainer.max_steps={args.sts_steps}",
            f"optim.lr={float(lr)}",
        ]
    common = quality_common(args) + ["eval.beir=[]", "eval.pairs=[]"]  # STS-B test alone
    plan = schedule(args, seeds)
    for line in plan:
        print(f"mixture seed {line['seed']}: {line}", flush=True)
    seed_table(
        args.name,
        spec,
        rows,
        seeds,
        common=common,
        metrics=METRICS,
        work=work,
        fresh=args.fresh,
        extra=lambda cells, zero_shot: {
            "schedule": plan,
            "grad_norms": {
                f"{c['row']} seed {c['seed']}": grad_norms(
                    cell_dir(work, [*common, *spec[c["row"]], f"seed={c['seed']}"])
                )
                for c in cells
                if c["row"] in spec
            },
        },
    )


if __name__ == "__main__":
    main()
