"""The one reader of records on disk: JSONL, TSV/CSV, BEIR (corpus, queries, qrels), STS TSV, unlabelled corpora,
and local HF `datasets` -- for training (in memory), `embedscale shard`, `embedscale mine` and the re-ranker.

One error vocabulary: a bad record raises `RecordError` (a ValueError) that names the file and line (or row),
what is wrong, and the fix -- the config key to change, named in the section that set it (`data.query_field`
for training, `shard.query_field` for `embedscale shard`, ...: `Fields.section`). Gzipped files (`*.gz`) are
read transparently, bytes are decoded line by line so that invalid UTF-8 is reported where it is. Nothing is
dropped silently: a reader never skips a record; callers get counts of what they filtered.

A record's `key` is where it was read (`<file name>:<line>`, or `<query-id>:<doc-id>` for BEIR): the shards'
`origin`, the sample ledger's provenance and, in memory, the key exact resume uses.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from embedscale.data.batch import PairExample

DATA_ENV = "EMBEDSCALE_DATA"


class RecordError(ValueError):
    """A record (or file) a user can fix: `<where>: <problem>; <fix>`."""

    def __init__(self, where: str | Path, problem: str, fix: str = "") -> None:
        super().__init__(f"{where}: {problem}" + (f"; {fix}" if fix else ""))


@dataclass(frozen=True)
class Fields:
    """Where a pair's texts are in a record, and the config section whose keys name them (for messages)."""

    query: str = "query"
    positive: str = "positive"
    negatives: str = "negatives"
    section: str = "data"
    score: str | None = None
    """The field holding a pair's gold score (a number), or None."""
    embeddings: tuple[str, ...] = ()
    """The two fields holding a teacher's embeddings of the query and the positive (lists of numbers), or ()."""


def resolve_data_root(root: str | None) -> Path:
    """Find the data root: the given path, else $EMBEDSCALE_DATA, else ../shared/data beside cwd or the repo."""
    if root:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ValueError(f"data.root={root!r} is not a directory: fix data.root= (or unset it to use ${DATA_ENV})")
        return path.resolve()
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]).expanduser()
        if not path.is_dir():
            raise ValueError(f"${DATA_ENV}={path} is not a directory: fix it, or pass data.root=PATH")
        return path.resolve()
    repo = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / ".." / "shared" / "data", repo / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    raise ValueError(
        f"No data found: pass data.root=PATH or set ${DATA_ENV} to a directory holding e.g. scifact/ "
        "(BEIR layout); ../shared/data was not found next to the working directory or the repository"
    )


