"""Verifying a sharded dataset against its manifest when a source opens (data.verify), cached so a large dataset
is hashed once, not every run.

    full   every tar and index sidecar: size and sha256 against the manifest (the default)
    size   sizes only (a truncated or replaced file of another size; a same-size edit passes)
    off    nothing beyond the manifest's own checks (file names confined to the dataset directory)

A file verified in full is remembered in a small JSON cache (`<cache dir>/verified/<dataset key>-r<rank>.json`, the
cache dir is $EMBEDSCALE_CACHE or ~/.cache/embedscale) under its size and modification time: an unchanged file is
not read again; a touched or rewritten one is hashed again. Under several ranks (the process group is up when the
training data opens) the hashing is shared: rank r hashes files r, r + world, ... and checks every size; a mismatch
stops the rank that finds it, which ends the job. Each rank keeps its own cache file, and every rank reads all of
them, so a dataset verified once is not hashed again by any rank that sees the same cache dir. Remote datasets
(fsspec URLs) are cached under their size and ETag or modification time when the filesystem reports one, else hashed
every time.

Manifests written before the index sidecars carried a checksum (no `index_sha256`) are verified for what they
record; their sidecars are still checked for shape and offsets when read (data/shards.py), and a warning says once
that re-sharding adds the checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from embedscale.config import Verify, parse_choice
from embedscale.data.shards import ShardedDataset, is_url, sha256_file
from embedscale.runtime import default_cache_dir

log = logging.getLogger(__name__)


def _stat(ds: ShardedDataset, name: str) -> tuple[int, str]:
    """(size, a change stamp: mtime in ns, or a remote ETag) of a dataset file."""
    location = ds.location(name)
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(location))
        info = fs.info(path)
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        return int(info.get("size", -1)), str(stamp)
    stat = os.stat(location)
    return stat.st_size, str(stat.st_mtime_ns)


def _expected(ds: ShardedDataset) -> list[tuple[str, int | None, str | None]]:
    """(file, size, sha256) the manifest records for every tar and index sidecar (None: not recorded)."""
    files = []
    for shard in ds.shards:
        files.append((shard["file"], shard.get("bytes"), shard.get("sha256")))
        index = shard["file"].removesuffix(".tar") + ".idx.npy"
        files.append((index, shard.get("index_bytes"), shard.get("index_sha256")))
    return files


def verify_dataset(ds: ShardedDataset, *, mode: str = "full") -> dict:
    """Check the dataset's files against its manifest (see the module docstring); raise ValueError naming the file
    and the fix on the first mismatch. Returns {checked, hashed, cached, seconds}."""
    mode = parse_choice(Verify, mode, "data.verify")
    from embedscale.distributed import world

    start = time.perf_counter()
    rank, size_of_world = world()
    key = hashlib.sha256(str(ds.root if is_url(ds.root) else Path(ds.root).resolve()).encode()).hexdigest()[:20]
    cache_dir = default_cache_dir() / "verified"
    cache_path = cache_dir / f"{key}-r{rank}.json"
    cache = _read_caches(cache_dir, key) if mode == "full" else {}
    mine: dict = {}
    hashed = cached = 0
    unrecorded = 0
    for i, (name, size, digest) in enumerate(_expected(ds)):
        where = ds.location(name)
        try:
            actual_size, stamp = _stat(ds, name)
        except (OSError, FileNotFoundError) as err:
            raise ValueError(f"{where} is missing: restore it or re-run `embedscale shard` ({err})") from err
        if size is None:
            unrecorded += 1
            continue
        if actual_size != int(size):
            raise ValueError(
                f"{where} has {actual_size} bytes, the manifest says {size}: the file was truncated or replaced; "
                "restore it or re-run `embedscale shard` (data.verify=off skips this check)"
            )
        if mode != "full" or digest is None or i % size_of_world != rank:
            continue
        if cache.get(name) == [actual_size, stamp, digest] and stamp:
            cached += 1
            mine[name] = cache[name]
            continue
        if sha256_file(where) != digest:
            raise ValueError(
                f"{where}: sha256 differs from the manifest: the file was modified after `embedscale shard` wrote it; "
                "restore it or re-shard (data.verify=size checks sizes only, data.verify=off nothing)"
            )
        hashed += 1
        mine[name] = [actual_size, stamp, digest]
    if mode == "full" and hashed:
        _write_cache(cache_path, mine)
    if unrecorded:
        log.warning(
            "%s: the manifest records no checksum for %d index sidecar(s) (written before they had one): their shape "
            "and offsets are checked when read; re-run `embedscale shard` to verify them in full",
            ds.root,
            unrecorded,
        )
    seconds = time.perf_counter() - start
    log.info(
        "verified %s (data.verify=%s, rank %d of %d): %d file(s) hashed, %d unchanged since verified, %.2f s",
        ds.root,
        mode,
        rank,
        size_of_world,
        hashed,
        cached,
        seconds,
    )
    return {"checked": len(_expected(ds)), "hashed": hashed, "cached": cached, "seconds": seconds}


def _read_caches(cache_dir: Path, key: str) -> dict:
    """Every rank's verified files of a dataset, merged (a file whose entry is unreadable is hashed again)."""
    merged: dict = {}
    for path in sorted(cache_dir.glob(f"{key}-r*.json")):
        try:
            merged.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return merged


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError as err:  # a read-only cache costs a re-hash next time, not the run
        log.warning("could not record the verification in %s (%s): the files will be hashed again", path, err)
