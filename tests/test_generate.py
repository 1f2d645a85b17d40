"""`embedscale generate`: synthetic queries from a tiny random LM (causal Llama, seq2seq T5) on the tiny BEIR set,
cleaning and dedup on known answers, the round-trip filter against a direct exact search, provenance, determinism
(seeds, batches, ranks), refusals naming their key; the CLI end to end and training on its shards (slow)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import clean_env, compose_train, make_tiny_lm

from embedscale.config import GenerateConfig
from embedscale.data.records import read_corpus
from embedscale.data.shards import ShardedDataset
from embedscale.jobs.launch import compose
from embedscale.retrieval.generate import clean_query, deduplicate
from embedscale.retrieval.lm import SeededSampler, build_prompts, check_context, generate_queries, top_p_mask

REPO = Path(__file__).resolve().parents[1]
TOPICS = "protein galaxy river violin engine forest vaccine crystal"
TEMPLATE_WORDS = "Write a question that this passage answers . Passage : Question search query for article Title"
WORDS = [*TOPICS.split(), *TEMPLATE_WORDS.split(), "document", "about", "number", "what", *map(str, range(40))]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), WORDS)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_t5"), WORDS, kind="t5")


def _cfg(tiny_data, lm, filter_model, out, *extra):
    """`embedscale generate` on the tiny BEIR set: 3 queries of at most 8 tokens per document, top-5 filter."""
    return compose(
        "generate",
        [
            f"data_root={tiny_data}",
            "generate.corpus=tiny",
            f"generate.lm={lm}",
            f"model.name_or_path={filter_model}",
            "model.document_max_length=32",
            "model.query_max_length=16",
            "generate.max_new_tokens=8",
            "generate.batch_size=8",
            "generate.filter_top_k=5",
            f"generate.output={out}",
            f"generate.cache_dir={Path(out).parent / 'cache'}",
            *extra,
        ],
    )


def _run(cfg):
    from embedscale.jobs.generate import run

    return run(cfg)


def _rows(out) -> list[dict]:
    ds = ShardedDataset.open(out)
    return [r for s, meta in enumerate(ds.shards) for r in ds.read(s, range(meta["samples"]))]


def _adds_up(n: dict) -> None:
    parts = n["empty"] + n["duplicates_in_document"] + n["duplicates_across_documents"] + n["filtered_out"] + n["kept"]
    assert n["generated"] == parts, n
    assert n["filter_candidates"] == n["filtered_out"] + n["kept"], n


@pytest.mark.slow  # generation runs of 15-45 s each: outside the fast tier's 3 minutes
def test_counts_add_up_and_samples_carry_provenance(tmp_path, tiny_data, tiny_lm, tiny_bert):
    from embedscale.data.stream import to_example

    manifest = _run(_cfg(tiny_data, tiny_lm, tiny_bert, tmp_path / "out"))
    g = manifest["generation"]
    n = g["counts"]
    assert n["documents"] == 40 and n["generated"] == 120
    _adds_up(n)
    assert 0 < n["kept"] < n["filter_candidates"]  # a random LM: the filter rejects most, not all
    assert n["filter_rate"] == pytest.approx(n["filtered_out"] / n["filter_candidates"], abs=1e-6)
    assert g["lm"]["kind"] == "causal" and g["lm"]["model_type"] == "llama" and g["lm"]["backend"] == "transformers"
    assert g["lm"]["name_or_path"] == str(tiny_lm) and g["lm"]["parameters"] > 0
    assert g["prompt_template"] == GenerateConfig().prompts["retrieval"] and g["task"] == "retrieval"
    assert g["sampling"]["seed"] == 0 and g["sampling"]["do_sample"] and g["sampling"]["queries_per_document"] == 3
    assert g["filter"]["top_k"] == 5 and g["filter"]["model"]["name_or_path"] == str(tiny_bert)
    assert g["filter"]["model"]["fingerprint"] and g["seconds"]["total_s"] > 0 and g["world_size"] == 1
    assert manifest["created_by"].endswith("generate") and manifest["sources"][0]["sha256"]
    fields = manifest["schema"]["fields"]
    assert {"doc_id", "query_index", "generator", "filter_rank", "filter_score"} <= set(fields)

    corpus = read_corpus(tiny_data / "tiny")
    rows = _rows(tmp_path / "out")
    assert len(rows) == n["kept"] == manifest["num_samples"]
    assert len({r["doc_id"] for r in rows}) == n["documents_with_a_kept_query"]
    for row in rows:
        assert row["positive"] == corpus[row["doc_id"]] and row["origin"] == f"{row['doc_id']}:{row['query_index']}"
        assert row["generator"] == str(tiny_lm) and row["source"] == manifest["name"] == "tiny-generated"
        assert 0 <= row["filter_rank"] < 5 and row["query"] == clean_query(row["query"]) != ""
        example = to_example(row, 0)  # the training stream's reader takes the sample, extra fields and all
        assert example.query == row["query"] and example.positive == row["positive"]
    keys = [(r["doc_id"], r["query_index"]) for r in rows]
    assert keys == sorted(keys, key=lambda k: (int(k[0][1:]), k[1]))  # corpus order, then query index


def test_clean_and_deduplicate_on_known_answers():
    assert clean_query("\n\n  What is X? \nsecond line") == "What is X?"
    assert clean_query(" \n \n") == ""
    queries = ["What is X?", " what  is x? ", "", "shared query", "Shared  Query", "only mine", "only mine"]
    docs = [0, 0, 0, 1, 2, 2, 2]
    keep, counts = deduplicate(queries, docs)
    assert keep == [0, 5]  # doc 0's first; doc 2's "only mine" once; "shared query" of docs 1 and 2: neither
    assert counts == {"empty": 1, "duplicate_in_document": 2, "duplicate_across_documents": 2}


@pytest.mark.slow  # generation runs of 15-45 s each: outside the fast tier's 3 minutes
def test_greedy_decoding_gives_duplicates_that_are_removed(tmp_path, tiny_data, tiny_lm, tiny_bert):
    manifest = _run(
        _cfg(
            tiny_data,
            tiny_lm,
            tiny_bert,
            tmp_path / "out",
            "generate.do_sample=false",
            "generate.queries_per_document=2",
            "generate.filter_top_k=0",
        )
    )
    n = manifest["generation"]["counts"]
    _adds_up(n)
    assert n["empty"] % 2 == 0  # greedy: both rows of a document are the same text
    assert n["duplicates_in_document"] == n["documents"] - n["empty"] // 2 > 0
    assert manifest["generation"]["filter"] is None and "filter_rank" not in manifest["schema"]["fields"]
    assert len({r["doc_id"] for r in _rows(tmp_path / "out")}) == n["kept"]  # one query per document at most


@pytest.mark.slow  # generation runs of 15-45 s each: outside the fast tier's 3 minutes
def test_filter_keeps_exactly_the_pairs_whose_document_is_in_the_top_k(tmp_path, tiny_data, tiny_lm, tiny_bert):
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import encode_texts, load_encoder
    from embedscale.retrieval.evaluator import exact_search

    k = 3
    _run(_cfg(tiny_data, tiny_lm, tiny_bert, tmp_path / "all", "generate.filter_top_k=0"))
    _run(_cfg(tiny_data, tiny_lm, tiny_bert, tmp_path / "top", f"generate.filter_top_k={k}"))
    candidates, kept = _rows(tmp_path / "all"), _rows(tmp_path / "top")

    corpus = read_corpus(tiny_data / "tiny")
    ids = list(corpus)
    encoder, tokenizer = load_encoder(
        ModelConfig(name_or_path=str(tiny_bert), document_max_length=32, query_max_length=16)
    )
    docs_ND = encode_texts(encoder, tokenizer, list(corpus.values()), side="document")
    q_QD = encode_texts(encoder, tokenizer, [r["query"] for r in candidates], side="query")
    _, top_QK = exact_search(q_QD, docs_ND, k)
    expected = [r for r, top in zip(candidates, top_QK.tolist()) if ids.index(r["doc_id"]) in top]
    assert 0 < len(expected) < len(candidates)
    assert [(r["doc_id"], r["query"]) for r in kept] == [(r["doc_id"], r["query"]) for r in expected]
    scores_QN = q_QD @ docs_ND.T
    for row in kept:  # the recorded rank: documents scoring higher than the query's own
        q = next(
            i
            for i, r in enumerate(candidates)
            if (r["doc_id"], r["query_index"]) == (row["doc_id"], row["query_index"])
        )
        own = scores_QN[q, ids.index(row["doc_id"])]
        assert row["filter_rank"] == int((scores_QN[q] > own).sum()) and row["filter_score"] == pytest.approx(
            own.item()
        )


@pytest.mark.slow  # generation runs of 15-45 s each: outside the fast tier's 3 minutes
def test_same_seed_same_shards_other_seed_other_queries(tmp_path, tiny_data, tiny_lm, tiny_bert):
    runs = {
        name: _run(_cfg(tiny_data, tiny_lm, tiny_bert, tmp_path / name, *extra))
        for name, extra in (("a", []), ("b", []), ("c", ["generate.seed=1"]))
    }
    assert runs["a"]["shards"] and [s["sha256"] for s in runs["a"]["shards"]] == [
        s["sha256"] for s in runs["b"]["shards"]
    ]
    assert {r["query"] for r in _rows(tmp_path / "a")} != {r["query"] for r in _rows(tmp_path / "c")}


def test_a_query_does_not_depend_on_its_batch_nor_the_documents_around_it(tiny_data, tiny_lm):
    from embedscale.data.records import read_corpus_documents

    docs = read_corpus_documents(tiny_data / "tiny", text_field="text", title_field="title")[:12]
    ids, titles, bodies = (list(x) for x in zip(*docs))
    base = GenerateConfig(lm=str(tiny_lm), max_new_tokens=8, queries_per_document=2)
    one, _ = generate_queries(dataclasses.replace(base, batch_size=1), ids, titles, bodies)
    many, _ = generate_queries(dataclasses.replace(base, batch_size=24), ids, titles, bodies)
    reverse, _ = generate_queries(
        dataclasses.replace(base, batch_size=5), ids[::-1][:6], titles[::-1][:6], bodies[::-1][:6]
    )
    assert one == many and len(set(one)) > 12
    assert reverse == [q for d in range(11, 5, -1) for q in one[2 * d : 2 * d + 2]]


@pytest.mark.slow  # generation runs of 15-45 s each: outside the fast tier's 3 minutes
def test_seq2seq_lm(tmp_path, tiny_data, tiny_t5, tiny_bert):
    manifest = _run(_cfg(tiny_data, tiny_t5, tiny_bert, tmp_path / "out", "generate.max_documents=10"))
    g = manifest["generation"]
    assert g["lm"]["kind"] == "seq2seq" and g["lm"]["model_type"] == "t5"
    assert g["counts"]["documents"] == 10 and g["counts"]["generated"] == 30
    _adds_up(g["counts"])


def test_sampling_follows_the_distribution_and_top_p():
    logits_BV = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4).clone()
    sampler = SeededSampler(list(range(4000)), temperature=1.0, top_p=1.0)
    freq = sampler(None, logits_BV).argmax(-1).bincount(minlength=4) / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), freq
    assert top_p_mask(logits_BV[:1], 0.7).tolist() == [[False, False, True, True]]
    nucleus = SeededSampler(list(range(4000)), temperature=1.0, top_p=0.7)(None, logits_BV).argmax(-1)
    assert set(nucleus.tolist()) == {0, 1}


def test_prompts_truncate_the_document_and_place_the_title(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    c = GenerateConfig(lm="x", max_document_tokens=3)
    [p] = build_prompts(c, tok, ["galaxy 4"], ["document 4 about galaxy number 4"])
    assert p == "Write a question that this passage answers.\nPassage: galaxy 4 document\nQuestion:"
    c = GenerateConfig(lm="x", task="title", max_document_tokens=3)
    [p] = build_prompts(c, tok, ["galaxy 4"], ["document 4 about galaxy number 4"])
    assert p == "Write a search query for this article.\nTitle: galaxy 4\nArticle: document 4 about\nQuery:"


def test_refusals_name_the_key(tmp_path, tiny_data, tiny_lm, tiny_bert):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"generate\.task='nope' has no template"):
        GenerateConfig(lm="x", task="nope")
    with pytest.raises(ValueError, match=r"generate\.prompts\.retrieval=.*must hold \{document\}"):
        GenerateConfig(lm="x", prompts={"retrieval": "Write a question.\nQuestion:"})
    with pytest.raises(ValueError, match=r"generate\.prompts\.mine=.*\['passage'\]"):
        GenerateConfig(lm="x", prompts={"retrieval": "{document}", "mine": "{document} {passage}"})
    with pytest.raises(ValueError, match=r"generate\.lm is not set"):
        compose("generate", [])
    with pytest.raises(ValueError, match=r"generate\.use_vllm=true, but vLLM is not installed"):
        _run(_cfg(tiny_data, tiny_lm, tiny_bert, tmp_path / "v", "generate.use_vllm=true"))
    with pytest.raises(ValueError, match=r"generate\.lm='/nowhere/lm' could not be loaded"):
        _run(_cfg(tiny_data, "/nowhere/lm", tiny_bert, tmp_path / "l"))
    with pytest.raises(ValueError, match=r"generate\.corpus: .*missing does not exist"):
        _run(_cfg(tiny_data, tiny_lm, tiny_bert, tmp_path / "c", "generate.corpus=missing"))
    (tmp_path / "body.jsonl").write_text('{"_id": "a", "body": "text"}\n')
    with pytest.raises(ValueError, match=r"set generate\.text_field"):
        _run(_cfg(tiny_data, tiny_lm, tiny_bert, tmp_path / "j", f"generate.corpus={tmp_path / 'body.jsonl'}"))
    small = SimpleNamespace(config=SimpleNamespace(n_positions=16, is_encoder_decoder=False))  # 10 + 8 > 16
    ten_tokens = lambda texts: {"input_ids": [[0] * 10 for _ in texts]}  # noqa: E731
    with pytest.raises(ValueError, match=r"lower generate\.max_document_tokens"):
        check_context(small, ten_tokens, ["p"], GenerateConfig(lm="x", max_new_tokens=8))

    out = tmp_path / "out"
    _run(_cfg(tiny_data, tiny_lm, tiny_bert, out, "generate.max_documents=4", "generate.filter_top_k=0"))
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(ValueError, match=r"manifest\.json exists: .*generate\.overwrite=true"):
        _run(_cfg(tiny_data, tiny_lm, tiny_bert, out, "generate.max_documents=4", "generate.filter_top_k=0"))
    again = _run(
        _cfg(
            tiny_data,
            tiny_lm,
            tiny_bert,
            out,
            "generate.max_documents=2",
            "generate.filter_top_k=0",
            "generate.overwrite=true",
        )
    )
    assert again["generation"]["counts"]["documents"] == 2 and (out / "notes.txt").read_text() == "the user's own file"


@pytest.mark.slow  # the CLI in a process, the real all-MiniLM-L6-v2 as the filter, then 2 training steps
def test_cli_end_to_end_and_train_reads_the_shards(tmp_path, tiny_data, tiny_lm, tiny_bert):
    from embedscale.jobs.train import run

    out = tmp_path / "shards"
    args = [
        f"data_root={tiny_data}",
        "generate.corpus=tiny",
        f"generate.lm={tiny_lm}",
        "generate.max_new_tokens=8",
        "generate.filter_top_k=10",
        f"generate.output={out}",
        f"generate.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "embedscale.cli", "generate", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["generation"]["counts"]
    _adds_up(n)
    assert manifest["generation"]["filter"]["model"]["name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert f"{n['kept']} pairs kept of 120 queries" in proc.stdout and n["kept"] >= 8
    cfg = compose_train(
        [
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            "model.query_max_length=16",
            "data.format=shards",
            f"data.path={out}",
            "data.batch_size_per_rank=4",
            "trainer.max_steps=2",
            "trainer.progress=off",
            "logger.loggers=[csv]",
            "eval=none",
            "export=false",
            f"run_dir={tmp_path / 'train'}",
        ]
    )
    assert run(cfg)["train"]["optimizer_steps"] == 2


@pytest.mark.slow  # torchrun, 2 ranks
def test_two_ranks_write_the_same_shards_as_one(tmp_path, tiny_data, tiny_lm, tiny_bert):
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        args = [
            f"data_root={tiny_data}",
            "generate.corpus=tiny",
            f"generate.lm={tiny_lm}",
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            "generate.max_new_tokens=8",
            "generate.batch_size=8",  # 120 rows -> 15 batches: 8 on rank 0, 7 on rank 1
            "generate.filter_top_k=5",
            "generate.filter_batch_size=8",
            f"generate.output={out}",
            f"generate.cache_dir={tmp_path / f'cache{world}'}",
            f"hydra.run.dir={tmp_path / f'run{world}'}",
        ]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        proc = subprocess.run(
            [*launcher, "-m", "embedscale.jobs.generate", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=clean_env(),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[world] = json.loads((out / "manifest.json").read_text())
    assert outs[2]["generation"]["world_size"] == 2 and outs[2]["generation"]["counts"]["kept"] > 0
    assert outs[2]["generation"]["counts"] == outs[1]["generation"]["counts"]
    assert [s["sha256"] for s in outs[2]["shards"]] == [s["sha256"] for s in outs[1]["shards"]]  # byte-identical
