"""The cross-encoder re-ranker: listwise loss vs a loop, batching-independent scores, the sentence-transformers
round trip, re-ranking with a known answer, and `embedscale reranker` end to end on tiny shards and a tiny BEIR set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from embedscale.config import RerankerJobConfig, register_configs, to_config
from embedscale.contrastive.losses import listwise_loss
from embedscale.data.batch import PairExample
from embedscale.data.shards import FORMAT_VERSION, MANIFEST, write_records
from embedscale.encoder.crossencoder import load_cross_encoder, save_cross_encoder, score_pairs
from embedscale.jobs.launch import conf_dir
from embedscale.retrieval.rerank import interpolate_runs, rerank_run

QUERIES = ["what about protein folding", "galaxy", "a river in spring", "violin", "engine oil pressure", "x"]
DOCS = [
    "protein folding is a physical process",
    "the galaxy holds many stars and more stars and dust",
    "rivers",
    "a violin is a string instrument played with a bow",
    "engine",
    "crystal lattice defects and their role in semiconductors, studied at low temperature",
]


@pytest.fixture(scope="module")
def tiny_ce(tiny_bert):
    model, tokenizer = load_cross_encoder(str(tiny_bert), max_length=48)
    torch.manual_seed(0)
    head = model.model
    torch.nn.init.normal_(head.bert.pooler.dense.weight, std=0.5)  # spread the scores of the fresh head
    torch.nn.init.normal_(head.classifier.weight, std=1.0)
    return model, tokenizer


def test_listwise_loss_matches_a_loop():
    torch.manual_seed(0)
    scores_BG = torch.randn(5, 4, requires_grad=True)
    mask_BG = torch.zeros(5, 4, dtype=torch.bool)
    mask_BG[1, 2] = mask_BG[3, 1] = True
    loss, metrics = listwise_loss(scores_BG, temperature=0.5, mask_BG=mask_BG)
    expected, correct = 0.0, 0
    for b in range(5):
        kept = [j for j in range(4) if not mask_BG[b, j]]
        logits = [scores_BG[b, j].item() / 0.5 for j in kept]
        expected += -(logits[0] - math.log(sum(math.exp(x) for x in logits))) / 5
        correct += all(scores_BG[b, 0] > scores_BG[b, j] for j in kept[1:])
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(correct / 5)
    assert metrics["negatives_per_query"].item() == pytest.approx((5 * 3 - 2) / 5)
    loss.backward()
    assert scores_BG.grad[1, 2] == 0 and scores_BG.grad[3, 1] == 0  # masked candidates get no gradient


def test_score_pairs_restores_order_and_ignores_batching(tiny_ce):
    model, tokenizer = tiny_ce
    full = score_pairs(model, tokenizer, QUERIES, DOCS, batch_size=64)
    assert full.shape == (6,) and full.dtype == torch.float32 and full.std() > 1e-3
    one_by_one = torch.cat([score_pairs(model, tokenizer, [q], [d]) for q, d in zip(QUERIES, DOCS)])
    torch.testing.assert_close(score_pairs(model, tokenizer, QUERIES, DOCS, batch_size=2), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=0)
    perm = [4, 0, 5, 2, 1, 3]
    shuffled = score_pairs(model, tokenizer, [QUERIES[i] for i in perm], [DOCS[i] for i in perm], batch_size=4)
    torch.testing.assert_close(shuffled, full[perm], atol=1e-5, rtol=0)
    model.train()
    score_pairs(model, tokenizer, QUERIES[:2], DOCS[:2])
    assert model.training  # restored after scoring in eval mode
    model.eval()
    assert score_pairs(model, tokenizer, [], []).shape == (0,)


def test_save_loads_in_sentence_transformers_and_hf_with_the_same_scores(tiny_ce, tmp_path, caplog):
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tokenizer = tiny_ce
    assert model.new_parameters  # a bare BERT gets a fresh head
    ours = score_pairs(model, tokenizer, QUERIES, DOCS)
    out = save_cross_encoder(model, tokenizer, tmp_path / "ce")
    st = STCrossEncoder(str(out), device="cpu")
    st_scores = torch.as_tensor(st.predict(list(zip(QUERIES, DOCS)), batch_size=3)).float()
    torch.testing.assert_close(st_scores, ours, atol=1e-5, rtol=0)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    enc = hf_tok(QUERIES, DOCS, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits.squeeze(-1), ours, atol=1e-5, rtol=0)
    reloaded, tok = load_cross_encoder(str(out), max_length=48)
    assert reloaded.new_parameters == []
    torch.testing.assert_close(score_pairs(reloaded, tok, QUERIES, DOCS), ours, atol=1e-5, rtol=0)


def test_rerank_run_with_a_fake_scorer_and_interpolation():
    queries = {"q1": "apple", "q2": "pear"}
    corpus = {f"d{i}": text for i, text in enumerate(["apple pie", "pear tart", "apple", "bread", "pear"])}
    run = {  # the first stage ranks the right documents low
        "q1": {"d0": 0.1, "d1": 0.9, "d2": 0.2, "d3": 0.8, "d4": 0.05},
        "q2": {"d0": 0.7, "d1": 0.3, "d3": 0.6, "d4": 0.5},
    }

    def fake(model, tokenizer, qs, ds, *, batch_size, max_length, progress):
        assert model == "model" and max_length == 7
        return torch.tensor([float(q in d) + 0.01 * len(d) for q, d in zip(qs, ds)])

    out = rerank_run(run, queries, corpus, "model", None, top_k=4, max_length=7, scorer=fake)
    assert set(out["q1"]) == {"d1", "d3", "d2", "d0"}  # d4 (5th by bi-encoder score) is not re-ranked
    assert max(out["q1"], key=out["q1"].get) == "d0" and sorted(out["q1"], key=out["q1"].get)[-2] == "d2"
    assert max(out["q2"], key=out["q2"].get) == "d1"
    mixed = interpolate_runs(out, run, alpha=1.0)
    assert sorted(mixed["q1"], key=mixed["q1"].get) == sorted(out["q1"], key=out["q1"].get)
    mixed = interpolate_runs(out, run, alpha=0.0)
    assert sorted(mixed["q2"], key=mixed["q2"].get) == sorted(run["q2"], key=run["q2"].get)
    with pytest.raises(ValueError, match="missing from the queries/corpus"):
        rerank_run({"q9": {"d0": 1.0}}, queries, corpus, "model", None, max_length=7, scorer=fake)


def _cfg(overrides: list[str]) -> RerankerJobConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return to_config(compose(config_name="reranker", overrides=overrides), RerankerJobConfig)


def _groups(n: int, num_negatives: int) -> list[PairExample]:
    """Trivially learnable groups: the positive repeats the query's words; the negatives share none."""
    words = ["protein", "galaxy", "river", "violin", "engine", "forest", "vaccine", "crystal"]
    return [
        PairExample(
            f"{words[i % 8]} {i}",
            f"{words[i % 8]} {i} is described here",
            [f"unrelated text {words[(i + j + 1) % 8]} {100 + j}" for j in range(num_negatives)],
            key=f"g{i}",
        )
        for i in range(n)
    ]


