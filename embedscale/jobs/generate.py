"""Job `embedscale generate`: corpus -> LM queries -> clean, dedup -> round-trip filter -> training shards.

    embedscale generate generate.lm=google/flan-t5-base                      # SciFact corpus, 3 queries/document
    embedscale generate generate.lm=Qwen/Qwen2.5-0.5B-Instruct generate.task=claim generate.max_documents=1000
    embedscale generate generate.lm=PATH generate.filter_top_k=0 generate.output=shards/unfiltered
    torchrun --standalone --nproc_per_node=4 -m embedscale.jobs.generate generate.lm=PATH   # documents over 4 ranks
    embedscale train data.format=shards data.path=shards/scifact-generated

The run and its manifest: embedscale/retrieval/generate.py; the LM side: retrieval/lm.py; docs/generate.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedscale.config import GenerateJobConfig
from embedscale.jobs.launch import hydra_job


def run(cfg: GenerateJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.retrieval.generate import generate

    manifest = generate(cfg)
    if not manifest:
        return manifest
    g = manifest["generation"]
    n = g["counts"]
    print(
        f"{manifest['name']}: {n['kept']} pairs kept of {n['generated']} queries generated for {n['documents']} "
        f"documents ({g['lm']['kind']} {g['lm']['name_or_path']}; {n['empty']} empty, {n['duplicates_in_document']} "
        f"+ {n['duplicates_across_documents']} duplicates, {n['filtered_out']} filtered out = filter rate "
        f"{n['filter_rate']:.3f}) -> {manifest['output']} in {g['seconds']['total_s']:.1f} s"
    )
    return manifest


main = hydra_job("generate", run)

if __name__ == "__main__":
    main()
