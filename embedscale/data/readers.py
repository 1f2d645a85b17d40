"""Readers for the on-disk layouts: BEIR (corpus, queries, qrels), JSONL pairs/triplets, STS TSV.

All readers return plain Python objects and raise `ValueError` naming the file, line and fix for
input a user can get wrong. Nothing is dropped silently: callers get counts of what was skipped.
Gzipped files (`*.gz`) are read transparently.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

from embedscale.data.batch import PairExample

DATA_ENV = "EMBEDSCALE_DATA"


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


def open_text(path: Path):
    if not path.exists() and not path.name.endswith(".gz") and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    if not path.exists():
        raise ValueError(f"{path} does not exist: check the data root and the dataset path")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg}); fix or remove that line") from err


def read_corpus(dataset_dir: Path) -> dict[str, str]:
    """BEIR corpus as {doc_id: "title text"} (joined with a space, as BEIR does)."""
    corpus = {}
    for line_no, row in iter_jsonl(dataset_dir / "corpus.jsonl"):
        if "_id" not in row:
            raise ValueError(f"{dataset_dir / 'corpus.jsonl'}:{line_no}: missing '_id'")
        corpus[str(row["_id"])] = (str(row.get("title") or "") + " " + str(row.get("text") or "")).strip()
    return corpus


def read_queries(dataset_dir: Path) -> dict[str, str]:
    return {str(row["_id"]): str(row["text"]) for _, row in iter_jsonl(dataset_dir / "queries.jsonl")}


def read_qrels(dataset_dir: Path, split: str) -> dict[str, dict[str, int]]:
    """qrels/<split>.tsv as {query_id: {doc_id: relevance}} (header line query-id, corpus-id, score)."""
    path = dataset_dir / "qrels" / f"{split}.tsv"
    if not path.exists():
        available = sorted(p.stem for p in (dataset_dir / "qrels").glob("*.tsv"))
        raise ValueError(f"{path} does not exist: choose a split from {available}")
    qrels: dict[str, dict[str, int]] = {}
    with open_text(path) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or header[:2] != ["query-id", "corpus-id"]:
            raise ValueError(f"{path}: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) < 3:
                raise ValueError(f"{path}:{line_no}: expected 3 tab-separated fields, got {row}")
            qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


def iter_beir_pairs(dataset_dir: Path, split: str) -> Iterator[tuple[str, str, str, str]]:
    """(query id, doc id, query text, doc text) per relevant qrel of the split (relevance > 0)."""
    corpus, queries, qrels = read_corpus(dataset_dir), read_queries(dataset_dir), read_qrels(dataset_dir, split)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise ValueError(f"{dataset_dir}/qrels/{split}.tsv names query {qid!r} missing from queries.jsonl")
        for did, rel in docs.items():
            if rel <= 0:
                continue
            if did not in corpus:
                raise ValueError(f"{dataset_dir}/qrels/{split}.tsv names document {did!r} missing from corpus.jsonl")
            if not corpus[did].strip() or not queries[qid].strip():
                raise ValueError(f"{dataset_dir}: query {qid!r} or document {did!r} has an empty text")
            yield qid, did, queries[qid], corpus[did]


def read_beir_pairs(dataset_dir: Path, split: str) -> list[PairExample]:
    """One (query, positive) example per relevant qrel of the split (relevance > 0)."""
    pairs = iter_beir_pairs(dataset_dir, split)
    return [PairExample(q, d, key=f"{dataset_dir.name}:{qid}:{did}") for qid, did, q, d in pairs]


def read_jsonl_pairs(
    path: Path, *, query_field: str, positive_field: str, negatives_field: str, num_hard_negatives: int
) -> list[PairExample]:
    """Pairs/triplets/n-tuples from JSONL; `negatives_field` may hold a string or a list of strings."""
    examples = []
    for line_no, row in iter_jsonl(path):
        for name in (query_field, positive_field):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise ValueError(
                    f"{path}:{line_no}: field {name!r} is missing or empty; set data.query_field/"
                    f"data.positive_field to the file's field names (it has {sorted(row)})"
                )
        negatives = row.get(negatives_field) or []
        negatives = [negatives] if isinstance(negatives, str) else list(negatives)
        if len(negatives) < num_hard_negatives:
            raise ValueError(
                f"{path}:{line_no}: {len(negatives)} negatives in {negatives_field!r} but "
                f"data.num_hard_negatives={num_hard_negatives}: lower it or mine more negatives"
            )
        examples.append(
            PairExample(
                row[query_field], row[positive_field], negatives[:num_hard_negatives], key=f"{path.name}:{line_no}"
            )
        )
    return examples


def read_corpus_documents(path: Path, *, text_field: str, title_field: str) -> list[tuple[str, str, str]]:
    """Unlabelled documents for pre-training pairs (data.format=corpus), in file order.

    Args:
        path: a BEIR dataset directory (its corpus.jsonl(.gz), fields `_id`, `title`, `text`), or a JSONL(.gz)
            file with `text_field`, optional `title_field` and optional `_id`/`id` (else the line number).
        text_field, title_field: field names of a JSONL file (data.pretrain.text_field / title_field).

    Returns:
        (doc id, title, text) per document; the title is "" when absent.

    A BEIR document with an empty text is returned as is (title-only documents occur in public corpora);
    it has no words, so the pair builder counts it as too short. In a JSONL file a missing or empty text
    field is an error: it almost always means data.pretrain.text_field names the wrong field.
    """
    beir = path.is_dir()
    file = path / "corpus.jsonl" if beir else path
    text_key, title_key = ("text", "title") if beir else (text_field, title_field)
    documents, seen = [], set()
    for line_no, row in iter_jsonl(file):
        text = row.get(text_key)
        if not isinstance(text, str) or (not beir and not text.strip()):
            raise ValueError(
                f"{file}:{line_no}: field {text_key!r} is missing or empty"
                + (
                    " (a BEIR corpus needs a string `text` in every line)"
                    if beir
                    else f"; set data.pretrain.text_field to the file's text field (it has {sorted(row)})"
                )
            )
        doc_id = row.get("_id", row.get("id", None if beir else line_no))
        if doc_id is None:
            raise ValueError(f"{file}:{line_no}: missing '_id'")
        doc_id = str(doc_id)
        if doc_id in seen:  # pairs are seeded and keyed by the id: two documents may not share one
            raise ValueError(f"{file}:{line_no}: document id {doc_id!r} occurs twice; give every document its own id")
        seen.add(doc_id)
        documents.append((doc_id, str(row.get(title_key) or ""), text))
    return documents


def read_sts(path: Path) -> tuple[list[str], list[str], list[float]]:
    """STS TSV with header sentence1, sentence2, score (unquoted fields, split on tabs)."""
    left, right, scores = [], [], []
    with open_text(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        try:
            i1, i2, i3 = header.index("sentence1"), header.index("sentence2"), header.index("score")
        except ValueError as err:
            raise ValueError(f"{path}: expected a header with sentence1, sentence2 and score, got {header}") from err
        for line_no, line in enumerate(f, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) <= max(i1, i2, i3):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated fields")
            left.append(fields[i1])
            right.append(fields[i2])
            scores.append(float(fields[i3]))
    return left, right, scores