def _write_shards(out: Path, examples: list[PairExample]) -> Path:
    out.mkdir(parents=True)
    result = write_records(examples, out, name="groups", file_index=0, max_bytes=0, max_samples=6)
    manifest = {"format_version": FORMAT_VERSION, "name": "groups", "num_samples": result["samples"]}
    (out / MANIFEST).write_text(json.dumps({**manifest, "shards": result["shards"]}))
    return out


def _overrides(tiny_bert, tiny_data, tmp_path, data: Path, run_dir: Path) -> list[str]:
    return [
        f"reranker.model={tiny_bert}",
        f"reranker.data=[{data}]",
        "reranker.num_negatives=3",
        "reranker.global_batch_size=4",
        "reranker.max_length=32",
        f"reranker.biencoder={tiny_bert}",
        "reranker.top_k=10",
        f"data_root={tiny_data}",
        "eval.beir.0.path=tiny",
        "eval.k_values=[1,5,10]",
        f"eval.cache_dir={tmp_path / 'cache'}",
        "optim.lr=3e-3",
        "optim.warmup_ratio=0",
        "optim.scheduler=constant",
        "trainer.max_steps=24",
        "trainer.max_epochs=10",
        "trainer.log_every_n_steps=1",
        "trainer.progress=off",
        f"run_dir={run_dir}",
    ]


