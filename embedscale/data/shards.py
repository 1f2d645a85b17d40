"""WebDataset tar shards of training samples: writer, manifest, per-shard index, random-access reader.

Layout of a sharded dataset directory:

    <out>/manifest.json            name, schema, counts, sources (path, size, sha256), parameters,
                                   and per shard: file, samples, bytes, sha256, first/last key
    <out>/<name>-000000.tar        plain (uncompressed) tar; one member `<key>.json` per sample
    <out>/<name>-000000.idx.npy    (samples, 2) int64: byte offset and size of each member's data

The tars are ordinary WebDataset shards (`webdataset.WebDataset(urls)` reads them; a sample's key
is the member name before the first dot), so any WebDataset tooling works on them. The `.idx.npy`
sidecar makes every sample addressable by (shard, position) without scanning the tar: the exact,
rank-independent streaming order (issue 4) is built on it.

A sample's JSON holds `key`, `query`, `positive`, `negatives` (a list, possibly empty), `source`
(the dataset name) and `origin` (where it came from: `file:line` or `query-id:doc-id`). Keys are
`<name>-<file index>-<position in file>`, stable for the same inputs in the same order.
Tars are written reproducibly (fixed mtime, owner and mode), so the same input gives the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedscale.data.batch import PairExample

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """sha256 of a local file or an fsspec URL."""
    h = hashlib.sha256()
    with open_binary(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


class ShardWriter:
    """Writes records into `<prefix>-NNNNNN.tar` files of at most `max_bytes` (and `max_samples`) each."""

    def __init__(self, out_dir: Path, prefix: str, *, max_bytes: int, max_samples: int = 0) -> None:
        if max_bytes <= 0 and max_samples <= 0:
            raise ValueError("a shard needs a size limit: set shard.target_mb > 0 or shard.samples_per_shard > 0")
        self.out_dir, self.prefix = out_dir, prefix
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._index: list[tuple[int, int]] = []
        self._keys: list[str] = []

    def _open(self) -> None:
        path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self._index, self._keys = [], []

    def _close(self) -> None:
        if self._tar is None:
            return
        path = Path(self._tar.name)
        self._tar.close()
        index = path.with_suffix(".idx.npy")
        np.save(index, np.asarray(self._index, dtype=np.int64).reshape(-1, 2))
        self.shards.append(
            {
                "file": path.name,
                "samples": len(self._index),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
                "index_bytes": index.stat().st_size,
                "index_sha256": sha256_file(index),
                "first_key": self._keys[0],
                "last_key": self._keys[-1],
            }
        )
        self._tar = None

    def write(self, key: str, sample: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys on them)")
        data = json.dumps(sample, ensure_ascii=False).encode("utf-8")
        if self._tar is not None:
            full_samples = self.max_samples and len(self._index) >= self.max_samples
            size_after = self._tar.offset + 512 + -(-len(data) // 512) * 512 + tarfile.RECORDSIZE  # + end blocks
            full_bytes = self.max_bytes and size_after > self.max_bytes
            if full_samples or full_bytes:
                self._close()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        header_at = self._tar.offset
        self._tar.addfile(_tarinfo(f"{key}.json", len(data)), io.BytesIO(data))
        self._index.append((header_at + 512, len(data)))  # USTAR: one 512-byte header block per member
        self._keys.append(key)

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def write_records(records: Iterable[PairExample], out_dir: Path, *, name: str, file_index: int, **limits) -> dict:
    """Shard one input's records; returns {shards, samples, negatives (min, max)} for the manifest."""
    writer = ShardWriter(out_dir, f"{name}-{file_index:03d}", **limits)
    count, k_min, k_max = 0, None, 0
    for i, rec in enumerate(records):
        key = f"{name}-{file_index:03d}-{i:09d}"
        sample = {
            "key": key,
            "query": rec.query,
            "positive": rec.positive,
            "negatives": list(rec.negatives),
            "source": name,
            "origin": rec.key,  # where the converter read it (file:line, query-id:doc-id)
        }
        if rec.score is not None:
            sample["score"] = rec.score
        if rec.teacher_embeddings is not None:
            sample["query_embedding"], sample["positive_embedding"] = map(list, rec.teacher_embeddings)
        writer.write(key, sample)
        count += 1
        k_min = len(rec.negatives) if k_min is None else min(k_min, len(rec.negatives))
        k_max = max(k_max, len(rec.negatives))
    return {"shards": writer.close(), "samples": count, "negatives": [k_min or 0, k_max]}


SAMPLE_FIELDS = {
    "key": "str",
    "query": "str",
    "positive": "str",
    "negatives": "list[str]",
    "source": "str",
    "origin": "str",
}
OPTIONAL_FIELDS = {  # written when the input has them (shard.score_field / format=sts, shard.embedding_fields)
    "score": "float",
    "query_embedding": "list[float]",
    "positive_embedding": "list[float]",
}


@dataclass
class BadSample:
    """A sample that could not be read: why (the reason counted under data.on_error=skip), where, the fix."""

    reason: str
    where: str
    fix: str

    def message(self, *, skipping: bool = False) -> str:
        """The error text; `skipping`: for the log under data.on_error=skip (no advice to set it)."""
        text = f"{self.where}: {self.reason}: {self.fix}"
        return text if skipping else f"{text} (or set data.on_error=skip to skip and count such samples)"


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def open_binary(location: str | Path):
    """A seekable binary file: a local path, or any fsspec URL (s3://, gs://, https://, memory://, ...)."""
    if str(location).startswith("pipe:"):
        raise ValueError(
            f"{location}: pipe: URLs can only be read front to back, and the exact stream order needs seeks; "
            "use a seekable fsspec URL (s3://, gs://, https:// with range requests) or a local/mounted path"
        )
    if is_url(location):
        import fsspec

        return fsspec.open(str(location), "rb").open()
    return open(location, "rb")


