"""Job `embedscale shard`: inputs (JSONL, BEIR, TSV/CSV, HF datasets) -> WebDataset tar shards + manifest.

    embedscale shard shard.inputs=[medquad/pairs.jsonl.gz] shard.name=medquad
    embedscale shard shard.format=beir shard.inputs=[scifact] shard.split=train shard.output=shards/scifact

Each input is converted into its own series of shards (`<name>-<input index>-<shard index>.tar`); the manifest
lists them in input order, with counts, the schema, every input's size and sha256, the parameters, and each
shard's sha256 (embedscale/data/manifest.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from embedscale.config import ShardJobConfig
from embedscale.jobs.launch import hydra_job


def run(cfg: ShardJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.data.manifest import default_name, fresh_output, shard_inputs
    from embedscale.data.records import resolve_data_root, resolve_path

    c = cfg.shard
    if not c.inputs:
        raise ValueError("shard.inputs is empty: pass e.g. 'shard.inputs=[medquad/pairs.jsonl.gz]'")
    needs_root = any(not Path(p).expanduser().is_absolute() for p in c.inputs)
    root = resolve_data_root(cfg.data_root) if needs_root else Path("/")
    inputs = [resolve_path(p, root) for p in c.inputs]
    for path in inputs:
        if not path.exists():
            raise ValueError(f"shard.inputs: {path} does not exist (data root {root}); fix the path or data_root")
    name = c.name or default_name(inputs[0])
    out = fresh_output(Path(c.output or Path("shards") / name), overwrite=c.overwrite, job="shard")
    start = time.perf_counter()
    manifest = shard_inputs(c, inputs, out, name=name)
    print(
        f"{name}: {manifest['num_samples']} samples from {len(inputs)} input(s) -> {manifest['num_shards']} shard(s), "
        f"{manifest['total_bytes'] / 2**20:.1f} MiB in {out} ({time.perf_counter() - start:.1f} s)"
    )
    return manifest


main = hydra_job("shard", run)

if __name__ == "__main__":
    main()
