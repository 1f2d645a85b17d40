"""Job `embedscale shard`: inputs (JSONL, BEIR, TSV/CSV, HF datasets) -> WebDataset tar shards + manifest.

    embedscale shard shard.inputs=[medquad/pairs.jsonl.gz] shard.name=medquad
    embedscale shard shard.format=beir shard.inputs=[scifact] shard.split=train shard.output=shards/scifact

Each input is converted by its own process (`shard.workers`) into its own series of shards
(`<name>-<input index>-<shard index>.tar`); the manifest lists them in input order, with counts,
the schema, every input's size and sha256, the parameters, and each shard's sha256.
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from embedscale.cli import hydra_job
from embedscale.config import ShardConfig, ShardJobConfig


def _records(cfg: ShardConfig, path: Path):
    from embedscale.data.convert import records

    fields = dict(query_field=cfg.query_field, positive_field=cfg.positive_field, negatives_field=cfg.negatives_field)
    return records(cfg.format.value, path, split=cfg.split, **fields)


def input_digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of a file; for a directory, over its files' relative paths and contents."""
    from embedscale.data.shards import sha256_file

    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    h, size = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size += f.stat().st_size
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return size, h.hexdigest()


def _convert(job: tuple[ShardConfig, int, str, str, str]) -> dict:
    from embedscale.data.shards import write_records

    cfg, index, path, out_dir, name = job
    start = time.perf_counter()
    limits = dict(max_bytes=int(cfg.target_mb * 2**20), max_samples=cfg.samples_per_shard)
    result = write_records(_records(cfg, Path(path)), Path(out_dir), name=name, file_index=index, **limits)
    size, digest = input_digest(Path(path))
    result["source"] = {"path": path, "bytes": size, "sha256": digest, "samples": result["samples"]}
    result["seconds"] = time.perf_counter() - start
    return result


def default_name(path: Path) -> str:
    stem = path.name
    for suffix in (".gz", ".jsonl", ".json", ".tsv", ".csv"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "data"


def run(cfg: ShardJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    from embedscale.data.readers import resolve_data_root, resolve_path
    from embedscale.data.shards import fresh_output, new_manifest, write_manifest

    c = cfg.shard
    if not c.inputs:
        raise ValueError("shard.inputs is empty: pass e.g. 'shard.inputs=[medquad/pairs.jsonl.gz]'")
    needs_root = any(not Path(p).expanduser().is_absolute() for p in c.inputs)
    root = resolve_data_root(c.data_root) if needs_root else Path("/")
    inputs = [resolve_path(p, root) for p in c.inputs]
    for path in inputs:
        if not path.exists():
            raise ValueError(f"shard.inputs: {path} does not exist (data root {root}); fix the path or shard.data_root")
    name = c.name or default_name(inputs[0])
    out = fresh_output(Path(c.output or Path("shards") / name), overwrite=c.overwrite, job="shard")
    start = time.perf_counter()
    jobs = [(c, i, str(p), str(out), name) for i, p in enumerate(inputs)]
    if c.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(c.workers, len(jobs))) as pool:
            results = list(pool.map(_convert, jobs))
    else:
        results = [_convert(job) for job in jobs]
    shards = [s for r in results for s in r["shards"]]
    negatives = [r["negatives"] for r in results if r["samples"]]
    k_range = (min(n[0] for n in negatives), max(n[1] for n in negatives)) if negatives else (0, 0)
    total = sum(r["samples"] for r in results)
    manifest = new_manifest(name, shards, samples=total, negatives=k_range, created_by="shard")
    manifest["sources"] = [r["source"] for r in results]
    manifest["params"] = {
        "format": c.format.value,
        "split": c.split,
        "query_field": c.query_field,
        "positive_field": c.positive_field,
        "negatives_field": c.negatives_field,
        "target_mb": c.target_mb,
        "samples_per_shard": c.samples_per_shard,
    }
    write_manifest(out, manifest)
    seconds = time.perf_counter() - start
    print(
        f"{name}: {manifest['num_samples']} samples from {len(inputs)} input(s) -> {len(shards)} shard(s), "
        f"{manifest['total_bytes'] / 2**20:.1f} MiB in {out} ({seconds:.1f} s)"
    )
    return manifest


main = hydra_job("shard", ShardJobConfig, run)

if __name__ == "__main__":
    main()