def resolve_path(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _existing(path: Path) -> Path:
    if not path.exists() and not path.name.endswith(".gz") and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    if not path.exists():
        raise RecordError(path, "does not exist", "check the data root and the dataset path")
    return path


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, gzipped or not; invalid UTF-8 raises naming the line."""
    path = _existing(path)
    line_no = 0
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as err:  # a truncated or corrupt .gz
                raise RecordError(
                    f"{path}:{line_no + 1}",
                    f"the compressed file ends or breaks here ({err})",
                    "re-download or re-compress it (gzip -t tests a file)",
                ) from err
            line_no += 1
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError(f"{path}:{line_no}", f"invalid UTF-8 ({err.reason})", "re-encode the file") from err


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSONL file; blank lines are skipped, invalid JSON raises naming the line."""
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{line_no}", f"invalid JSON ({err.msg})", "fix or remove that line") from err
        if not isinstance(row, dict):
            raise RecordError(f"{path}:{line_no}", "not a JSON object", "write one object per line")
        yield line_no, row


def _negatives(value, where: str, fields: Fields) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise RecordError(
            where, f"field {fields.negatives!r} must hold non-empty strings", f"check {fields.section}.negatives_field"
        )
    return list(values)


def pair_from_row(row: dict, where: str, fields: Fields, *, key: str, min_negatives: int = 0) -> PairExample:
    """A (query, positive, negatives) record from a row; `min_negatives`: fewer is an error naming the key."""
    for name, key_name in ((fields.query, "query_field"), (fields.positive, "positive_field")):
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise RecordError(
                where,
                f"field {name!r} is missing or empty",
                f"set {fields.section}.{key_name} to one of the file's fields {sorted(row)}",
            )
    negatives = _negatives(row.get(fields.negatives), where, fields)
    if len(negatives) < min_negatives:
        raise RecordError(
            where,
            f"{len(negatives)} negatives in {fields.negatives!r} but "
            f"{fields.section}.num_hard_negatives={min_negatives}",
            "lower it or mine more negatives",
        )
    example = PairExample(row[fields.query], row[fields.positive], negatives, key=key)
    if fields.score is not None:
        example.score = _number(row.get(fields.score), where, f"{fields.section}.score_field={fields.score!r}")
    if fields.embeddings:
        vectors = [_numbers(row.get(f), where, f"{fields.section}.embedding_fields: {f!r}") for f in fields.embeddings]
        if len(vectors[0]) != len(vectors[1]):
            raise RecordError(where, f"the two embeddings have {len(vectors[0])} and {len(vectors[1])} numbers")
        example.teacher_embeddings = (vectors[0], vectors[1])
    return example


def _number(value, where: str, key: str) -> float:
    """A finite number from a JSON number or a TSV/CSV cell."""
    try:
        number = float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number != number or number in (float("inf"), float("-inf")):
        raise RecordError(where, f"{key} holds {value!r}, not a finite number", "fix the record or the field name")
    return number


def _numbers(value, where: str, key: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise RecordError(where, f"{key} holds {type(value).__name__}, not a list of numbers", "fix the field name")
    return [_number(v, where, key) for v in value]


def jsonl_pairs(path: Path, fields: Fields, *, min_negatives: int = 0) -> Iterator[PairExample]:
    for line_no, row in iter_jsonl(path):
        yield pair_from_row(row, f"{path}:{line_no}", fields, key=f"{path.name}:{line_no}", min_negatives=min_negatives)


def delimited_pairs(path: Path, fields: Fields, *, delimiter: str, min_negatives: int = 0) -> Iterator[PairExample]:
    """TSV/CSV with a header row; every column whose name starts with `fields.negatives` is a negative
    (`negative`, `negative_2`, ... in header order)."""
    reader = csv.reader((line for _, line in iter_lines(path)), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise RecordError(path, "empty file", "expected a header row naming the columns")
    neg_cols = [i for i, name in enumerate(header) if name.startswith(fields.negatives)]
    for row_no, values in enumerate(reader, start=2):
        where = f"{path}:{row_no}"
        if len(values) != len(header):
            raise RecordError(where, f"{len(values)} columns, the header has {len(header)}", "fix the row")
        row = dict(zip(header, values, strict=True))
        row[fields.negatives] = [values[i] for i in neg_cols if values[i]]
        yield pair_from_row(row, where, fields, key=f"{path.name}:{row_no}", min_negatives=min_negatives)


def hf_pairs(path: Path, fields: Fields, *, split: str, min_negatives: int = 0) -> Iterator[PairExample]:
    """A dataset saved with `datasets.Dataset.save_to_disk` (or a DatasetDict: `split` picks one)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(f"{fields.section}.format=hf needs the `datasets` package: pip install datasets") from err
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise RecordError(path, f"no split {split!r}", f"set {fields.section}.split to one of {sorted(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield pair_from_row(dict(row), f"{path}:{i}", fields, key=f"{path.name}:{i}", min_negatives=min_negatives)


# -- BEIR ---------------------------------------------------------------------------------------------------------


def read_corpus(dataset_dir: Path) -> dict[str, str]:
    """BEIR corpus as {doc_id: "title text"} (joined with a space, as BEIR does)."""
    corpus, first_line = {}, {}
    path = dataset_dir / "corpus.jsonl"
    for line_no, row in iter_jsonl(path):
        if "_id" not in row:
            raise RecordError(f"{path}:{line_no}", "missing '_id'", "give every document an id")
        doc_id = str(row["_id"])
        _unique(doc_id, first_line, path, line_no, "document")
        corpus[doc_id] = (str(row.get("title") or "") + " " + str(row.get("text") or "")).strip()
    return corpus


def _unique(item_id: str, first_line: dict, path: Path, line_no: int, what: str) -> None:
    if item_id in first_line:
        raise RecordError(
            f"{path}:{line_no}",
            f"{what} id {item_id!r} occurs again (first at line {first_line[item_id]})",
            "give every one its own id (one of the two would silently replace the other)",
        )
    first_line[item_id] = line_no


def read_queries(dataset_dir: Path) -> dict[str, str]:
    path = dataset_dir / "queries.jsonl"
    queries, first_line = {}, {}
    for line_no, row in iter_jsonl(path):
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise RecordError(f"{path}:{line_no}", "a query needs '_id' and a string 'text'", "fix that line")
        _unique(str(row["_id"]), first_line, path, line_no, "query")
        queries[str(row["_id"])] = row["text"]
    return queries


def read_qrels(dataset_dir: Path, split: str) -> dict[str, dict[str, int]]:
    """qrels/<split>.tsv as {query_id: {doc_id: relevance}} (header line query-id, corpus-id, score)."""
    path = dataset_dir / "qrels" / f"{split}.tsv"
    if not path.exists():
        available = sorted(p.stem for p in (dataset_dir / "qrels").glob("*.tsv"))
        raise RecordError(path, "does not exist", f"choose a split from {available}")
    qrels: dict[str, dict[str, int]] = {}
    reader = csv.reader((line for _, line in iter_lines(path)), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None or header[:2] != ["query-id", "corpus-id"]:
        raise RecordError(path, f"expected the header 'query-id<TAB>corpus-id<TAB>score', got {header}")
    for line_no, row in enumerate(reader, start=2):
        if len(row) < 3:
            raise RecordError(f"{path}:{line_no}", f"expected 3 tab-separated fields, got {row}")
        try:
            qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
        except ValueError as err:
            raise RecordError(f"{path}:{line_no}", f"score {row[2]!r} is not a number") from err
    return qrels


def iter_beir_pairs(dataset_dir: Path, split: str) -> Iterator[tuple[str, str, str, str]]:
    """(query id, doc id, query text, doc text) per relevant qrel of the split (relevance > 0)."""
    corpus, queries, qrels = read_corpus(dataset_dir), read_queries(dataset_dir), read_qrels(dataset_dir, split)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise RecordError(f"{dataset_dir}/qrels/{split}.tsv", f"names query {qid!r} missing from queries.jsonl")
        for did, rel in docs.items():
            if rel <= 0:
                continue
            if did not in corpus:
                raise RecordError(
                    f"{dataset_dir}/qrels/{split}.tsv", f"names document {did!r} missing from corpus.jsonl"
                )
            if not corpus[did].strip() or not queries[qid].strip():
                raise RecordError(dataset_dir, f"query {qid!r} or document {did!r} has an empty text")
            yield qid, did, queries[qid], corpus[did]


def beir_pairs(dataset_dir: Path, split: str) -> Iterator[PairExample]:
    """One (query, positive) record per relevant qrel (relevance > 0), keyed `<query-id>:<doc-id>`."""
    for qid, did, query, doc in iter_beir_pairs(dataset_dir, split):
        yield PairExample(query, doc, [], f"{qid}:{did}")


def pairs(fmt: str, path: Path, fields: Fields, *, split: str = "train", min_negatives: int = 0):
    """The pairs of one input in any format: jsonl, tsv, csv, beir, hf or sts (scored pairs)."""
    if not path.exists() and fmt != "jsonl":
        raise RecordError(path, "does not exist", f"check {fields.section}'s paths and the data root")
    if fmt == "jsonl":
        return jsonl_pairs(path, fields, min_negatives=min_negatives)
    if fmt in ("tsv", "csv"):
        return delimited_pairs(path, fields, delimiter="\t" if fmt == "tsv" else ",", min_negatives=min_negatives)
    if fmt == "beir":
        if min_negatives:
            raise ValueError(f"{fields.section}.format=beir yields (query, positive) pairs only: set no hard negatives")
        return beir_pairs(path, split)
    if fmt == "hf":
        return hf_pairs(path, fields, split=split, min_negatives=min_negatives)
    if fmt == "sts":
        if min_negatives:
            raise ValueError(f"{fields.section}.format=sts yields scored pairs only: set no hard negatives")
        return sts_pairs(path)
    raise ValueError(f"unknown input format {fmt!r}: use jsonl, tsv, csv, beir, hf or sts")


# -- documents and sentence pairs ---------------------------------------------------------------------------------


def read_corpus_documents(
    path: Path, *, text_field: str, title_field: str, section: str = "data.pretrain"
) -> list[tuple[str, str, str]]:
    """Unlabelled documents for pre-training pairs (data.format=corpus), in file order.

    Args:
        path: a BEIR dataset directory (its corpus.jsonl(.gz), fields `_id`, `title`, `text`), or a JSONL(.gz)
            file with `text_field`, optional `title_field` and optional `_id`/`id` (else the line number).
        text_field, title_field: field names of a JSONL file (data.pretrain.text_field / title_field).
        section: the config section whose `text_field` an error message names (data.pretrain, generate).

    Returns:
        (doc id, title, text) per document; the title is "" when absent.

    A BEIR document with an empty text is returned as is (title-only documents occur in public corpora);
    it has no words, so the pair builder counts it as too short. In a JSONL file a missing or empty text
    field is an error: it almost always means data.pretrain.text_field names the wrong field.
    """
    beir = path.is_dir()
    file = path / "corpus.jsonl" if beir else path
    text_key, title_key = ("text", "title") if beir else (text_field, title_field)
    documents, first_line = [], {}
    for line_no, row in iter_jsonl(file):
        text = row.get(text_key)
        if not isinstance(text, str) or (not beir and not text.strip()):
            fix = (
                "a BEIR corpus needs a string `text` in every line"
                if beir
                else f"set {section}.text_field to the file's text field (it has {sorted(row)})"
            )
            raise RecordError(f"{file}:{line_no}", f"field {text_key!r} is missing or empty", fix)
        doc_id = row.get("_id", row.get("id", None if beir else line_no))
        if doc_id is None:
            raise RecordError(f"{file}:{line_no}", "missing '_id'", "give every document an id")
        doc_id = str(doc_id)
        _unique(doc_id, first_line, file, line_no, "document")  # pairs are seeded and keyed by the id
        documents.append((doc_id, str(row.get(title_key) or ""), text))
    return documents


def read_corpus_texts(path: Path, *, section: str = "mine.corpus") -> list[tuple[str, str]]:
    """(doc id, "title text") of a BEIR directory's corpus or a JSONL file with `text` (optional `_id`, `title`)."""
    if path.is_dir():
        return list(read_corpus(path).items())
    documents = []
    for line_no, row in iter_jsonl(path):
        text = " ".join(t for t in (row.get("title", ""), row.get("text", "")) if t).strip()
        if not text:
            raise RecordError(
                f"{path}:{line_no}", "no `text` field", f"{section} rows need text, optional _id and title"
            )
        documents.append((str(row.get("_id", f"{path.stem}:{line_no}")), text))
    return documents


def sts_rows(path: Path) -> Iterator[tuple[int, str, str, float]]:
    """(line, sentence1, sentence2, score) of an STS TSV with header sentence1, sentence2, score (unquoted fields,
    split on tabs: STS text holds quotes that a CSV reader would take as quoting)."""
    lines = iter_lines(path)
    _, header_line = next(lines, (1, ""))
    header = header_line.rstrip("\n").split("\t")
    try:
        i1, i2, i3 = header.index("sentence1"), header.index("sentence2"), header.index("score")
    except ValueError as err:
        raise RecordError(path, f"expected a header with sentence1, sentence2 and score, got {header}") from err
    for line_no, line in lines:
        fields = line.rstrip("\n").split("\t")
        if len(fields) <= max(i1, i2, i3):
            raise RecordError(f"{path}:{line_no}", f"expected {len(header)} tab-separated fields")
        try:
            score = float(fields[i3])
        except ValueError as err:
            raise RecordError(f"{path}:{line_no}", f"score {fields[i3]!r} is not a number") from err
        yield line_no, fields[i1], fields[i2], score


def sts_pairs(path: Path) -> Iterator[PairExample]:
    """Scored pairs of an STS TSV as training records: query = sentence1, positive = sentence2, their score."""
    for line_no, left, right, score in sts_rows(path):
        where = f"{path}:{line_no}"
        if not left.strip() or not right.strip():
            raise RecordError(where, "an empty sentence", "fix or remove that line")
        yield PairExample(left, right, [], key=f"{path.name}:{line_no}", score=score)


def read_sts(path: Path) -> tuple[list[str], list[str], list[float]]:
    """STS TSV with header sentence1, sentence2, score, as three lists (evaluation)."""
    rows = list(sts_rows(path))
    return [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