def test_reranker_job_trains_saves_and_reranks(tiny_bert, tiny_data, tmp_path):
    from embedscale.jobs.reranker import run

    shards = _write_shards(tmp_path / "shards", _groups(16, 4))
    result = run(_cfg(_overrides(tiny_bert, tiny_data, tmp_path, shards, tmp_path / "run")))
    run_dir = tmp_path / "run"
    train = result["train"]
    assert train["optimizer_steps"] == 24 and train["pairs_per_step"] == 16 and train["masked_negatives"] == 0
    assert train["loss_last"] < train["loss_first"] - 0.5, train  # 6 epochs over 16 learnable groups
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (run_dir / "model" / name).is_file(), name
    assert "train/loss" in (run_dir / "logs" / "metrics.csv").read_text()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved["eval"]) == {"biencoder", "reranked", "interpolated"}
    for tag in saved["eval"]:
        assert {"tiny/ndcg@10", "tiny/recall@10", "tiny/mrr@10"} <= set(saved["eval"][tag])
        run_file = json.loads((run_dir / "runs" / f"tiny-{tag}.json").read_text())
        assert len(run_file) == 8 and all(len(docs) == 10 for docs in run_file.values())
    # the re-ranked run holds the bi-encoder's top-10, re-ordered: recall@10 cannot change
    assert saved["eval"]["reranked"]["tiny/recall@10"] == saved["eval"]["biencoder"]["tiny/recall@10"]

    only_eval = _overrides(tiny_bert, tiny_data, tmp_path, shards, tmp_path / "eval")
    only_eval += ["reranker.train=false", f"reranker.model={run_dir / 'model'}"]
    again = run(_cfg(only_eval))
    assert "train" not in again
    for key, value in saved["eval"]["reranked"].items():
        assert again["eval"]["reranked"][key] == pytest.approx(value, abs=1e-6), key


def test_jsonl_groups_and_too_few_negatives(tiny_bert, tiny_data, tmp_path):
    from embedscale.jobs.reranker import run

    path = tmp_path / "groups.jsonl"
    rows = [
        {"query": ex.query, "positive": ex.positive, "negatives": ex.negatives, "negative_scores": [0.5] * 3}
        for ex in _groups(8, 3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = _overrides(tiny_bert, tiny_data, tmp_path, path, tmp_path / "run") + ["eval.beir=[]", "trainer.max_steps=2"]
    result = run(_cfg(base))
    assert result["train"]["optimizer_steps"] == 2 and "eval" not in result
    with pytest.raises(ValueError, match=r"groups.jsonl:\d+ has 3 negatives < reranker.num_negatives=4"):
        run(_cfg(base + ["reranker.num_negatives=4", f"run_dir={tmp_path / 'run2'}"]))
    shards = _write_shards(tmp_path / "shards", _groups(8, 2))
    with pytest.raises(ValueError, match=r"sample groups-000-\d+ has 2 negatives < reranker.num_negatives=3"):
        run(_cfg(base + [f"reranker.data=[{shards}]", f"run_dir={tmp_path / 'run3'}"]))


@pytest.mark.parametrize(
    "override, key",
    [
        ("reranker.data=[]", "reranker.data"),
        ("reranker.train=false", "reranker.model"),
        ("reranker.alpha=1.5", "reranker.alpha"),
        ("reranker.num_negatives=0", "reranker.num_negatives"),
        ("trainer.devices=2", "trainer.devices"),
        ("trainer.resume=last", "trainer.resume"),
        ("eval=scifact_stsb", "eval.sts"),
    ],
)
def test_bad_settings_fail_at_compose_time_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _cfg(["reranker.data=[x]", override])
