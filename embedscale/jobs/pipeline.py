"""Job `embedscale pipeline`: run stages (train, mine, evaluate, shard, reranker) in order, each from the last.

    embedscale pipeline                                  # recipe=iterative: train -> mine with it -> train
    embedscale pipeline recipe=iterative pipeline.output=runs/iter1
    embedscale pipeline pipeline.only=[round2]           # re-run one stage (earlier ones must be done)

A stage is a job name and Hydra overrides, composed exactly as `embedscale <job> <overrides>` would be; every
stage directory gets lineage.json (embedscale/lineage.py; docs/recipes.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedscale.config import PipelineJobConfig
from embedscale.jobs.launch import hydra_job


def print_metrics_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = sorted({k for row in rows for k in row if k != "stage"})
    table = Table(title=title)
    table.add_column("stage")
    for c in columns:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(row["stage"], *(f"{row[c]:.4f}" if c in row else "-" for c in columns))
    Console().print(table)


def run(cfg: PipelineJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.lineage import run_stages

    p = cfg.pipeline
    result = run_stages(p, Path(p.output or run_dir or "runs/pipeline").resolve())
    if result.pop("lead") and result["metrics"]:
        print_metrics_table(result["metrics"], f"embedscale pipeline {p.name}: metrics after each stage")
    print(f"[pipeline] {p.name}: {len(result['stages'])} stage(s) in {result['output']}")
    return result


main = hydra_job("pipeline", run)

if __name__ == "__main__":
    main()
