"""embedscale's retrieval metrics vs pytrec_eval (trec_eval's C code) on the ranked runs of a real run.

    python bench/metrics_vs_pytrec.py runs/train/<timestamp>        # every runs/*.json of that run

Each run file holds the top-100 documents per SciFact test query written by the evaluator; the
qrels come from the data root. Prints, per run file, every metric from both and the largest
absolute difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    from test_metrics import K, pytrec_metrics

    from embedscale.data.records import read_qrels, resolve_data_root
    from embedscale.retrieval.metrics import retrieval_metrics

    root = resolve_data_root(args.data_root)
    rows = []
    for path in sorted((Path(args.run_dir) / "runs").glob("*.json")):
        dataset = path.stem.rsplit("-", 1)[0]
        qrels = read_qrels(root / dataset, args.split)
        run = json.loads(path.read_text())
        ours, ref = retrieval_metrics(run, qrels, K), pytrec_metrics(run, qrels)
        worst = max(abs(ours[k] - ref[k]) for k in ref)
        rows.append(
            {
                "run": path.name,
                "queries": len(run),
                "ndcg@10 ours": ours["ndcg@10"],
                "ndcg@10 pytrec": ref["ndcg@10"],
                "recall@100 ours": ours["recall@100"],
                "recall@100 pytrec": ref["recall@100"],
                "metrics compared": len(ref),
                "max abs diff": f"{worst:.1e}",
            }
        )
    report("metrics_vs_pytrec", rows)
    if any(float(r["max abs diff"]) > 1e-6 for r in rows):
        raise SystemExit("difference above 1e-6")


if __name__ == "__main__":
    main()
