"""Hard-negative mining: selection rules on known answers, BM25/dense/hybrid candidates, the mine job's
shards and manifest, and sharded corpus encoding over 2 gloo ranks equal to 1 rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dist import spawn

from embedscale.config import IndexConfig, MineConfig, MineJobConfig, ModelConfig
from embedscale.distributed import gather_rows
from embedscale.retrieval.index import build_index, search
from embedscale.retrieval.mining import BM25, eligible, rrf_fuse, sample_rng, select

# A corpus where the answers are known: doc 0 is the positive of query "cat"; doc 1 repeats its text
# under another id; doc 2 is a labelled positive too; docs 3.. are ranked by hand.
IDS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
SCORES = np.array([0.9, 0.9, 0.85, 0.84, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], dtype=np.float32)


def _eligible(**kw):
    spec = MineConfig(**{"num_negatives": 3, "window_end": 10, **kw})
    ranks, why = eligible(IDS, SCORES, positives={0, 2}, same_text={1}, positive_score=0.9, spec=spec)
    return spec, ranks, why


def test_positives_and_same_text_never_negatives():
    spec, ranks, why = _eligible()
    assert ranks == [3, 4, 5, 6, 7, 8, 9]
    assert why == {"positive": 2, "same_text": 1}
    sel = select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(0, "k"))
    assert sel.ids == [3, 4, 5] and sel.ranks == [3, 4, 5]
    assert sel.scores == pytest.approx([0.84, 0.7, 0.6])


def test_window_and_fill():
    spec, ranks, why = _eligible(window_start=5, window_end=7, fill=False)
    assert ranks == [5, 6]  # ranks 0-4 are before the window; 7.. after it
    sel = select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(0, "k"))
    assert sel.ids == [5, 6] and sel.beyond_window == 0  # too few: fill is off
    spec, ranks, _ = _eligible(window_start=5, window_end=7, fill=True)
    sel = select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(0, "k"))
    assert sel.ids == [5, 6, 7] and sel.beyond_window == 1


def test_margins():
    # absolute: keep score < 0.9 - 0.25 = 0.65
    _, ranks, why = _eligible(margin=0.25)
    assert ranks == [5, 6, 7, 8, 9] and why["margin"] == 2
    # relative: keep score < (1 - 0.5) * 0.9 = 0.45
    _, ranks, why = _eligible(relative_margin=0.5)
    assert ranks == [7, 8, 9] and why["relative_margin"] == 4


def test_random_sampling_is_seeded_by_key_and_stays_in_window():
    spec, ranks, _ = _eligible(sample="random", window_end=8, fill=False)
    a = select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(1, "q1:d1")).ids
    b = select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(1, "q1:d1")).ids
    assert a == b and set(a) <= {3, 4, 5, 6, 7} and len(set(a)) == 3
    draws = {tuple(select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(1, f"q{i}")).ids) for i in range(20)}
    assert len(draws) > 1


def test_cross_encoder_threshold_and_margin():
    spec, ranks, _ = _eligible(ce_threshold=0.5, cross_encoder="ce")
    logits = {3: 2.0, 4: -1.0, 5: 0.1, 6: -3.0, 7: -2.0, 8: -2.0, 9: -2.0}  # sigmoid >= 0.5: ranks 3 and 5
    sel = select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(0, "k"), ce_logits=logits, ce_positive=3.0)
    assert sel.ids == [4, 6, 7] and sel.filtered["cross_encoder"] == 2
    assert sel.ce_scores == [-1.0, -3.0, -2.0]
    spec, ranks, _ = _eligible(ce_margin=4.5, cross_encoder="ce")  # drop logit >= 3.0 - 4.5 = -1.5
    sel = select(IDS, SCORES, ranks, spec=spec, rng=sample_rng(0, "k"), ce_logits=logits, ce_positive=3.0)
    assert sel.ids == [6, 7, 8]


def test_rrf_fuse_ranks_shared_documents_first():
    dense = (np.array([[5, 1, 2]]), None)
    sparse = (np.array([[1, 7, -1]]), None)
    ids, _ = rrf_fuse([dense, sparse], 4)
    assert ids.tolist() == [[1, 5, 7, 2]]


def test_bm25_finds_the_term_match():
    bm25 = BM25(["the cat sat on the mat", "dogs run fast", "a cat and a dog", "quantum physics"])
    ids, scores, extra = bm25.search(["cats", "zebra"], 3, score_docs=[[0], [1]])
    assert set(ids[0][:2].tolist()) == {0, 2} and ids[0][2] == -1
    assert (ids[1] == -1).all() and extra == [[pytest.approx(float(scores[0][list(ids[0]).index(0)]))], [0.0]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_index_kinds_find_the_nearest(kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x, IndexConfig(kind=kind, nlist=16, nprobe=16, pq_m=8, gpu="false"))
    scores, ids = search(index, x[:50], 5)
    assert ids.shape == (50, 5)
    if kind != "ivfpq":  # PQ codes are approximate: the exact vector need not come first
        assert (ids[:, 0] == np.arange(50)).all()
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)


def _beir(tmp_path: Path) -> Path:
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    docs = {
        "d0": "cats are small furry pets",
        "d1": "cats are small furry pets",  # same text as d0 under another id
        "d2": "dogs bark at the mail carrier",
        "d3": "the stock market fell sharply",
        "d4": "cats sleep most of the day",  # labelled positive of q0 in the test split only
        "d5": "quantum computers use qubits",
        "d6": "bread is baked in an oven",
        "d7": "rivers flow into the sea",
    }
    (d / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items())
    )
    queries = {"q0": "what are cats like", "q1": "why do dogs bark"}
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (d / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td2\t1\n")
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td4\t1\n")
    return d


@pytest.mark.parametrize("method", ["bm25", "dense", "hybrid"])
def test_mine_job_writes_training_shards(tmp_path, tiny_bert, method):
    from embedscale.data.shards import ShardedDataset
    from embedscale.jobs.mine import run

    beir = _beir(tmp_path)
    cfg = MineJobConfig(
        model=ModelConfig(name_or_path=str(tiny_bert), document_max_length=32, query_max_length=16),
        mine=MineConfig(
            input=str(beir),
            method=method,
            num_negatives=3,
            window_end=8,
            output=str(tmp_path / "out"),
            cache_dir=str(tmp_path / "cache"),
        ),
        index=IndexConfig(gpu="false"),
    )
    manifest = run(cfg)
    ds = ShardedDataset.open(tmp_path / "out")
    rows = [r for s, meta in enumerate(ds.shards) for r in ds.read(s, range(meta["samples"]))]
    assert len(rows) == 2 == manifest["num_samples"]
    texts = {"q0": {"cats are small furry pets", "cats sleep most of the day"}, "q1": {"dogs bark at the mail carrier"}}
    for row in rows:
        qid = row["origin"].split(":")[0]
        assert not set(row["negatives"]) & texts[qid]  # no labelled positive (any split), no duplicate of one
        assert row["query"] not in row["negatives"]
        assert len(row["negatives"]) == len(row["negative_scores"]) == len(row["negative_ranks"])
        retrieved = [k for k in row["negative_ranks"] if k >= 0]
        assert retrieved == sorted(retrieved) and row["negative_ranks"][: len(retrieved)] == retrieved
    m = manifest["mining"]
    assert m["method"] == method and m["counts"]["samples"] == 2
    assert all(len(r["negatives"]) == 3 for r in rows)
    if method == "bm25":  # few documents share a term with the queries: random documents fill the rest
        assert m["counts"]["random_fill"] == sum(r["negative_ranks"].count(-1) for r in rows) > 0
    else:
        assert m["model"]["fingerprint"] and m["index"]["kind"] == "flat"
    if method == "dense":
        for row in rows:  # dense scores are sorted with rank
            assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)


def test_mine_too_few_negatives_names_the_sample(tmp_path, tiny_bert):
    from embedscale.jobs.mine import run

    cfg = MineJobConfig(
        model=ModelConfig(name_or_path=str(tiny_bert)),
        mine=MineConfig(
            input=str(_beir(tmp_path)), method="bm25", num_negatives=3, random_fill=False, output=str(tmp_path / "o")
        ),
    )
    with pytest.raises(ValueError, match=r"q0:d0.*mine.allow_fewer"):
        run(cfg)


def test_mine_config_errors_name_the_key():
    with pytest.raises(ValueError, match="mine.window_start"):
        MineConfig(window_start=10, window_end=5)
    with pytest.raises(ValueError, match="mine.cross_encoder"):
        MineConfig(ce_threshold=0.5)
    with pytest.raises(ValueError, match="mine.method"):
        MineConfig(method="splade")


def _encode_ranks(rank, world, model_dir, texts, out):
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.encode import encode_sharded

    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=model_dir, document_max_length=32))
    e = encode_sharded(encoder, tokenizer, texts, side="document", batch_size=4)
    if rank == 0:
        torch.save(e, out)


@pytest.mark.slow  # 2 ranks
def test_sharded_encoding_over_two_ranks_equals_one(tmp_path, tiny_bert):
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import encode_texts, load_encoder

    texts = [f"document {i} " + "word " * (i % 7) for i in range(23)]
    spawn(_encode_ranks, 2, str(tiny_bert), texts, str(tmp_path / "two.pt"))
    torch.set_num_threads(1)
    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert), document_max_length=32))
    one = encode_texts(encoder, tokenizer, texts, side="document", batch_size=4)
    two = torch.load(tmp_path / "two.pt")
    assert torch.equal(one, two)  # the same batches on each side: the same bits


def test_gather_rows_single_process_scatters_by_position():
    out = gather_rows(torch.tensor([[1.0], [2.0]]), torch.tensor([1, 0]), 2)
    assert out.tolist() == [[2.0], [1.0]]


def _distil_from(tmp_path, tiny_bert, shards, rows):
    """The mined cross-encoder scores feed training: stream -> PairBatch.teacher_BG -> distillation term."""
    from helpers import compose_train as _cfg

    from embedscale.data.stream import to_example
    from embedscale.jobs.train import run

    ex = to_example(rows[0], 2, "cross_encoder")
    assert ex.teacher_scores == [rows[0]["positive_ce_score"], *rows[0]["negative_ce_scores"]]
    assert (
        "missing teacher scores"
        in to_example({**rows[0], "negative_ce_scores": [None, 1.0]}, 2, "cross_encoder").reason
    )
    cfg = _cfg(
        [
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            "data.format=shards",
            f"data.path={shards}",
            "data.batch_size_per_rank=2",
            "data.num_hard_negatives=2",
            "data.teacher_scores=cross_encoder",
            "loss.distill_weight=1.0",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.progress=off",
            "logger.loggers=[csv]",
            "eval=none",
            "export=false",
            f"run_dir={tmp_path / 'distil'}",
        ]
    )
    assert run(cfg)["train"]["optimizer_steps"] == 2
    header = (tmp_path / "distil" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/distill_kl" in header and "train/teacher_agreement" in header


@pytest.mark.parametrize("threshold", [0.999, 0.001])
def test_mine_cross_encoder_filter_and_scores(tmp_path, tiny_bert, threshold):
    from embedscale.encoder.crossencoder import load_cross_encoder, save_cross_encoder
    from embedscale.jobs.mine import run

    ce_dir = tmp_path / "ce"
    save_cross_encoder(*load_cross_encoder(str(tiny_bert), max_length=32), ce_dir)
    cfg = MineJobConfig(
        model=ModelConfig(name_or_path=str(tiny_bert), document_max_length=32, query_max_length=16),
        mine=MineConfig(
            input=str(_beir(tmp_path)),
            num_negatives=2,
            window_end=8,
            cross_encoder=str(ce_dir),
            ce_threshold=threshold,
            ce_max_length=32,
            output=str(tmp_path / "out"),
            cache_dir=str(tmp_path / "cache"),
        ),
        index=IndexConfig(gpu="false"),
    )
    manifest = run(cfg)
    from embedscale.data.shards import ShardedDataset

    ds = ShardedDataset.open(tmp_path / "out")
    rows = list(ds.read(0, range(2)))
    dropped = manifest["mining"]["counts"]["filtered_in_window"]["cross_encoder"]
    for row in rows:
        assert isinstance(row["positive_ce_score"], float)
        assert len(row["negative_ce_scores"]) == len(row["negatives"]) == 2
    if threshold > 0.5:  # a random head gives sigmoid ~0.5: nothing is that sure
        assert dropped == 0 and all(isinstance(s, float) for r in rows for s in r["negative_ce_scores"])
        _distil_from(tmp_path, tiny_bert, tmp_path / "out", rows)
    else:  # everything is "relevant": every window candidate dropped, random documents fill in
        assert dropped > 0 and manifest["mining"]["counts"]["random_fill"] == 4
        assert all(s is None for r in rows for s in r["negative_ce_scores"])


@pytest.mark.slow  # torchrun
def test_mine_under_torchrun_two_ranks_equals_one(tmp_path, tiny_bert):
    """`torchrun -m embedscale.mine`: the corpus is encoded over 2 gloo ranks, rank 0 writes the same shards."""
    import subprocess
    import sys

    from helpers import clean_env

    beir = _beir(tmp_path)
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        args = [
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            f"mine.input={beir}",
            "mine.num_negatives=3",
            "mine.window_end=8",
            "mine.batch_size=2",  # 8 documents -> 4 batches, 2 per rank
            f"mine.output={out}",
            f"mine.cache_dir={tmp_path / f'cache{world}'}",
            f"hydra.run.dir={tmp_path / f'run{world}'}",
        ]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        proc = subprocess.run(
            [*launcher, "-m", "embedscale.jobs.mine", *args], capture_output=True, text=True, env=clean_env()
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[world] = json.loads((out / "manifest.json").read_text())
    assert outs[2]["mining"]["world_size"] == 2
    assert [s["sha256"] for s in outs[2]["shards"]] == [s["sha256"] for s in outs[1]["shards"]]  # byte-identical
