"""Job `embedscale mine`: load pairs + corpus -> candidates (dense/BM25/hybrid) -> filters -> shards.

    embedscale mine                                   # SciFact train, all-MiniLM-L6-v2, dense, 7 negatives
    embedscale mine mine.method=bm25 mine.output=shards/scifact-bm25
    embedscale mine model.name_or_path=runs/train/X/model mine.relative_margin=0.05 mine.window_start=3
    torchrun --nproc_per_node=4 -m embedscale.jobs.mine ...  # corpus and queries encoded over 4 ranks

The mining run and its manifest: embedscale/retrieval/miner.py; the rules: retrieval/mining.py; docs/mining.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedscale.config import MineJobConfig
from embedscale.jobs.launch import hydra_job


def run(cfg: MineJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.retrieval.miner import mine

    manifest = mine(cfg)
    if not manifest:
        return manifest
    m = manifest["mining"]["counts"]
    print(
        f"{manifest['name']}: {m['samples']} samples, {m['negatives_kept']} negatives ({cfg.mine.method}; "
        f"{m['taken_beyond_window']} past the window; filtered in window: "
        + ", ".join(f"{r} {n}" for r, n in m["filtered_in_window"].items() if n)
        + f") -> {manifest['output']} in {manifest['mining']['seconds']['total_s']:.1f} s"
    )
    return manifest


main = hydra_job("mine", run)

if __name__ == "__main__":
    main()
