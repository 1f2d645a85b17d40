"""Converters: JSONL, BEIR, TSV/CSV and local HF `datasets` -> `PairExample`s for the shard writer
(each example's `key` holds where it was read: file:line or query-id:doc-id).

Every converter validates as it reads and raises `ValueError` naming the file, the line (or row)
and the config key to change: a missing or empty query/positive field, invalid UTF-8, invalid JSON.
Nothing is skipped silently; a converter never drops a record.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from embedscale.data.batch import PairExample
from embedscale.data.readers import iter_beir_pairs


def _open(path: Path):
    if not path.exists():
        raise ValueError(f"{path} does not exist: check shard.inputs and shard.data_root")
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    return raw


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open(path) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: invalid UTF-8 ({err.reason}); re-encode the file as UTF-8"
                ) from err


def _negatives(value, where: str, field: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{where}: field {field!r} must hold non-empty strings (shard.negatives_field)")
    return values


def _record(row: dict, where: str, *, query_field: str, positive_field: str, negatives_field: str) -> PairExample:
    for name, key in ((query_field, "shard.query_field"), (positive_field, "shard.positive_field")):
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field {name!r} is missing or empty; set {key} to one of {sorted(row)}")
    return PairExample(
        row[query_field], row[positive_field], _negatives(row.get(negatives_field), where, negatives_field), where
    )


def jsonl_records(path: Path, *, query_field: str, positive_field: str, negatives_field: str) -> Iterator[PairExample]:
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path.name}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg}); fix or remove that line") from err
        yield _record(
            row, where, query_field=query_field, positive_field=positive_field, negatives_field=negatives_field
        )


def delimited_records(
    path: Path, *, delimiter: str, query_field: str, positive_field: str, negatives_field: str
) -> Iterator[PairExample]:
    """TSV/CSV with a header row; every column whose name starts with `negatives_field` is a negative
    (`negative`, `negative_2`, ... in header order)."""
    lines = (line for _, line in _lines(path))
    reader = csv.reader(lines, delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise ValueError(f"{path}: empty file; expected a header row naming the columns")
    neg_cols = [i for i, name in enumerate(header) if name.startswith(negatives_field)]
    for row_no, values in enumerate(reader, start=2):
        if len(values) != len(header):
            raise ValueError(f"{path}:{row_no}: {len(values)} columns, the header has {len(header)}")
        row = dict(zip(header, values, strict=True))
        where = f"{path.name}:{row_no}"
        rec = _record(row, where, query_field=query_field, positive_field=positive_field, negatives_field="\0")
        rec.negatives = _negatives([values[i] for i in neg_cols if values[i]], where, negatives_field)
        yield rec


def beir_records(dataset_dir: Path, split: str) -> Iterator[PairExample]:
    """One record per relevant qrel (relevance > 0): (query text, title + text of the document)."""
    for qid, did, query, doc in iter_beir_pairs(dataset_dir, split):
        yield PairExample(query, doc, [], f"{qid}:{did}")


def hf_records(path: Path, *, split: str, query_field: str, positive_field: str, negatives_field: str):
    """A dataset saved with `datasets.Dataset.save_to_disk` (or a DatasetDict: `split` picks one)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("shard.format=hf needs the `datasets` package: pip install datasets") from err
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; set shard.split to one of {sorted(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield _record(
            row,
            f"{path.name}:{i}",
            query_field=query_field,
            positive_field=positive_field,
            negatives_field=negatives_field,
        )


def records(
    fmt: str, path: Path, *, split: str, query_field: str, positive_field: str, negatives_field: str
) -> Iterator[PairExample]:
    """The converter of a format name (jsonl, tsv, csv, beir, hf) applied to one input."""
    fields = dict(query_field=query_field, positive_field=positive_field, negatives_field=negatives_field)
    if fmt == "jsonl":
        return jsonl_records(path, **fields)
    if fmt in ("tsv", "csv"):
        return delimited_records(path, delimiter="\t" if fmt == "tsv" else ",", **fields)
    if fmt == "beir":
        return beir_records(path, split)
    if fmt == "hf":
        return hf_records(path, split=split, **fields)
    raise ValueError(f"unknown input format {fmt!r}: use jsonl, tsv, csv, beir or hf")
