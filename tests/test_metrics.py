"""Retrieval metrics equal pytrec_eval (trec_eval's C code) to 1e-6: random runs with ties and graded
relevance, and a real SciFact test run of all-MiniLM-L6-v2."""

import random
from pathlib import Path

import pytest
import torch

from embedscale.retrieval.metrics import retrieval_metrics

pytrec_eval = pytest.importorskip("pytrec_eval")

K = (1, 3, 5, 10, 100)


def pytrec_metrics(run, qrels, k_values=K):
    """The same metrics through pytrec_eval; MRR@k is recip_rank over the run cut to its top k."""
    measures = {"ndcg_cut." + ",".join(map(str, k_values)), "recall." + ",".join(map(str, k_values))}
    measures.add("map_cut." + ",".join(map(str, k_values)))
    per_q = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    out = {}
    for k in k_values:
        out[f"ndcg@{k}"] = sum(v[f"ndcg_cut_{k}"] for v in per_q.values()) / len(per_q)
        out[f"recall@{k}"] = sum(v[f"recall_{k}"] for v in per_q.values()) / len(per_q)
        out[f"map@{k}"] = sum(v[f"map_cut_{k}"] for v in per_q.values()) / len(per_q)
        cut = {}
        for qid, docs in run.items():
            # trec order: score desc, then doc id desc
            ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]
            cut[qid] = dict(ranked)
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        out[f"mrr@{k}"] = sum(v["recip_rank"] for v in rr.values()) / len(rr)
    return out


def assert_same(ours, ref, tol=1e-6):
    assert set(ref) <= set(ours)
    bad = {k: (ours[k], ref[k]) for k in ref if abs(ours[k] - ref[k]) > tol}
    assert not bad, bad


def test_random_runs_with_ties_and_graded_relevance():
    rnd = random.Random(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(60):
        qid = f"q{q}"
        qrels[qid] = {d: rnd.choice([1, 1, 2, 3]) for d in rnd.sample(docs, rnd.randint(1, 6))}
        qrels[qid].update({d: 0 for d in rnd.sample(docs, 3) if d not in qrels[qid]})  # judged non-relevant
        # scores rounded to 1 decimal: many ties, broken by doc id as trec_eval does
        run[qid] = {d: round(rnd.random(), 1) for d in rnd.sample(docs, 150)}
    assert_same(retrieval_metrics(run, qrels, K), pytrec_metrics(run, qrels))


def test_perfect_and_empty_rankings():
    qrels = {"q": {"a": 1, "b": 1}}
    m = retrieval_metrics({"q": {"a": 2.0, "b": 1.0, "c": 0.5}}, qrels, [1, 10])
    assert m["ndcg@10"] == pytest.approx(1.0) and m["recall@1"] == pytest.approx(0.5) and m["mrr@1"] == 1.0
    m = retrieval_metrics({"q": {"c": 1.0}}, qrels, [10])
    assert m["ndcg@10"] == 0.0 and m["map@10"] == 0.0


@pytest.mark.slow  # the real MiniLM
def test_real_scifact_run_matches_pytrec(shared_data: Path):
    """all-MiniLM-L6-v2 on SciFact test queries over a 1,000-document slice of the real corpus (64 tokens)."""
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import RetrievalEvaluator

    torch.manual_seed(0)
    ev = RetrievalEvaluator.from_beir(shared_data / "scifact", "test", k_values=K, max_length=64, batch_size=64)
    relevant = {d for docs in ev.qrels.values() for d in docs}
    keep = [d for d in ev.corpus if d in relevant] + [d for d in ev.corpus if d not in relevant][:700]
    ev.corpus = {d: ev.corpus[d] for d in keep}
    encoder, tokenizer = load_encoder(ModelConfig())
    run = ev.search(encoder, tokenizer)
    ours = retrieval_metrics(run, ev.qrels, K)
    assert_same(ours, pytrec_metrics(run, ev.qrels))
    assert ours["ndcg@10"] > 0.5  # a real model on real data, not noise