@dataclass
class ShardedDataset:
    """A sharded dataset directory (local or an fsspec URL) opened through its manifest: (shard, position) -> dict."""

    root: Path | str
    manifest: dict
    _index: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def location(self, name: str) -> Path | str:
        return f"{str(self.root).rstrip('/')}/{name}" if is_url(self.root) else Path(self.root) / name

    @classmethod
    def open(cls, root: str | Path, *, verify: str = "full") -> ShardedDataset:
        """Open a dataset through its manifest; `verify` (data.verify): full checks every file's size and sha256
        (cached by size and mtime, data/integrity.py), size only the sizes, off nothing beyond the manifest."""
        root = str(root) if is_url(root) else Path(root)
        ds = cls(root, {})
        path = ds.location(MANIFEST)
        try:
            with open_binary(path) as f:
                manifest = json.loads(f.read())
        except (OSError, FileNotFoundError) as err:
            raise ValueError(f"{path} does not exist: point at a directory written by `embedscale shard`") from err
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
        for shard in manifest.get("shards", []):
            name = str(shard.get("file", ""))
            if not name or "/" in name or "\\" in name or name in (".", "..") or ":" in name:
                raise ValueError(
                    f"{path}: shard file {name!r} is not a plain file name inside the dataset directory; a manifest "
                    "may only name files beside it (re-run `embedscale shard`)"
                )
        ds.manifest = manifest
        if verify != "off":
            from embedscale.data.integrity import verify_dataset

            verify_dataset(ds, mode=verify)
        return ds

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def index(self, shard: int) -> np.ndarray:
        if shard not in self._index:
            path = self.location(self.shards[shard]["file"].removesuffix(".tar") + ".idx.npy")
            try:
                with open_binary(path) as f:
                    index = np.load(io.BytesIO(f.read()), allow_pickle=False)
            except (OSError, FileNotFoundError) as err:
                raise ValueError(f"{path} is missing: re-run `embedscale shard` for {self.root}") from err
            except ValueError as err:
                raise ValueError(
                    f"{path} is not a valid index ({err}): re-run `embedscale shard` for {self.root}"
                ) from err
            meta = self.shards[shard]
            ok = index.ndim == 2 and index.shape == (int(meta["samples"]), 2) and index.dtype == np.int64
            ends = index[:, 0] + index[:, 1] if ok else None
            if (
                ok
                and len(index)
                and (index.min() < 0 or int(ends.max()) > int(meta["bytes"]) or (np.diff(index[:, 0]) <= 0).any())
            ):
                ok = False
            if not ok:
                raise ValueError(
                    f"{path} does not index {meta['file']}: the manifest says {meta['samples']} samples in "
                    f"{meta['bytes']} bytes, the index holds {getattr(index, 'shape', '?')} (or offsets outside the "
                    "tar); the dataset was modified after it was written: restore it or re-run `embedscale shard`"
                )
            self._index[shard] = index
        return self._index[shard]

    def read(self, shard: int, positions: Iterable[int], *, errors: str = "raise") -> Iterator[dict | BadSample]:
        """The samples at `positions` of a shard, in the order given (one open file, sorted seeks).

        errors="raise": a missing, truncated or undecodable sample raises ValueError naming the shard,
        the position and the fix; errors="return": it is returned as a `BadSample` instead."""
        positions = list(positions)
        path = self.location(self.shards[shard]["file"])
        out: dict[int, dict | BadSample] = {}
        try:
            idx = self.index(shard)
            f = open_binary(path)
        except (OSError, ValueError) as err:
            if isinstance(err, ValueError):  # the index does not fit the manifest: its message says what to do
                bad = BadSample("bad index", f"{path}", str(err))
            else:
                bad = BadSample("missing shard", f"{path}", f"{err}; restore the file or re-run `embedscale shard`")
            if errors == "raise":
                raise ValueError(bad.message()) from err
            return (bad for _ in positions)
        with f:
            for pos in sorted(set(positions)):
                offset, size = (int(v) for v in idx[pos])
                f.seek(offset)
                data = f.read(size)
                where = f"{path} sample {pos} (offset {offset})"
                if len(data) != size:
                    out[pos] = BadSample("truncated shard", where, "the tar is truncated; restore it or re-shard")
                else:
                    try:
                        out[pos] = json.loads(data.decode("utf-8"))
                    except UnicodeDecodeError:
                        out[pos] = BadSample("invalid UTF-8", where, "the sample is not UTF-8; re-shard the source")
                    except json.JSONDecodeError:
                        out[pos] = BadSample(
                            "corrupt sample", where, "the sample is not valid JSON; re-shard the source"
                        )
                if errors == "raise" and isinstance(out[pos], BadSample):
                    raise ValueError(out[pos].message())
        return (out[p] for p in positions)

    def verify(self) -> list[str]:
        """Shards whose sha256 does not match the manifest (empty: all intact)."""
        return [s["file"] for s in self.shards if sha256_file(self.location(s["file"])) != s["sha256"]]
