"""Readers and collate: real SciFact counts, JSONL triplets, errors that name the file and line."""

import json

import pytest
import torch

from embedscale.config import DataConfig, DataFormat, ModelConfig
from embedscale.data.batch import PairExample, text_id
from embedscale.data.collate import PairCollator
from embedscale.data.datamodule import load_examples
from embedscale.data.records import Fields, jsonl_pairs, read_qrels, read_sts


def read_jsonl_pairs(path, *, num_hard_negatives):
    return list(jsonl_pairs(path, Fields(section="data"), min_negatives=num_hard_negatives))


def test_scifact_train_pairs_from_real_data(shared_data):
    examples = load_examples(DataConfig(), shared_data)
    assert len(examples) == 919  # one per train qrel (data/README.md)
    assert len({ex.key for ex in examples}) == 919
    assert sum(len(v) for v in read_qrels(shared_data / "scifact", "test").values()) == 339


def test_stsb_and_medquad_read(shared_data):
    left, right, scores = read_sts(shared_data / "stsb" / "test.tsv")
    assert len(left) == len(right) == len(scores) == 1379 and 0 <= min(scores) and max(scores) <= 5
    cfg = DataConfig(format=DataFormat.jsonl, path="medquad/pairs.jsonl.gz", max_samples=100)
    assert len(load_examples(cfg, shared_data)) == 100


def test_jsonl_errors_name_file_line_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'query'.*data\.query_field"):
        read_jsonl_pairs(path, num_hard_negatives=0)
    path.write_text(json.dumps({"query": "q", "positive": "p", "negatives": "n"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 1 negatives.*num_hard_negatives=2"):
        read_jsonl_pairs(path, num_hard_negatives=2)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: invalid JSON"):
        read_jsonl_pairs(path, num_hard_negatives=0)


def test_collate_layout_and_ids(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    cfg = ModelConfig(query_prefix="query: ", document_prefix="passage: ", query_max_length=8, document_max_length=12)
    examples = [PairExample(f"q{i}", f"p{i}", [f"n{i}a", f"n{i}b"], key=str(i)) for i in range(3)]
    examples.append(PairExample("q0", "p1", ["n3a", "n3b"], key="3"))
    batch = PairCollator(tok, model_cfg=cfg, num_hard_negatives=2)(examples)
    assert batch.queries["input_ids"].shape[0] == 4 and batch.documents["input_ids"].shape[0] == 4 * 3
    assert batch.documents["input_ids"].shape[1] <= 12
    decoded = tok.decode(batch.documents["input_ids"][4 + 2 * 1], skip_special_tokens=True)  # row 1, negative 0
    assert decoded.replace(" ", "") == "passage:n1a"
    assert tok.decode(batch.queries["input_ids"][0], skip_special_tokens=True).startswith("query")
    assert batch.ids.query_B[3] == batch.ids.query_B[0] and batch.ids.positive_B[3] == batch.ids.positive_B[1]
    assert batch.ids.negatives_Bk.shape == (4, 2) and batch.ids.negatives_Bk[1, 0] == text_id("n1a")
    assert batch.ids.query_B.dtype == torch.long


def test_text_id_is_stable_and_fits_int64():
    assert text_id("hello") == text_id("hello") != text_id("hello ")
    assert 0 <= text_id("x") < 2**63


def test_collate_per_example_instruction_templates(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    collate = PairCollator(tok, model_cfg=ModelConfig(query_prefix="query: "), num_hard_negatives=1)
    examples = [PairExample("q0", "p0", ["n0"]), PairExample("q1", "p1", ["n1"])]
    batch = collate(examples, query_prefix=["Instruct: a\nQuery: ", None], document_prefix=[None, "doc: "])
    texts = [tok.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in batch.queries["input_ids"]]
    assert texts == ["instruct:aquery:q0", "query:q1"]
    docs = [tok.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in batch.documents["input_ids"]]
    assert docs == ["p0", "doc:p1", "n0", "doc:n1"]  # positives first, then each row's negatives
