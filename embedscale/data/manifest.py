"""A sharded dataset's manifest, and `embedscale shard`'s conversion of inputs into shards.

The manifest (`manifest.json`) is written last and atomically, so that it exists only for a complete dataset:
name, schema, counts, every input's size and sha256, the parameters, and per shard its file, sample count,
size, sha256 and first/last key (data/shards.py writes the shards and reads them back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from embedscale.config import ShardConfig
from embedscale.data.records import Fields, pairs
from embedscale.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    OPTIONAL_FIELDS,
    SAMPLE_FIELDS,
    sha256_file,
    write_records,
)

log = logging.getLogger(__name__)


def new_manifest(
    name: str, shards: list[dict], *, samples: int, negatives: tuple[int, int], created_by: str, extra_fields=None
) -> dict:
    """The manifest fields every sharded dataset has (`embedscale shard` and `embedscale mine` add their own)."""
    from embedscale import __version__

    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created_by": f"embedscale {__version__} {created_by}",
        "num_samples": samples,
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "schema": {
            "member": "<key>.json",
            "fields": {**SAMPLE_FIELDS, **(extra_fields or {})},
            "negatives_per_sample": list(negatives),
        },
        "shards": shards,
    }


def fresh_output(out: Path, *, overwrite: bool, job: str) -> Path:
    """An output directory for a new dataset. An existing dataset there (a manifest.json) is an error unless
    `<job>.overwrite`; then only the files its manifest lists (tars, index sidecars, the manifest) are removed --
    never anything else in the directory -- and only when the manifest is one `embedscale` wrote."""
    out = out.resolve()
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        if not overwrite:
            raise ValueError(f"{manifest_path} exists: choose another {job}.output or set {job}.overwrite=true")
        for name in _owned_files(manifest_path, job):
            (out / name).unlink(missing_ok=True)
        manifest_path.unlink()
        others = sorted(p.name for p in out.iterdir())
        if others:
            log.info(
                "%s.overwrite: kept %d file(s) the old manifest did not list, e.g. %s", job, len(others), others[0]
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _owned_files(manifest_path: Path, job: str) -> list[str]:
    """The files an embedscale manifest lists (plain names inside its directory); ValueError for any other file."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{manifest_path} is not a readable manifest: {job}.overwrite refuses to touch the directory"
        ) from err
    ours = (
        isinstance(manifest, dict)
        and str(manifest.get("created_by", "")).startswith("embedscale")
        and isinstance(manifest.get("shards"), list)
    )
    names = [str(s.get("file", "")) for s in manifest.get("shards", [])] if ours else []
    if not ours or any(not n or "/" in n or "\\" in n or n in (".", "..") for n in names):
        raise ValueError(
            f"{manifest_path} was not written by embedscale (no created_by/shards it recognises): {job}.overwrite "
            "replaces only embedscale datasets; choose another output directory"
        )
    return [f for n in names for f in (n, n.removesuffix(".tar") + ".idx.npy")]


def write_manifest(out: Path, manifest: dict) -> None:
    """Written last and atomically: a manifest exists only for a complete dataset."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.rename(out / MANIFEST)


def input_digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of a file; for a directory, over its files' relative paths and contents."""
    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    h, size = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size += f.stat().st_size
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return size, h.hexdigest()


def default_name(path: Path) -> str:
    """A dataset name from an input's file or directory name (shard.name, mine.name default)."""
    stem = path.name
    for suffix in (".gz", ".jsonl", ".json", ".tsv", ".csv"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "data"


def _convert(job: tuple[ShardConfig, int, str, str, str]) -> dict:
    """One input -> its series of shards (run in a worker process when shard.workers > 1)."""
    cfg, index, path, out_dir, name = job
    start = time.perf_counter()
    limits = dict(max_bytes=int(cfg.target_mb * 2**20), max_samples=cfg.samples_per_shard)
    fields = Fields(
        cfg.query_field,
        cfg.positive_field,
        cfg.negatives_field,
        section="shard",
        score=cfg.score_field,
        embeddings=tuple(cfg.embedding_fields),
    )
    records = pairs(str(cfg.format), Path(path), fields, split=cfg.split)
    result = write_records(records, Path(out_dir), name=name, file_index=index, **limits)
    if not result["samples"]:
        raise ValueError(
            f"shard.inputs: {path} holds no records (format {cfg.format}, split {cfg.split!r}): an empty dataset is "
            "never written; check the input and shard.format/shard.split"
        )
    size, digest = input_digest(Path(path))
    result["source"] = {"path": path, "bytes": size, "sha256": digest, "samples": result["samples"]}
    result["seconds"] = time.perf_counter() - start
    return result


def shard_inputs(cfg: ShardConfig, inputs: list[Path], out: Path, *, name: str) -> dict:
    """Convert `inputs` into shards under `out` (each input by its own process with shard.workers > 1) and write
    the manifest; returns it."""
    jobs = [(cfg, i, str(p), str(out), name) for i, p in enumerate(inputs)]
    if cfg.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(cfg.workers, len(jobs))) as pool:
            results = list(pool.map(_convert, jobs))
    else:
        results = [_convert(job) for job in jobs]
    shards = [s for r in results for s in r["shards"]]
    negatives = [r["negatives"] for r in results if r["samples"]]
    k_range = (min(n[0] for n in negatives), max(n[1] for n in negatives)) if negatives else (0, 0)
    total = sum(r["samples"] for r in results)
    optional = (["score"] if cfg.score_field or str(cfg.format) == "sts" else []) + (
        ["query_embedding", "positive_embedding"] if cfg.embedding_fields else []
    )
    manifest = new_manifest(
        name,
        shards,
        samples=total,
        negatives=k_range,
        created_by="shard",
        extra_fields={f: OPTIONAL_FIELDS[f] for f in optional},
    )
    manifest["sources"] = [r["source"] for r in results]
    manifest["params"] = {
        "format": str(cfg.format),
        "split": cfg.split,
        "query_field": cfg.query_field,
        "positive_field": cfg.positive_field,
        "negatives_field": cfg.negatives_field,
        "score_field": cfg.score_field,
        "embedding_fields": list(cfg.embedding_fields),
        "target_mb": cfg.target_mb,
        "samples_per_shard": cfg.samples_per_shard,
    }
    write_manifest(out, manifest)
    return manifest
